"""The cpu backend's own threads (csrc/cpu/task_pool.h): the kernels' tasks run on the calling
thread and on helper threads of protokern's, not in OpenMP regions. What could go wrong there:
an ATen BLAS call inside a task starting threads of its own (a helper is not an OpenMP thread),
two Python threads calling at once, a forked child that has none of its parent's threads, and a
result that depends on who ran which task."""

import multiprocessing
import os
import threading

import pytest
import torch
from helpers import torch_threads

import protokern as pk
from protokern.backends import cpu

pytestmark = pytest.mark.skipif(
    "cpu" not in pk.available_backends("cpu"),
    reason="the C++ extension is not built (pip install --no-build-isolation -e .)",
)


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _forward_backward(x: torch.Tensor, prototypes: torch.Tensor, metric: str = "sqeuclidean"):
    x = x.detach().requires_grad_()
    prototypes = prototypes.detach().requires_grad_()
    with pk.use_backend("cpu"):
        values, indices = pk.min_distance(x, prototypes, metric)
    values.backward(torch.linspace(-1, 1, values.numel()).reshape(values.shape).to(values))
    return values.detach(), indices, x.grad, prototypes.grad


def _inputs(seed: int, dtype=torch.float32, positions: int = 7, dim: int = 32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(24, dim, positions, positions, generator=generator, dtype=dtype)
    prototypes = torch.randn(600, dim, 1, 1, generator=generator, dtype=dtype)
    return x, prototypes


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


@pytest.mark.skipif(not hasattr(os, "listdir") or not os.path.isdir("/proc/self/task"),
                    reason="counts threads through /proc (Linux)")
def test_blas_inside_tasks_starts_no_threads(two_threads):
    """The forward's BLAS tiles (float64 always; float32 with cpu.gemm("blas")) and the
    one-position backward's products run on the pool's threads with one BLAS thread each: were
    MKL to see an ordinary thread with two allowed, it would start an OpenMP team for it (it
    does at these sizes: a (392, 256) x (256, 256) product from a Python thread started one)."""
    torch.mm(torch.randn(512, 512), torch.randn(512, 512))  # OpenMP's team for this thread
    _forward_backward(*_inputs(0))  # the pool's helper; products too small for MKL to thread
    started = _os_threads()
    with cpu.gemm("blas"):
        for dtype in (torch.float32, torch.float64):
            for positions in (7, 1):
                for metric in ("sqeuclidean", "cosine"):
                    _forward_backward(*_inputs(1, dtype, positions, dim=256), metric)
    assert _os_threads() == started


def test_concurrent_callers_get_what_one_caller_gets(two_threads):
    """Four Python threads calling at once (one holds the pool, a call that finds it busy runs its
    tasks on its own thread): every result is bit-identical to a call alone."""
    cases = [_inputs(seed, torch.float32, positions) for seed, positions in
             ((2, 7), (3, 1), (4, 5), (5, 7))]
    alone = [_forward_backward(*case) for case in cases]
    together: dict[int, list] = {}

    def call(which: int) -> None:
        together[which] = [_forward_backward(*cases[which]) for _ in range(5)]

    threads = [threading.Thread(target=call, args=(which,)) for which in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a concurrent call did not return"
    for which, expected in enumerate(alone):
        for result in together[which]:
            for got, want in zip(result, expected, strict=True):
                assert torch.equal(got, want)


def _child(queue) -> None:
    before = _os_threads()
    results = _forward_backward(*_inputs(6))
    # As numpy arrays: a tensor sent through a queue travels in shared memory that the sender
    # must keep alive until it is received.
    queue.put(([result.numpy() for result in results], before, _os_threads()))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs the fork start method")
def test_forked_child_runs_the_kernels(two_threads):
    """A child forked after the parent used the pool has none of its helpers: it starts its own
    (a pool inherited as it was would believe its helpers exist, never start one, and re-pin the
    parent's threads by their ids), computes what the parent computes, and returns."""
    expected = _forward_backward(*_inputs(6))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue,))
    child.start()
    try:
        got, before, after = queue.get(timeout=120)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert after > before, "the child started no helper of its own"
    for result, want in zip(got, expected, strict=True):
        assert torch.equal(torch.from_numpy(result), want)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_any_thread_count_gives_the_same_bits(threads):
    """More threads than cores, and more than the pool has helpers yet: the same results."""
    with torch_threads(1):
        expected = _forward_backward(*_inputs(7, torch.float32, 6))
    with torch_threads(threads):
        got = _forward_backward(*_inputs(7, torch.float32, 6))
    for result, want in zip(got, expected, strict=True):
        assert torch.equal(result, want)
