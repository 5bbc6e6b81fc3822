"""PrototypeHead.forward on the ``cil_vectors`` shape vs torch.cdist and matmul baselines.

``cil_vectors`` (DESIGN §6): 1,024 query vectors of dim 768 against 10,000 prototypes (one per
class), float32, CPU. Every contender returns the same ``(1024, 10000)`` logits:

- ``head``: `protokern.heads.PrototypeHead.forward` (one `protokern.min_distance` over
  ``(N, 1, D)`` tokens, then scale/mask), once per CPU backend of this install;
- ``cdist``: ``-torch.cdist(x, P).square()`` (sqeuclidean) or ``cdist`` of L2-normalised
  inputs turned into cosine similarity;
- ``matmul``: ``2 x P^T - |x|^2 - |P|^2`` (sqeuclidean) or ``normalize(x) @ normalize(P)^T``.

Every contender does all its work inside the timed call (the cosine ones normalise there).
Time: pytest-benchmark, on ``PROTOKERN_BENCH_THREADS`` CPU threads (default 2, as
``test_bench_min_distance.py``). Peak memory: each case also runs once in a fresh subprocess,
which builds its inputs, runs the case once to warm up, then resets the kernel's RSS high-water mark
(``VmHWM``) to the current RSS by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0),
runs the case again and reports ``VmHWM - VmRSS before``: the extra resident memory the call
needed, ATen allocations included (tracemalloc would not see them). glibc is told to serve
allocations above 64 KiB with mmap (`protokern.bench.measure.fix_malloc_threshold`), so freed
tensors go back to the kernel and a reused heap cannot hide a peak. Reported in
``extra_info["peak_mib"]``.

    pytest benchmarks/test_bench_cil_heads.py --benchmark-only
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import protokern as pk
from protokern import env
from protokern.heads import PrototypeHead

QUERIES, DIM, CLASSES = 1024, 768, 10_000
THREADS = env.integer("PROTOKERN_BENCH_THREADS", 2)
METRICS = ("cosine", "sqeuclidean")

# Runs in the subprocess: builds the inputs, then one named case (see _case below).
_MEMORY_SCRIPT = r"""
import json, sys
sys.path.insert(0, {bench_dir!r})
from protokern.bench.measure import fix_malloc_threshold, peak_of_next_call
fix_malloc_threshold(64 * 1024)
import test_bench_cil_heads as bench

run = bench._case({contender!r}, {metric!r}, {backend!r})
run()
peak, out = peak_of_next_call(run)
print(json.dumps({{"peak_bytes": peak, "output_bytes": out.numel() * out.element_size()}}))
"""

def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(QUERIES, DIM, generator=generator)
    means = torch.randn(CLASSES, DIM, generator=generator)
    return queries, means


def _case(contender: str, metric: str, backend: str | None):
    """A zero-argument callable returning the ``(QUERIES, CLASSES)`` logits of one case.

    Every contender does all its work (normalisation included) inside the callable, and runs
    on `THREADS` threads (here and in the memory subprocess, which calls this too)."""
    torch.set_num_threads(THREADS)
    queries, means = _inputs()
    if contender == "head":
        head = PrototypeHead(DIM, CLASSES, metric=metric)
        head.update(means, torch.arange(CLASSES))  # one sample per class: prototype = it

        def run():
            with torch.no_grad(), pk.use_backend(backend):
                return head(queries)
        return run
    if contender == "cdist":
        if metric == "cosine":
            # normalising inside the timed call, as matmul and the head do (|a - b|^2 = 2 - 2cos)
            return lambda: 1 - torch.cdist(torch.nn.functional.normalize(queries, dim=1),
                                           torch.nn.functional.normalize(means, dim=1)
                                           ).square() / 2
        return lambda: -torch.cdist(queries, means).square()
    if contender == "matmul":
        if metric == "cosine":
            return lambda: (torch.nn.functional.normalize(queries, dim=1)
                            @ torch.nn.functional.normalize(means, dim=1).T)
        return lambda: (2 * queries @ means.T - queries.square().sum(1, keepdim=True)
                        - means.square().sum(1))
    raise ValueError(f"unknown contender {contender!r}")


def _peak_mib(contender: str, metric: str, backend: str | None) -> float:
    script = _MEMORY_SCRIPT.format(bench_dir=os.path.dirname(os.path.abspath(__file__)),
                                   contender=contender, metric=metric, backend=backend)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20


# The reference backend is left out: at L = 1 it recomputes every (query, prototype) distance
# directly in float64 for its exact selection (8e9 gathered elements here); on this project's
# 2-core machine 256 queries x 500 prototypes already took 50 s, so this shape would take hours.
CASES = ([("head", backend) for backend in pk.available_backends("cpu") if backend != "reference"]
         + [("cdist", None), ("matmul", None)])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("contender,backend", CASES,
                         ids=[f"{c}-{b}" if b else c for c, b in CASES])
def test_cil_vectors_forward(benchmark, contender, backend, metric):
    run = _case(contender, metric, backend)
    benchmark.group = f"cil_vectors {metric} {QUERIES}x{DIM} vs {CLASSES} float32 cpu"
    benchmark.extra_info["peak_mib"] = round(_peak_mib(contender, metric, backend), 1)
    benchmark.extra_info["memory_method"] = "VmHWM after clear_refs reset minus VmRSS"
    logits = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert logits.shape == (QUERIES, CLASSES)
