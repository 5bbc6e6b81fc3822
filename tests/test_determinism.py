"""Issue 10, part 6: under ``torch.use_deterministic_algorithms(True)`` two runs give bitwise-equal
values, indices and gradients on every backend (the ``backend`` fixture: on CPU tensors, and on
CUDA tensors where CUDA is present).

Under deterministic mode the GPU paths are: triton, the bucketed-gather backward instead of
atomics and the first configuration of autotuned kernels (`launch.Tuned`, tested below); cuda,
an order-independent 64-bit atomicMin of packed (distance, position) keys forward and the
counting-sort backward instead of atomics. The cpu
kernel's forward and its backward with more than one position are also independent of the
thread count (documented in protokern/backends/cpu.py), which is checked too.
"""

import contextlib

import pytest
import torch
from cases import HALF_PRECISION, METRICS, random_inputs
from helpers import assert_bitwise_equal, forward_backward

import protokern as pk
from protokern import env


def _maps():
    return random_inputs((3, 8, 5, 6), (7, 8))


def _tokens():
    return random_inputs((4, 9, 16), (11, 16))


def _patch_2x2():
    return random_inputs((2, 6, 5, 5), (5, 6, 2, 2))


def _single_position():  # L' = 1: the cpu kernel's no-GEMM path and its BLAS backward
    return random_inputs((5, 1, 10), (6, 10))


def _ties():
    """Every position of a map repeats one of two columns, and prototypes repeat each other:
    ties everywhere, in the choice and in the gradient sums (several prototypes per position)."""
    columns = torch.randn(2, 6, 2)
    pattern = torch.randint(0, 2, (4, 5))
    x = columns[:, :, pattern]  # (2, 6, 4, 5)
    prototypes = torch.randn(3, 6).repeat(3, 1)
    return x, prototypes


CASES = {"maps": _maps, "tokens": _tokens, "patch-2x2": _patch_2x2,
         "single-position": _single_position, "ties": _ties}


@contextlib.contextmanager
def _deterministic(threads: int):
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(was_threads)
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("metric", METRICS)
def test_two_runs_are_bitwise_equal(backend, case, metric, threads):
    x, prototypes = CASES[case]()
    weights = torch.randn(x.shape[0], prototypes.shape[0])
    with _deterministic(threads):
        first = forward_backward(x, prototypes, metric, weights)
        second = forward_backward(x, prototypes, metric, weights)
    assert_bitwise_equal(first, second, f"two runs, {backend}, {case}, {metric}, {threads} threads")
    # the runs computed something: a gradient reached both inputs
    assert first[2].abs().sum() > 0 and first[3].abs().sum() > 0


@pytest.mark.parametrize("dtype", [*HALF_PRECISION, torch.float64])
@pytest.mark.parametrize("metric", METRICS)
def test_two_runs_are_bitwise_equal_in_other_dtypes(backend, metric, dtype):
    x, prototypes = _patch_2x2()
    x, prototypes = x.to(dtype), prototypes.to(dtype)
    weights = torch.randn(x.shape[0], prototypes.shape[0], dtype=dtype)
    with _deterministic(2):
        first = forward_backward(x, prototypes, metric, weights)
        second = forward_backward(x, prototypes, metric, weights)
    assert_bitwise_equal(first, second, f"two runs, {backend}, {dtype}, {metric}")


@pytest.mark.skipif("cpu" not in pk.available_backends("cpu"), reason="cpu extension not built")
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("metric", METRICS)
def test_cpu_kernel_does_not_depend_on_the_thread_count(case, metric):
    """The cpu forward is exact (a fixed-order recompute) and its backward with more than one
    position sums in a fixed order whatever the thread count; its single-position backward is
    two BLAS products, deterministic for a given thread count only (protokern/backends/cpu.py
    says so)."""
    x, prototypes = CASES[case]()
    x = x.repeat(9, *[1] * (x.dim() - 1))  # enough images for several tasks per thread
    weights = torch.randn(x.shape[0], prototypes.shape[0])
    with pk.use_backend("cpu"):
        with _deterministic(1):
            one = forward_backward(x, prototypes, metric, weights)
        with _deterministic(2):
            two = forward_backward(x, prototypes, metric, weights)
    if case == "single-position":
        one, two = one[:2], two[:2]
    assert_bitwise_equal(one, two, f"cpu, {case}, {metric}, 1 vs 2 threads")


def test_deterministic_setting_is_restored(backend):
    x, prototypes = _maps()
    with _deterministic(1):
        forward_backward(x, prototypes, "sqeuclidean", torch.ones(x.shape[0], prototypes.shape[0]))
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.skipif("triton" not in pk.available_backends(), reason="triton unavailable")
def test_autotuned_triton_kernels_launch_their_first_config_when_deterministic():
    """On a GPU the forward and distance_map kernels are autotuned, and the timings may pick
    another configuration in another process (other block sizes, other rounding, another winner
    among near-ties); under deterministic algorithms `launch.Tuned` always runs the first."""
    import triton
    import triton.language as tl

    from protokern.backends.triton import launch

    @triton.jit
    def block_of(out_ptr, n, BLOCK: tl.constexpr):
        tl.store(out_ptr + tl.program_id(0), BLOCK + n * 0)

    kernel = launch.Tuned(block_of, [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})],
                          key=["n"])
    device = "cpu" if env.flag("TRITON_INTERPRET") else "cuda"  # where triton runs kernels
    out = torch.zeros(2, dtype=torch.int32, device=device)
    with _deterministic(1):
        kernel[(2,)](out, 5)
        assert out.tolist() == [16, 16]
        kernel.configs = kernel.configs[::-1]  # what tests narrowing the configs do
        kernel[(2,)](out, 5)
        assert out.tolist() == [32, 32]
    # otherwise the autotuner runs (one configuration: timing several needs a GPU driver)
    kernel.configs = [triton.Config({"BLOCK": 64})]
    kernel[(2,)](out, 7)
    assert out.tolist() == [64, 64]
