"""The bench runner: plans the cases, skips what cannot fit, runs the rest with progress, and
collects results plus the environment they were measured in.

A result is a dict (JSON-ready): the case (shape and its dims, dtype, device, contender, kind,
pass), ``status`` (``ok``, ``skipped``, ``out of memory``, ``error``) with ``reason``,
``ran_on`` (the protokern backends that ran its calls, recorded where they ran; a
``protokern:<backend>`` case on any other is an ``error``, see `measure.run_case`), the raw
``times_s`` and their summary (``median_s``, ``min_s``, ``max_s``, ``q1_s``, ``q3_s``),
``peak_bytes`` and ``memory_method``, ``estimated_bytes``, ``gemm_flops`` and ``tflops``, and,
per (shape, dtype, pass), ``best_naive`` and ``speedup_vs_best_naive`` (over the fastest
contender of kind ``naive``: naive PyTorch, never KeOps), ``speedup_vs_keops`` (only where a
KeOps result exists) and ``ratio_to_floor``.
"""

import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from tqdm import tqdm

import protokern
from protokern.backends import cpu as cpu_backend
from protokern.bench.contenders import (
    PASSES,
    Contender,
    exclude_contenders,
    select_contenders,
)
from protokern.bench.load import competing_load, ensure_running, paused
from protokern.bench.measure import DTYPES, CaseSpec, IsolatedRunner, run_case, summarize
from protokern.bench.shapes import NamedShape
from protokern.bench.slowdown import add_slowdowns, fair_share_slowdown


@dataclass
class BenchConfig:
    """What to run. ``memory_cap_bytes``: cases whose estimated peak exceeds it are skipped."""

    shapes: list[NamedShape]
    device: str = "cpu"
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    passes: list[str] = field(default_factory=lambda: list(PASSES))
    contenders: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    repeats: int = 5
    warmup: int = 1
    threads: int | None = 2
    memory_cap_bytes: int = 4 << 30
    tf32: bool = False
    seed: int = 0
    isolate: bool = True
    load: int = 0
    """CPU: also run every case under this many competing processes (`protokern.bench.load`)."""
    load_rounds: int = 1
    """With ``load``: quiet/loaded pairs per case, their times pooled into one record each (the
    scheduler places the threads anew at every resume, and a loaded median moves with that)."""

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but torch.cuda.is_available() is False")
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad or not self.dtypes:
            raise ValueError(f"dtypes must be among {list(DTYPES)}, got {self.dtypes}")
        bad = [p for p in self.passes if p not in PASSES]
        if bad or not self.passes:
            raise ValueError(f"passes must be among {list(PASSES)}, got {self.passes}")
        if self.load < 0:
            raise ValueError(f"load must be >= 0, got {self.load}")
        if self.load and self.device != "cpu":
            raise ValueError("load (competing processes) applies to the cpu device only")
        if self.load_rounds < 1 or (self.load_rounds > 1 and not self.load):
            raise ValueError(f"load_rounds must be >= 1, and 1 without a load, got "
                             f"{self.load_rounds} with load {self.load}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats}, "
                             f"{self.warmup}")

    def selected_contenders(self, shape: NamedShape | None = None) -> list[Contender]:
        """``contenders`` (all if None) of ``shape``'s op (default: min_distance) less
        ``exclude`` (names or kinds)."""
        op, k = (shape.op, shape.k) if shape is not None else ("min_distance", 1)
        chosen = select_contenders(self.device, self.contenders, op, k)
        return exclude_contenders(self.device, chosen, self.exclude)


def case_record(shape: NamedShape, dtype: str, device: str, contender: Contender,
                pass_name: str) -> dict:
    """The fields that identify a case in the results."""
    return {
        "shape": shape.name, "batch": shape.batch, "dim": shape.dim, "height": shape.height,
        "width": shape.width, "num_prototypes": shape.num_prototypes, "patch": shape.patch,
        "positions": shape.positions, "op": shape.op, "k": shape.k, "dtype": dtype,
        "device": device,
        "contender": contender.name, "kind": contender.kind, "pass": pass_name,
        "gemm_flops": shape.gemm_flops(),
    }


def run_cases(config: BenchConfig, shapes: Iterable[NamedShape] | None = None,
              passes: Iterable[str] | None = None, dtypes: Iterable[str] | None = None,
              description: str = "bench",
              checkpoint: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run every (shape, dtype, pass, contender) case of ``config`` (or of the overrides),
    in that order, with a progress bar; every planned case gets a result. With
    ``config.load``, that many competing processes run for the whole plan and each case runs
    twice in a row, first with them stopped (quiet, `protokern.bench.load.paused`), then under
    them (records carry ``load``: 0 or the count), ``config.load_rounds`` times (round by round
    across the contenders of a (shape, dtype, pass)), each state's times pooled into one record
    (``rounds``; memory from the first), and at the end each loaded
    record gets its slowdown and, against the fastest naive contender's, its relative slowdown
    (`protokern.bench.slowdown.add_slowdowns`). ``checkpoint`` is called with the results so far
    after each contender's last round of a case (so a run cut short leaves every case finished
    before it; with several rounds, a (shape, dtype, pass) cut short mid-rounds leaves
    nothing)."""
    shapes = list(config.shapes if shapes is None else shapes)
    passes = list(config.passes if passes is None else passes)
    dtypes = list(config.dtypes if dtypes is None else dtypes)
    cases = [(s, d, p, config.selected_contenders(s)) for s in shapes for d in dtypes
             for p in passes]
    results: list[dict] = []
    runner = IsolatedRunner() if config.isolate and config.device == "cpu" else None
    levels = [0, config.load] if config.load else [0]
    rounds = config.load_rounds  # 1 without a load (BenchConfig)
    progress = tqdm(total=sum(len(c) for *_, c in cases) * len(levels) * rounds,
                    desc=description, unit="case", dynamic_ncols=True)
    with competing_load(config.load) as load:
        for shape, dtype, pass_name, contenders in cases:
            runs: dict[tuple[str, int], list[dict]] = {
                (c.name, level): [] for c in contenders for level in levels}
            # Round r of every contender before round r + 1 of any: contenders' rounds of one
            # index ran tens of seconds apart, so comparing their slowdowns round by round cancels
            # the machine's drift over the minutes a case takes (protokern.bench.slowdown).
            for round_index in range(rounds):
                for contender in contenders:
                    for level in levels:
                        under = f" load {level}" if level else ""
                        of = f" round {round_index + 1}/{rounds}" if rounds > 1 else ""
                        progress.set_postfix_str(f"{shape.name} {dtype} {pass_name} "
                                                 f"{contender.name}{under}{of}")
                        part = "time" if round_index else None  # memory once, in round 1
                        with paused(load) if level == 0 else nullcontext():
                            record = _run_one(config, runner, shape, dtype, pass_name,
                                              contender, level, part)
                        if level:  # a load that died before or during the run: not kept
                            ensure_running(load)
                        runs[contender.name, level].append(record)
                        progress.update()
                    if round_index == rounds - 1:  # this contender's case is complete
                        results.extend(_pooled(runs[contender.name, level]) for level in levels)
                        if checkpoint is not None:
                            add_comparisons(results)
                            checkpoint(results)
    progress.close()
    add_comparisons(results)
    add_slowdowns(results)  # once, at the end: it resamples every loaded pair's rounds
    return results


def _pooled(records: list[dict]) -> dict:
    """One record for several runs of a case: the first, with every run's times and their
    summary (``rounds``: how many); the first failed run instead, if any failed."""
    failed = [r for r in records if r["status"] != "ok"]
    if len(records) == 1 or failed:
        return failed[0] if failed else records[0]
    times = [t for r in records for t in r["times_s"]]
    pooled = {**records[0], "times_s": times, **summarize(times), "rounds": len(records)}
    pooled["tflops"] = pooled["gemm_flops"] / pooled["median_s"] / 1e12
    return pooled


def _run_one(config: BenchConfig, runner: IsolatedRunner | None, shape: NamedShape,
             dtype: str, pass_name: str, contender, load: int, part: str | None = None) -> dict:
    """One case's record; ``part`` as `IsolatedRunner.run` (None: time and memory)."""
    record = case_record(shape, dtype, config.device, contender, pass_name)
    record["load"] = load
    estimate = contender.estimate_bytes(shape, DTYPES[dtype], pass_name)
    record["estimated_bytes"] = estimate
    if estimate > config.memory_cap_bytes:
        record.update(status="skipped", reason=(
            f"estimated peak {estimate / 2**30:.1f} GiB > memory cap "
            f"{config.memory_cap_bytes / 2**30:.1f} GiB"))
        return record
    spec = CaseSpec(shape, dtype, config.device, contender.name, pass_name,
                    config.repeats, config.warmup, config.threads, config.tf32,
                    config.seed)
    record.update(runner.run(spec, part) if runner else run_case(spec, part or "time and memory"))
    if record["status"] == "ok":
        record["tflops"] = shape.gemm_flops() / record["median_s"] / 1e12
    return record


def case_group(record: dict) -> tuple:
    """What a result is compared within: its shape, dtype, pass and competing load."""
    return record["shape"], record["dtype"], record["pass"], record.get("load", 0)


def add_comparisons(results: list[dict]) -> None:
    """Per (shape, dtype, pass), in place: each timed contender's speed-up over the fastest of
    kind ``naive`` (``best_naive``, ``speedup_vs_best_naive``), over KeOps
    (``speedup_vs_keops``, only if KeOps ran for the case) and its time over the bare GEMM's
    (``ratio_to_floor``)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(case_group(r), []).append(r)
    for group in groups.values():
        timed = [r for r in group if r["status"] == "ok"]
        naive = [r for r in timed if r["kind"] == "naive"]
        keops = [r for r in timed if r["kind"] == "keops"]
        floor = [r for r in timed if r["kind"] == "floor"]
        best_naive = min(naive, key=lambda r: r["median_s"]) if naive else None
        for r in timed:
            for stale in ("best_naive", "speedup_vs_best_naive", "speedup_vs_keops",
                          "ratio_to_floor"):
                r.pop(stale, None)  # recomputed as more of the group finishes
            if best_naive is not None:
                r["best_naive"] = best_naive["contender"]
                r["speedup_vs_best_naive"] = best_naive["median_s"] / r["median_s"]
            if keops:
                r["speedup_vs_keops"] = keops[0]["median_s"] / r["median_s"]
            if floor:
                r["ratio_to_floor"] = r["median_s"] / floor[0]["median_s"]


def git_commit() -> str:
    """The protokern checkout's commit (``+dirty`` with uncommitted changes), or ``unknown``."""
    root = Path(protokern.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, check=False,
                               timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty.strip() else "")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where it cannot be read)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    break  # the first processor's fields only
                name, _, value = line.partition(":")
                fields[name.strip()] = value.strip()
    except OSError:
        pass
    return fields


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_family_model() -> str | None:
    """``"family F model M"`` of this CPU from /proc/cpuinfo: under a hypervisor the model name
    can be as bare as "AMD EPYC", which does not tell a Zen 3 (AVX2) from a Zen 4 (AVX-512)."""
    fields = _cpuinfo()
    if "cpu family" not in fields or "model" not in fields:
        return None
    return f"family {fields['cpu family']} model {fields['model']}"


def cpu_isa() -> list[str]:
    """The vector instruction sets of this CPU that matter to the kernels and to BLAS, from
    /proc/cpuinfo: AMX, AVX-512, AVX2 (the host differs between sessions: see NOTES.md)."""
    flags = _cpuinfo().get("flags", "").split()
    names = {"amx_tile": "AMX", "avx512f": "AVX-512", "avx2": "AVX2"}
    return [name for flag, name in names.items() if flag in flags]


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: ``protokern bench ...`` (or ``python -m protokern.cli ...``)."""
    argv = sys.argv if argv is None else argv
    program = Path(argv[0]).name if argv else "protokern"
    if program in ("cli.py", "__main__.py"):
        program = "python -m protokern.cli"
    return " ".join([program, *(shlex.quote(a) for a in argv[1:])])


def environment(config: BenchConfig, argv: list[str] | None = None) -> dict:
    """Where and how the numbers were measured."""
    return {
        "command": command_line(argv),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "device": config.device,
        "device_name": device_name(config.device),
        "cpu_name": device_name("cpu"),
        "cpu_family_model": cpu_family_model(),
        "cpu_isa": cpu_isa(),
        "cpu_count": _cpu_count(),
        # other processes' load makes CPU numbers noisy: say how busy the machine was
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "threads": config.threads if config.device == "cpu" else None,
        "tf32": config.tf32,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "pykeops": _version("pykeops"),
        "faiss": _version("faiss-cpu"),
        "protokern": protokern.__version__,
        "protokern_backends": protokern.available_backends(config.device),
        # the cpu backend's float32 GEMM (packed or blas): the speed of its rows depends on it
        "cpu_gemm": cpu_backend.gemm_in_use(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "repeats": config.repeats,
        "warmup": config.warmup,
        "memory_cap_bytes": config.memory_cap_bytes,
        "seed": config.seed,
        "isolated_processes": config.isolate and config.device == "cpu",
        "competing_load_processes": config.load,
        "load_rounds": config.load_rounds if config.load else None,
        # what a perfectly parallel call would lose to the load with equal shares per thread
        # (protokern.bench.slowdown)
        "load_fair_share_slowdown": _fair_share(config),
    }


def _fair_share(config: BenchConfig) -> float | None:
    cores = _cpu_count()
    if not config.load or config.device != "cpu" or not cores:
        return None
    return fair_share_slowdown(config.threads or torch.get_num_threads(), config.load, cores)


def _cpu_count() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
