"""Timing and peak memory of one benchmark case: one contender, shape, dtype and pass.

Timing: ``warmup`` untimed calls, then ``repeats`` timed ones. On CUDA each call sits between
two CUDA events after a ``synchronize``; on CPU ``torch.set_num_threads`` is fixed first and
each call is timed by ``time.perf_counter`` (CPU ops are synchronous).

Peak memory, beyond the inputs:

- CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` once the inputs
  exist, after ``reset_peak_memory_stats()``.
- CPU: ATen allocates with malloc, which PyTorch's own counters do not see, so the case runs in
  a fresh process of its own, a new interpreter (`IsolatedRunner`; its timing runs in another),
  and reads the kernel's resident-set high-water mark
  (``VmHWM`` of ``/proc/self/status``). Once the inputs exist the mark is reset to the current
  RSS (writing ``5`` to ``/proc/self/clear_refs``, Linux >= 4.0), the case runs, and the peak
  is ``VmHWM`` minus that baseline. Without ``clear_refs``, ``ru_maxrss`` of `resource` minus
  the baseline is used, which can only over-state. Pages allocated but never written are not
  resident and not counted; every contender writes what it allocates.

  First the case fixes glibc's mmap threshold at 128 KiB (`fix_malloc_threshold`). glibc
  otherwise raises it to the size of each large block freed (up to its
  ``DEFAULT_MMAP_THRESHOLD_MAX``), after which blocks of that size come from the heap and stay
  resident when freed: the peak then depends on the order of earlier frees, not only on the
  case (benchmarks/NOTES.md says by how much). With the threshold fixed every block over
  128 KiB is its own mapping, returned when freed, so the peak is the live memory at the worst
  moment (plus first-call library buffers), for every contender alike.
"""

import ctypes
import ctypes.util
import gc
import multiprocessing
import os
import resource
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch
from torch import Tensor

import protokern as pk
from protokern.bench.contenders import contender_named
from protokern.bench.shapes import NamedShape
from protokern.timing import time_calls

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CaseSpec:
    """Everything a (possibly separate) process needs to run one case."""

    shape: NamedShape
    dtype: str
    device: str
    contender: str
    pass_name: str
    repeats: int
    warmup: int
    threads: int | None = None
    tf32: bool = False
    seed: int = 0


def make_inputs(shape: NamedShape, dtype: torch.dtype, device: str, seed: int = 0
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded inputs: ``x`` ``(B, D, H, W)``, prototypes ``(M, D, ph, pw)`` and an upstream
    gradient of the op's values (`NamedShape.output_shape`), identical for every contender of a
    case."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.batch, shape.dim, shape.height, shape.width, generator=generator)
    prototypes = torch.randn(shape.num_prototypes, shape.dim, shape.patch, shape.patch,
                             generator=generator)
    grad = torch.rand(shape.output_shape, generator=generator)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, prototypes, grad))


def set_precision(device: str, tf32: bool) -> None:
    """CUDA float32: let matmuls and convs use TF32 tensor cores, or forbid it (both, so that
    no contender gets TF32 while another does not)."""
    if device == "cuda":
        precision = "tf32" if tf32 else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision


def rss_bytes(field: str) -> int:
    """``VmRSS`` (current) or ``VmHWM`` (high-water mark) of this process, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_rss_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h


def fix_malloc_threshold(threshold: int = 128 * 1024) -> bool:
    """Make glibc map every block over ``threshold`` bytes on its own and unmap it when freed,
    with no dynamic adjustment (see the module docstring); False where libc is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None)
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold) == 1


def peak_of_next_call(step: Callable[[], object]) -> tuple[int, object]:
    """``(bytes, result)``: the resident-set peak one more call of ``step`` reaches beyond the
    current RSS, and what it returned (call ``step`` before to leave first-call costs out).
    Linux only (``/proc/self/clear_refs``)."""
    gc.collect()
    baseline = rss_bytes("VmRSS")
    if not reset_rss_peak():
        raise RuntimeError("peak_of_next_call: /proc/self/clear_refs cannot be written here")
    result = step()
    return rss_bytes("VmHWM") - baseline, result


def max_rss_bytes() -> int:
    """Peak RSS by `resource` (kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class _CpuMemory:
    """Peak RSS beyond the state at construction (see the module docstring)."""

    def __init__(self, malloc_fixed: bool) -> None:
        self.procfs = os.path.exists("/proc/self/status")
        self.baseline = rss_bytes("VmRSS") if self.procfs else max_rss_bytes()
        self.method = ("VmHWM after clear_refs reset, minus VmRSS baseline"
                       if self.procfs and reset_rss_peak()
                       else "ru_maxrss minus baseline (no clear_refs: may over-state)")
        if malloc_fixed:
            self.method += "; glibc mmap threshold fixed at 128 KiB"

    def peak(self) -> int:
        usage = rss_bytes("VmHWM") if "VmHWM" in self.method else max_rss_bytes()
        return max(0, usage - self.baseline)


class _CudaMemory:
    def __init__(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.baseline = torch.cuda.memory_allocated()
        self.method = "torch.cuda.max_memory_allocated minus memory_allocated baseline"

    def peak(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.baseline


def summarize(times: list[float]) -> dict[str, float]:
    """Median, min, max and quartiles of ``times`` (seconds)."""
    ordered = sorted(times)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median_s": statistics.median(ordered), "min_s": ordered[0], "max_s": ordered[-1],
            "q1_s": q1, "q3_s": q3}


PARTS = ("time", "memory", "time and memory")


def run_case(spec: CaseSpec, part: str = "time and memory") -> dict:
    """Run one case here, in this process; returns its raw times and summary, its peak memory,
    or both (``part``).

    ``"memory"`` fixes glibc's mmap threshold first (CPU; see the module docstring) and runs
    ``spec.warmup`` calls and one more. The threshold makes every large allocation a fresh
    mapping, page faults included, so CPU timings are taken in another process without it
    (`IsolatedRunner` does both).

    Every call runs inside `pk.recording`, here, in the process that makes it (a case run by
    `IsolatedRunner` records in its worker): ``ran_on`` lists the protokern backends that ran
    its kernels, from every thread, autograd's included. A contender whose calls ran elsewhere
    than its own backend (`Contender.wrong_backends`) is an ``"error"``, without times or
    memory, since they would be another backend's.

    Failures become results (``status`` ``"out of memory"`` or ``"error"`` with the reason):
    one broken contender must not lose a whole run, and the table shows why it is missing.
    """
    if part not in PARTS:
        raise ValueError(f"run_case: part must be one of {PARTS}, got {part!r}")
    malloc_fixed = part == "memory" and spec.device == "cpu" and fix_malloc_threshold()
    if spec.device == "cpu" and spec.threads:
        torch.set_num_threads(spec.threads)
    set_precision(spec.device, spec.tf32)
    result = {"status": "ok", "reason": "", "threads": torch.get_num_threads()}
    calls: list[tuple[str, str]] = []  # (kernel, backend) of every protokern call
    try:
        contender = contender_named(spec.device, spec.contender, spec.shape.op, spec.shape.k)
        x, prototypes, grad = make_inputs(spec.shape, DTYPES[spec.dtype], spec.device, spec.seed)
        step = contender.make_step(x, prototypes, grad, spec.pass_name)
        memory = (None if part == "time" else _CudaMemory() if spec.device == "cuda"
                  else _CpuMemory(malloc_fixed))
        measured: dict = {}
        with pk.recording() as calls:
            for _ in range(spec.warmup):
                step()
            if part == "memory":
                step()
            else:
                times = time_calls(step, spec.repeats, spec.device)
                measured.update({"times_s": times, **summarize(times)})
            if memory is not None:
                measured.update({"peak_bytes": memory.peak(), "memory_method": memory.method})
        result["ran_on"] = _backends(calls)
        wrong = contender.wrong_backends(result["ran_on"])
        if wrong is not None:
            return {**result, "status": "error", "reason": wrong}
        result.update(measured)
    except torch.OutOfMemoryError as error:
        return {**result, "ran_on": _backends(calls), "status": "out of memory",
                "reason": str(error).split("\n")[0]}
    except Exception as error:  # noqa: BLE001 -- recorded in the results, never hidden
        return {**result, "ran_on": _backends(calls), "status": "error",
                "reason": f"{type(error).__name__}: {error}"}
    finally:
        if spec.device == "cuda":
            torch.cuda.empty_cache()
    return result


def _backends(calls: list[tuple[str, str]]) -> list[str]:
    """The distinct backends of `pk.recording`'s ``(kernel, backend)`` pairs, sorted."""
    return sorted({backend for _, backend in calls})


def _send_result(connection: Connection, spec: CaseSpec, part: str) -> None:
    connection.send(run_case(spec, part))
    connection.close()


class IsolatedRunner:
    """Runs each case in a process of its own, started for it and gone when it returns, so a
    case sees no allocation of an earlier one.

    ``run(spec)`` returns `run_case`'s result, or an ``"error"`` result if the process died
    (e.g. killed for memory). A CPU case runs twice: once timed, in a process forked from a
    server that has imported torch (quick to start), once for its peak memory, in a new
    interpreter, as a user's script runs: a forked child's peak also counts pages of the
    parent's libraries faulted in again, the same for every contender, which is the harness,
    not them. No process is started ahead of its case: an interpreter importing torch next to a
    timed case slows it. benchmarks/NOTES.md has the figures behind both choices.
    """

    def __init__(self) -> None:
        self._forkserver = multiprocessing.get_context("forkserver")
        self._forkserver.set_forkserver_preload(["torch", "protokern.bench.measure"])
        self._spawn = multiprocessing.get_context("spawn")

    def run(self, spec: CaseSpec, part: str | None = None) -> dict:
        """`run_case`'s result for ``part``; by default time and memory, on CPU from two
        processes."""
        if part is not None or spec.device != "cpu":
            return self._run_part(spec, part or "time and memory")
        timed = self._run_part(spec, "time")
        if timed["status"] != "ok":
            return timed
        memory = self._run_part(spec, "memory")
        if memory["status"] != "ok":
            return memory
        return {**timed, "peak_bytes": memory["peak_bytes"],
                "memory_method": memory["memory_method"]}

    def _run_part(self, spec: CaseSpec, part: str) -> dict:
        context = self._spawn if part == "memory" else self._forkserver
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_send_result, args=(sender, spec, part))
        process.start()
        sender.close()  # so that recv sees the end if the child dies without sending
        try:
            result = receiver.recv()
        except EOFError:
            result = None
        process.join()
        if result is None:
            return {"status": "error", "reason": f"worker process died (exit code "
                    f"{process.exitcode}); likely killed for memory"}
        return result
