"""Long runs and concurrency: thousands of calls keep the resident set flat, and calls made in
several threads at once, each under its own `pk.use_backend`, each get their own backend's
results, bit for bit.

The soak runs only with ``PROTOKERN_BIG_TESTS=1`` (minutes). The threads test runs in CI with a
few calls per thread, and with many under ``PROTOKERN_BIG_TESTS=1``. Both take every backend
on every device (`cases.backend_params`), but not the ``backend`` fixture: its recording of
every call would itself grow the resident set.
"""

import gc
import threading
from collections import Counter

import pytest
import torch
from cases import BIG, backend_params, big, default_device, interpreted, random_inputs
from helpers import assert_bitwise_equal, forward_backward

import protokern as pk
from protokern.bench.measure import rss_bytes

SHAPES = ((2, 4, 5, 5), (6, 4))
"""Small, and 1x1 prototypes in float32: every backend runs them (the cuda kernels take no
windows)."""

SOAK_CALLS = 10_000
INTERPRETED_SOAK_CALLS = 1_000
"""Triton's interpreter spends about 0.2 s of CPU on one forward+backward even at `SHAPES` (the
cpu backend 1 ms, the reference 2 ms): 10^4 calls would take over half an hour, 10^3 take
about 4 minutes."""
WARM_UP = 100
RSS_GROWTH = 20 * 2**20
"""Resident-set growth allowed after the warm-up: what a leak of a few hundred bytes per call
would pass, but no leak of a tensor, a graph or a kernel launch's arguments."""


def _calls(i: int, x: torch.Tensor, p: torch.Tensor) -> None:
    """Call ``i`` of the soak: min_distance forward and backward, metrics in turn, and every
    tenth call distance_map's too."""
    metric = ("sqeuclidean", "cosine")[i % 2]
    values, _ = pk.min_distance(x, p, metric)
    torch.autograd.grad(values.sum(), (x, p))
    if i % 10 == 0:
        torch.autograd.grad(pk.distance_map(x, p, metric).sum(), (x, p))


def _resident() -> int:
    gc.collect()
    return rss_bytes("VmRSS")


@big
@pytest.mark.parametrize("backend_on_device", backend_params())
def test_repeated_calls_keep_the_resident_set_flat(backend_on_device, record_property):
    name, device = backend_on_device
    calls = INTERPRETED_SOAK_CALLS if interpreted(name) else SOAK_CALLS
    with default_device(device), pk.use_backend(name):
        x, p = random_inputs(*SHAPES, requires_grad=True)
        with pk.recording() as ran:
            for i in range(WARM_UP):
                _calls(i, x, p)
        assert {backend for _, backend in ran} == {name}
        start = _resident()
        cuda_start = torch.cuda.memory_allocated() if device == "cuda" else 0
        samples = []
        for i in range(calls):
            _calls(i, x, p)
            if (i + 1) % (calls // 10) == 0:
                samples.append(_resident() - start)
        if device == "cuda":  # every tensor a call made is freed
            assert torch.cuda.memory_allocated() <= cuda_start
    growth = [round(s / 2**20, 2) for s in samples]
    record_property("rss_start_mb", round(start / 2**20, 1))
    record_property("rss_growth_mb_every_tenth", growth)
    print(f"{name} on {device}: {calls} calls, RSS {start / 2**20:.1f} MB after the warm-up, "
          f"growth (MB) every tenth of the calls: {growth}")
    assert max(samples) <= RSS_GROWTH, f"RSS grew by {max(samples) / 2**20:.1f} MB: {growth}"


def test_threads_under_different_backends_get_their_own_results():
    """One thread per backend and device, all calling at once, each in its own use_backend block:
    each call gives what the same call gives alone, and each backend ran exactly its thread's
    kernels."""
    pairs = [param.values[0] for param in backend_params()]
    rounds = {pair: (60 if interpreted(pair[0]) else 300) if BIG else 3 for pair in pairs}
    x, p = random_inputs(*SHAPES, device="cpu")
    weights = torch.randn(x.shape[0], p.shape[0], device="cpu")
    inputs = {pair: (x.to(pair[1]), p.to(pair[1]), weights.to(pair[1])) for pair in pairs}

    def run(pair):
        x, p, weights = inputs[pair]
        return (*forward_backward(x, p, "sqeuclidean", weights),
                pk.distance_map(x, p, "cosine"))

    alone = {}
    for pair in pairs:
        with pk.use_backend(pair[0]):
            alone[pair] = run(pair)

    start = threading.Barrier(len(pairs))
    results = {pair: [] for pair in pairs}
    chosen, errors = {}, []

    def worker(pair):
        try:
            start.wait()
            with pk.use_backend(pair[0]):
                for _ in range(rounds[pair]):
                    results[pair].append(run(pair))
                chosen[pair] = pk.get_backend()
        except BaseException as error:  # re-raised below, in the test's thread
            errors.append(error)
            start.abort()

    with pk.recording() as ran:
        threads = [threading.Thread(target=worker, args=(pair,)) for pair in pairs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]

    assert chosen == {pair: pair[0] for pair in pairs}
    expected = Counter()
    for (name, _), count in rounds.items():
        for op in ("min_distance", "min_distance_backward", "distance_map"):
            expected[op, name] += count
    assert Counter(ran) == expected
    names = ("values", "indices", "x.grad", "prototypes.grad", "distance map")
    for pair in pairs:
        assert len(results[pair]) == rounds[pair]
        for i, result in enumerate(results[pair]):
            assert_bitwise_equal(result, alone[pair], f"{pair[0]} on {pair[1]}, call {i} in "
                                 "a thread vs alone", names)
