"""Issue 10, part 4: sizes past 2**31 elements work, or fail with a ValueError naming the limit
before any kernel runs; never a wrong answer or a crash.

- ``B M L > 2**31`` (distances per call): the fused cpu kernel never holds them; it runs such a
  call in CI (a few seconds, a few MB). The reference runs it only with
  ``PROTOKERN_BIG_TESTS=1`` (9 minutes: it loops over a few prototypes at a time).
- Offsets past 2**31 elements (``B L D``, ``M D`` and every stride product): a view with huge
  strides into a large allocation that is never touched except where the view's elements lie,
  so it costs a few pages of memory, not 4-8 GB (on CUDA tensors the allocation is real: 4 GB
  of GPU memory per test); every backend must give bit for bit what it
  gives on a compact copy of the same values, values and gradients. A real ``B L D > 2**31``
  float16 x (4 GB) runs only with ``PROTOKERN_BIG_TESTS=1``.
- ``L >= 2**31`` positions per image: the fused backends refuse with a ValueError naming the
  limit, checked on a stride-0 view (nothing allocated).
- Triton's launch grids: CUDA allows 65535 programs along a grid's y and z axes; larger
  problems are refused with a ValueError naming the limit (checked with stride-0 prototypes).
"""

import pytest
import torch
from cases import METRICS, backend_params, big, interpreted
from helpers import assert_matches_brute_force, forward_backward

import protokern as pk
from protokern.ops import canonicalize

INT31 = 2**31


def _lattice_and_prototypes(batch: int, side: int, num: int):
    """Tokens (B, side**2, 2): the points of a centred side x side lattice of spacing 1/8, each
    image in its own order; prototypes: chosen lattice points moved by (1/64, 1/128). Every
    nearest position is known and clearly ahead of the runner-up (far past the GEMM's rounding,
    so the kernel takes its fast path), and every minimum is exactly 1/64**2 + 1/128**2."""
    ij = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1)
    points = (ij.reshape(-1, 2) - side // 2).float() / 8  # exact in float32
    length = side * side
    perms = torch.stack([torch.randperm(length) for _ in range(batch)])  # (B, L)
    chosen = torch.randint(0, length, (num,))
    prototypes = points[chosen] + torch.tensor([1 / 64, 1 / 128])
    where = torch.empty_like(perms)  # where[b, k]: the position of lattice point k in image b
    where.scatter_(1, perms, torch.arange(length).expand(batch, -1).contiguous())
    return points[perms], prototypes, where[:, chosen], 1 / 64**2 + 1 / 128**2


def _check_lattice_answer(backend: str, batch: int, side: int, num: int) -> None:
    x, prototypes, want_indices, want_value = _lattice_and_prototypes(batch, side, num)
    length = side * side
    assert batch * num * length > INT31
    with pk.use_backend(backend), torch.no_grad():
        values, indices = pk.min_distance(x, prototypes)
    assert torch.equal(indices, want_indices)
    assert ((values.double() - want_value).abs() <= 1e-5 * want_value).all()


def test_cpu_more_than_2_31_distances_in_one_call():
    """B M L = 2**31 + 2**17: 2 images of 65536 tokens against 16385 prototypes."""
    if "cpu" not in pk.available_backends("cpu"):
        pytest.skip("cpu extension not built")
    _check_lattice_answer("cpu", 2, 256, 2**14 + 1)


@big
@pytest.mark.parametrize("backend", backend_params(
    where=lambda name, device: device != "cpu" or not (name == "cpu" or interpreted(name))),
    indirect=True)
def test_more_than_2_31_distances_in_one_call(backend):
    """The reference on CPU tensors: 9 minutes on 2 cores; every backend on CUDA tensors. (The
    cpu backend runs this in CI, above; Triton's interpreter would take about an hour: its one
    B M L offset, into distance_map's output, is computed in int64.)"""
    _check_lattice_answer(backend, 2, 256, 2**14 + 1)


# ----------------------------------------------------------------------------------------------
# Offsets past 2**31 elements, from views with huge strides into an untouched allocation


def _huge_view(shape: tuple, strides: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A ``shape`` view with ``strides`` (in elements) into a fresh allocation just large enough,
    holding random values; only the pages under the view's elements are ever touched."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(shape, strides, strict=True))
    try:
        storage = torch.empty(extent, dtype=dtype)  # virtual: untouched pages cost nothing
    except RuntimeError as error:  # vm.overcommit_memory = 2 on a small machine, a small GPU
        pytest.skip(f"cannot reserve {extent * dtype.itemsize / 2**30:.0f} GB of address "
                    f"space: {error}")
    view = storage.as_strided(shape, strides)
    view.copy_(torch.randn(shape))
    return view


# (what, x shape, x strides, prototypes shape, prototypes strides): each makes one product of an
# index and a stride pass 2**31 while every factor fits in 32 bits
HUGE_STRIDES = {
    # image 2 starts at 2 * (2**30 + 3): B L D past 2**31
    "images": ((3, 5, 4, 3), (2**30 + 3, 12, 3, 1), (4, 5, 2, 2), (20, 4, 2, 1)),
    # channel 4 at 4 * (2**29 + 1)
    "channels": ((2, 5, 3, 4), (12, 2**29 + 1, 4, 1), (3, 5, 1, 1), (5, 1, 1, 1)),
    # map row 2 at 2 * (2**30 + 5)
    "rows": ((2, 3, 3, 4), (12, 4 * 3 * 4, 2**30 + 5, 3), (3, 3, 2, 3), (18, 6, 3, 1)),
    # prototype 2 at 2 * (2**30 + 1): M D past 2**31
    "prototypes": ((2, 6, 4, 4), (96, 16, 4, 1), (3, 6, 2, 2), (2**30 + 1, 4, 2, 1)),
    # prototype window row 2 at 2 * (2**30 + 7) (the triton backward's gather reads it)
    "prototype-rows": ((2, 2, 5, 4), (40, 20, 4, 1), (3, 2, 3, 2), (12, 6, 2**30 + 7, 1)),
}


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", sorted(HUGE_STRIDES))
def test_offsets_past_2_31_elements(backend, case, metric, deterministic):
    x_shape, x_strides, p_shape, p_strides = HUGE_STRIDES[case]
    dtype = torch.float16  # the allocations stay below 8 GB of virtual memory
    x = _huge_view(x_shape, x_strides, dtype)
    prototypes = _huge_view(p_shape, p_strides, dtype)
    last = max(sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
               for t in (x, prototypes))
    assert last >= INT31
    weights = torch.randn(x.shape[0], prototypes.shape[0], dtype=dtype)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        huge = forward_backward(x, prototypes, metric, weights)
        compact = forward_backward(x.contiguous(), prototypes.contiguous(), metric, weights)
    finally:
        torch.use_deterministic_algorithms(was)
    assert_matches_brute_force(x, prototypes, metric, huge[0], huge[1])
    names = ("values", "indices", "x.grad", "prototypes.grad")
    for name, a, b in zip(names, huge, compact, strict=True):
        assert torch.equal(a, b), f"{name} differ from those of a compact copy"


# ----------------------------------------------------------------------------------------------
# What must be refused, and how


def _expanded_map(height: int, width: int) -> torch.Tensor:
    """A (1, 1, height, width) map of one stored element (stride 0): any size, no memory."""
    return torch.randn(1, 1, 1, 1).expand(1, 1, height, width)


@pytest.mark.parametrize("backend", backend_params(where=lambda name, _: name != "reference"),
                         indirect=True)
def test_too_many_positions_per_image_is_a_value_error(backend):
    """The fused backends (the reference has no such limit)."""
    x = _expanded_map(2**16, 2**15 + 1)  # 2**31 + 2**16 positions
    prototypes = torch.randn(3, 1)
    with pytest.raises(ValueError, match=r"2\^31"):
        pk.min_distance(x, prototypes)


@pytest.mark.skipif("triton" not in pk.available_backends(), reason="triton unavailable")
def test_triton_refuses_grids_past_cuda_limits():
    """M past 65535 blocks of prototypes: a ValueError naming the limit, before any launch (on
    CPU tensors in the interpreter, else on CUDA tensors)."""
    device = "cpu" if interpreted("triton") else "cuda"
    num = 65536 * 256  # past 65535 blocks of the largest BLOCK_M of any configuration
    prototypes = torch.randn(1, 2, device=device).expand(num, 2)  # stride 0: no memory
    x = torch.randn(1, 3, 2, device=device)
    with pk.use_backend("triton"):
        with pytest.raises(ValueError, match="65535"):
            pk.min_distance(x, prototypes)
        with pytest.raises(ValueError, match="65535"):
            pk.distance_map(x, prototypes)
        x4, p4, _ = canonicalize(x, prototypes, "sqeuclidean", "test")
        from protokern.backends.triton.min_distance_backward import min_distance_backward
        with pytest.raises(ValueError, match="65535"):
            min_distance_backward(torch.ones(1, num, device=device), x4, p4,
                                  torch.zeros(1, num, dtype=torch.int64, device=device),
                                  "sqeuclidean")


@big
def test_more_than_2_31_elements_of_x(backend):
    """A real float16 x of B L D = 2**31 + 2**15 elements (4 GB): the last images, addressed
    past 2**31, give what they give alone."""
    dim = 2**15
    batch = INT31 // dim + 1
    x = torch.empty(batch, 1, dim, dtype=torch.float16)
    x[:-2] = 0.5
    x[-2:] = torch.randn(2, 1, dim)
    prototypes = torch.randn(3, dim, dtype=torch.float16)
    with torch.no_grad():
        values, indices = pk.min_distance(x, prototypes)
        tail_values, tail_indices = pk.min_distance(x[-2:].clone(), prototypes)
    assert torch.equal(values[-2:], tail_values) and torch.equal(indices[-2:], tail_indices)
