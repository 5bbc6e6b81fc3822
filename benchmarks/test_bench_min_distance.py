"""pytest-benchmark suite: min_distance, every contender on the named shapes, both passes.

    pytest benchmarks/test_bench_min_distance.py --benchmark-only
    PROTOKERN_BENCH_SHAPES=cub,cub14,imagenet pytest benchmarks --benchmark-only

Grouped by named shape and pass; the contenders (every available protokern backend, the naive
PyTorch formulations, KeOps when installed, the bare-GEMM floor) come from
`protokern.bench.contenders`, the same ones `protokern bench` runs, on the same seeded inputs.
Each benchmark's ``extra_info`` carries the GEMM FLOPs, achieved TFLOP/s and the peak memory
beyond the inputs (CPU: measured in a fresh process, see benchmarks/NOTES.md).

Timing on CUDA. pytest-benchmark's own statistics (its table, ``stats`` in
``--benchmark-json``) can only come from its timer model: a zero-argument host clock
(``--benchmark-timer``, default ``time.perf_counter``) read before and after each round, the
round's duration being the difference of the two numbers. A CUDA event is not such a clock: its
time is known only after the GPU has passed it, as an interval between two events
(``Event.elapsed_time``), so it cannot be that timer. Hence, on CUDA, each round is timed both
ways: the round calls `protokern.timing.cuda_event_seconds` (the helper ``protokern
bench`` times with: synchronize, event, step, event, wait for it), so pytest-benchmark's host
time includes launch overhead and that wait, while the same rounds' event times (warm-up round
dropped) go to ``extra_info``: ``cuda_event_times_s`` and their summary (``cuda_event_median_s``,
``_min_s``, ``_max_s``, ``_q1_s``, ``_q3_s``); ``tflops`` uses the event median on CUDA, the
pytest-benchmark median on CPU (where ops are synchronous and the host clock is the time).

Configured by the ``PROTOKERN_BENCH_*`` environment variables (`protokern.env.VARIABLES`, the
README's table; defaults sized for a CPU: shape ``cub``, 2 threads, 5 rounds, a 4 GiB memory
cap). ``PROTOKERN_BENCH_EXCLUDE=protokern:reference`` leaves out the float64-exact oracle,
which recomputes every pair when L' = 1 (minutes per call on ``cil_vectors`` on a CPU); a name
that matches no available contender is an error, so a typo does not go unnoticed.
"""

import pytest
import torch

from protokern import env
from protokern.bench.contenders import PASSES, all_contenders, exclude_contenders
from protokern.bench.measure import (
    DTYPES,
    CaseSpec,
    IsolatedRunner,
    make_inputs,
    run_case,
    set_precision,
    summarize,
)
from protokern.bench.shapes import GPU_SHAPES, parse_shapes
from protokern.timing import cuda_event_seconds

DEVICE = env.text("PROTOKERN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
SHAPES = parse_shapes(env.text("PROTOKERN_BENCH_SHAPES", ",".join(GPU_SHAPES)
                               if DEVICE == "cuda" else "cub"))
DTYPE = env.text("PROTOKERN_BENCH_DTYPE", "float32")
TF32 = env.flag("PROTOKERN_BENCH_TF32")
THREADS = env.integer("PROTOKERN_BENCH_THREADS", 2)
ROUNDS = env.integer("PROTOKERN_BENCH_ROUNDS", 20 if DEVICE == "cuda" else 5)
MEASURE_MEMORY = env.flag("PROTOKERN_BENCH_MEMORY", default=True)
if env.number("PROTOKERN_BENCH_MEMORY_CAP_GB") is not None:
    MEMORY_CAP = int(env.number("PROTOKERN_BENCH_MEMORY_CAP_GB") * 2**30)
elif DEVICE == "cuda" and torch.cuda.is_available():
    MEMORY_CAP = int(0.9 * torch.cuda.get_device_properties(0).total_memory)
else:
    MEMORY_CAP = 4 << 30
if DTYPE not in DTYPES:
    raise ValueError(f"PROTOKERN_BENCH_DTYPE must be one of {list(DTYPES)}, got {DTYPE!r}")

WARMUP_ROUNDS = 1
ON_DEVICE = DEVICE == "cpu" or torch.cuda.is_available()
CONTENDERS = (exclude_contenders(DEVICE, all_contenders(DEVICE),
                                 env.text("PROTOKERN_BENCH_EXCLUDE"))
              if ON_DEVICE else [])


@pytest.fixture(scope="module")
def memory_runner():
    """Fresh processes for CPU peak-memory measurement (in-process on CUDA)."""
    return IsolatedRunner() if DEVICE == "cpu" and MEASURE_MEMORY else None


@pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("contender", CONTENDERS, ids=lambda c: c.name)
@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_min_distance(benchmark, memory_runner, shape, pass_name, contender):
    estimate = contender.estimate_bytes(shape, DTYPES[DTYPE], pass_name)
    if estimate > MEMORY_CAP:
        pytest.skip(f"{contender.name} on {shape.name} {pass_name}: estimated peak "
                    f"{estimate / 2**30:.1f} GiB > cap {MEMORY_CAP / 2**30:.1f} GiB")
    benchmark.group = f"{shape.name} ({shape.describe()}) {DTYPE} {pass_name}"
    if DEVICE == "cpu":
        torch.set_num_threads(THREADS)
    set_precision(DEVICE, TF32)
    x, prototypes, grad = make_inputs(shape, DTYPES[DTYPE], DEVICE)
    step = contender.make_step(x, prototypes, grad, pass_name)

    event_times: list[float] = []

    def timed_round() -> None:
        # on CUDA the round also waits for the GPU, so the host clock sees the whole call
        if DEVICE == "cuda":
            event_times.append(cuda_event_seconds(step))
        else:
            step()

    benchmark.pedantic(timed_round, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)

    info = benchmark.extra_info
    info.update(contender=contender.name, kind=contender.kind, device=DEVICE, dtype=DTYPE,
                tf32=TF32, threads=torch.get_num_threads() if DEVICE == "cpu" else None,
                gemm_flops=shape.gemm_flops())
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        if DEVICE == "cuda":
            timed = event_times[WARMUP_ROUNDS:]
            assert len(timed) == ROUNDS, (len(event_times), ROUNDS)
            info["cuda_event_times_s"] = timed
            info.update({f"cuda_event_{key}": value for key, value in summarize(timed).items()})
            median = info["cuda_event_median_s"]
        info["tflops"] = shape.gemm_flops() / median / 1e12
    if MEASURE_MEMORY:
        spec = CaseSpec(shape, DTYPE, DEVICE, contender.name, pass_name, repeats=1, warmup=1,
                        threads=THREADS, tf32=TF32)
        measured = (memory_runner.run(spec, "memory") if memory_runner
                    else run_case(spec, "memory"))
        info["peak_memory_bytes"] = measured.get("peak_bytes")
        info["memory_method"] = measured.get("memory_method", measured.get("reason"))
