"""What the contract tests (tests/test_ops.py, run on every backend) do not cover for the C++
``cpu`` backend: tile boundaries, gradients vs the reference, thread-count independence,
determinism and the kernel-level argument checks."""

import pytest
import torch
from cases import METRICS  # the C++ kernels' ("dot" is refused: tests/test_pooling_ops.py)
from helpers import assert_matches_brute_force

import protokern as pk
from protokern.backends import reference
from protokern.ops import canonicalize
from protokern.testing import TOLERANCE, relative_error

pytestmark = pytest.mark.skipif(
    "cpu" not in pk.available_backends("cpu"),
    reason="the C++ extension is not built (pip install --no-build-isolation -e .)",
)

# The kernel packs ceil(384 / L) images per GEMM tile and 256 prototypes per block, and its
# exact recompute runs 32 (float) / 16 (double) lanes at a time: these shapes cross each of
# those boundaries, with remainders everywhere.
TILE_CASES = {
    # B, D, H, W, M, ph, pw
    "two-image-blocks-L49": (9, 16, 7, 7, 37, 1, 1),
    "three-prototype-blocks": (3, 8, 5, 5, 2 * 256 + 37, 1, 1),
    "large-D-odd": (2, 611, 3, 4, 19, 1, 1),
    "large-D-patch": (2, 83, 5, 6, 300, 2, 3),
    "one-image-per-block": (3, 5, 21, 20, 11, 1, 1),
    "L1-many-images": (400, 33, 1, 1, 260, 1, 1),
}


def _inputs(case: str, dtype: torch.dtype):
    batch, dim, height, width, num, ph, pw = TILE_CASES[case]
    x = torch.randn(batch, dim, height, width, dtype=dtype)
    prototypes = torch.randn(num, dim, ph, pw, dtype=dtype)
    return x, prototypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", TILE_CASES)
def test_tile_boundaries(case, metric, dtype):
    x, prototypes = _inputs(case, dtype)
    with pk.use_backend("cpu"):
        values, indices = pk.min_distance(x, prototypes, metric)
    assert_matches_brute_force(x, prototypes, metric, values, indices)


def _grads(backend: str, x, prototypes, metric, weights):
    x = x.detach().clone().requires_grad_()
    prototypes = prototypes.detach().clone().requires_grad_()
    with pk.use_backend(backend):
        values, indices = pk.min_distance(x, prototypes, metric)
        (values * weights).sum().backward()
    return values, indices, x.grad, prototypes.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", ["two-image-blocks-L49", "large-D-patch", "L1-many-images"])
def test_gradients_match_the_reference(case, metric, dtype):
    x, prototypes = _inputs(case, dtype)
    if dtype == torch.bfloat16:  # keep half-precision ties out of the comparison
        x, prototypes = x[:2], prototypes[:40]
    weights = torch.rand(x.shape[0], prototypes.shape[0], dtype=dtype)
    values, indices, grad_x, grad_p = _grads("cpu", x, prototypes, metric, weights)
    # the reference's gradients through the indices the kernel chose, in float64
    xd, pd = x.double(), prototypes.double()
    x4, p4, _ = canonicalize(xd, pd, metric, "test")
    ref_x, ref_p = reference.min_distance_backward(weights.double(), x4, p4, indices, metric)
    tol = TOLERANCE[dtype]
    assert grad_x.dtype == dtype and grad_p.dtype == dtype
    assert grad_x.shape == x.shape and grad_p.shape == prototypes.shape
    assert relative_error(grad_x, ref_x) <= tol
    assert relative_error(grad_p, ref_p) <= tol


# (B, D, H, W) for the 8 x 8 block transpose that packs 1x1 windows of float32 channels-first
# maps and folds their gradient back (csrc/cpu/transpose.cpp): whole blocks, remainders along
# both axes, fewer than 8 of either (edges only), one row.
TRANSPOSE_MAPS = [(3, 16, 8, 8), (2, 19, 5, 7), (2, 7, 3, 3), (2, 33, 1, 9), (1, 8, 2, 13)]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", TRANSPOSE_MAPS, ids=lambda s: "x".join(map(str, s)))
def test_block_transposed_windows_match_the_element_walk(shape, metric):
    """Packing: a contiguous map takes the block transpose over whole planes, one whose rows
    are padded (stride_h > W) a block transpose per row, one with every other column in memory
    (stride_w = 2) the element-by-element walk. Packing only moves values, so all three give
    bit-identical values, indices and gradients. Folding (grad_x is contiguous whatever x's
    layout, so all three fold by the block transpose): the gradients match the reference's."""
    batch, dim, height, width = shape
    x = torch.randn(batch, dim, height, width)
    padded = torch.zeros(batch, dim, height, width + 3)[..., :width]
    padded.copy_(x)
    strided = torch.zeros(batch, dim, height, 2 * width)[..., ::2]
    strided.copy_(x)
    prototypes = torch.randn(37, dim, 1, 1)
    weights = torch.randn(batch, 37)

    def run(layout):  # as _grads, but x's strides reach the kernel (clone() would drop them)
        view = layout.detach().requires_grad_()
        protos = prototypes.clone().requires_grad_()
        assert view.stride() == layout.stride()
        with pk.use_backend("cpu"):
            values, indices = pk.min_distance(view, protos, metric)
            (values * weights).sum().backward()
        return values, indices, view.grad, protos.grad

    assert padded.stride(2) == width + 3 and strided.stride(3) == 2
    walked = run(strided)
    for layout in (x, padded):
        for got, want in zip(run(layout), walked, strict=True):
            assert torch.equal(got, want)
    _, indices, grad_x, grad_p = walked
    x4, p4, _ = canonicalize(x.double(), prototypes.double(), metric, "test")
    ref_x, ref_p = reference.min_distance_backward(weights.double(), x4, p4, indices, metric)
    assert relative_error(grad_x, ref_x) <= TOLERANCE[torch.float32]
    assert relative_error(grad_p, ref_p) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("metric", METRICS)
def test_tokens_and_channels_last_gradients(metric):
    tokens = torch.randn(5, 13, 24)
    prototypes = torch.randn(70, 24)
    weights = torch.randn(5, 70)
    _, indices, grad_t, grad_p = _grads("cpu", tokens, prototypes, metric, weights)
    _, ref_indices, ref_t, ref_p = _grads("reference", tokens.double(), prototypes.double(),
                                          metric, weights.double())
    assert torch.equal(indices, ref_indices)
    assert relative_error(grad_t, ref_t) <= TOLERANCE[torch.float32]
    assert relative_error(grad_p, ref_p) <= TOLERANCE[torch.float32]

    fmap = torch.randn(3, 16, 6, 5).to(memory_format=torch.channels_last)
    protos = torch.randn(9, 16, 2, 2)
    weights = torch.randn(3, 9)
    _, indices, grad_x, grad_p = _grads("cpu", fmap, protos, metric, weights)
    _, ref_indices, ref_x, ref_p = _grads("reference", fmap.double(), protos.double(), metric,
                                          weights.double())
    assert torch.equal(indices, ref_indices)
    assert relative_error(grad_x, ref_x) <= TOLERANCE[torch.float32]
    assert relative_error(grad_p, ref_p) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("metric", METRICS)
def test_results_do_not_depend_on_the_thread_count(metric):
    """Work is split into tasks by the thread count; every sum runs in a fixed order anyway."""
    x, prototypes = _inputs("three-prototype-blocks", torch.float32)
    weights = torch.randn(x.shape[0], prototypes.shape[0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads("cpu", x, prototypes, metric, weights)
        torch.set_num_threads(3)
        three = _grads("cpu", x, prototypes, metric, weights)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three, strict=True):
        assert torch.equal(a, b)


def test_repeated_runs_are_bitwise_equal():
    x, prototypes = _inputs("large-D-patch", torch.float32)
    weights = torch.randn(x.shape[0], prototypes.shape[0])
    first = _grads("cpu", x, prototypes, "sqeuclidean", weights)
    second = _grads("cpu", x, prototypes, "sqeuclidean", weights)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_values_are_the_exact_distance_at_the_index():
    """The value is recomputed at the chosen position, not read off the GEMM expansion, so a
    small distance next to large norms keeps its digits."""
    x = 1000 + torch.rand(2, 64, 6, 6)
    prototypes = x[:, :, 2, 3] + 1e-3 * torch.randn(2, 64)
    with pk.use_backend("cpu"):
        values, indices = pk.min_distance(x, prototypes)
    chosen = x.flatten(2)[torch.arange(2)[:, None], :, indices]  # (B, M, D)
    exact = (chosen.double() - prototypes.double()).square().sum(-1)
    assert relative_error(values, exact) <= TOLERANCE[torch.float32]
    assert (indices.diagonal() == 2 * 6 + 3).all()  # each prototype near its own image's (2, 3)


@pytest.mark.parametrize("num", [5, 1 << 20], ids=["small", "million"])
@pytest.mark.parametrize("bad_value", [9, -1])
def test_kernel_refuses_out_of_range_indices(num, bad_value):
    """Below a million indices they are checked on the calling thread, from there in a parallel
    pass (csrc/cpu/glue.h): both find one bad index among good ones, at either end."""
    x, prototypes = torch.randn(2, 1, 3, 3), torch.randn(num, 1, 1, 1)
    grad = torch.ones(2, num)
    bad = torch.randint(0, 9, (2, num))
    bad[1, num // 2] = bad_value
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 9\)"):
        torch.ops.protokern_cpu.min_distance_backward(grad, x, prototypes, bad, "sqeuclidean",
                                                      True, True)


def test_kernel_checks_its_arguments():
    with pytest.raises(ValueError, match="x has 4 channels but prototypes have 3"):
        torch.ops.protokern_cpu.min_distance(torch.randn(1, 4, 3, 3), torch.randn(2, 3, 1, 1),
                                             "sqeuclidean", 0.0)
    with pytest.raises(TypeError, match="must share a dtype.*Float and Double"):
        torch.ops.protokern_cpu.min_distance(torch.randn(1, 4, 3, 3),
                                             torch.randn(2, 4, 1, 1).double(), "sqeuclidean", 0.0)
    with pytest.raises(ValueError, match="unknown metric 'manhattan'"):
        torch.ops.protokern_cpu.min_distance(torch.randn(1, 4, 3, 3), torch.randn(2, 4, 1, 1),
                                             "manhattan", 0.0)


def test_cpu_is_the_default_for_cpu_tensors():
    assert pk.available_backends("cpu")[0] == "cpu"


@pytest.mark.parametrize("metric", METRICS)
def test_single_position_path_with_nan_inf_and_huge(metric):
    """L = 1 takes the GEMM tile's values where certified: rows and prototypes with NaN, inf or
    huge norms are recomputed directly, and give NaN, inf and huge values exactly as the
    reference does (and index 0)."""
    tokens = torch.randn(6, 1, 37)
    prototypes = torch.randn(13, 37)
    tokens[1, 0, 5] = float("nan")
    tokens[2, 0, 3] = float("inf")
    tokens[3] *= 1e20
    prototypes[4, 7] = float("nan")
    with pk.use_backend("cpu"):
        values, indices = pk.min_distance(tokens, prototypes, metric)
    with pk.use_backend("reference"):  # exact in float64, returned in float32 (inf past its range)
        ref_values, _ = pk.min_distance(tokens, prototypes, metric)
    assert (indices == 0).all()
    assert torch.equal(values.isnan(), ref_values.isnan())
    assert torch.equal(values.isinf(), ref_values.isinf())
    torch.testing.assert_close(values, ref_values, equal_nan=True, rtol=1e-5, atol=0)


@pytest.mark.parametrize("metric", METRICS)
def test_single_position_values_survive_cancellation(metric):
    """L = 1 keeps the GEMM expansion's value only where its rounding bound certifies it: a
    prototype on (or next to) its vector far from the origin, where the expansion cancels every
    digit, is recomputed directly (0 on the vector), and every value, certified or not, is
    within the float32 tolerance of the float64 truth."""
    torch.manual_seed(0)
    tokens = 1000 + torch.randn(300, 1, 96)  # 300 rows: a tile edge inside the first block
    prototypes = 1000 + torch.randn(270, 96)  # a second prototype block of 14
    prototypes[:5] = tokens[:5, 0]
    prototypes[5:10] = tokens[5:10, 0] + 1e-3 * torch.randn(5, 96)
    with pk.use_backend("cpu"):
        values, indices = pk.min_distance(tokens, prototypes, metric)
    with pk.use_backend("reference"):
        ref_values, _ = pk.min_distance(tokens.double(), prototypes.double(), metric)
    assert (indices == 0).all()
    if metric == "sqeuclidean":
        assert (values[torch.arange(5), torch.arange(5)] == 0).all()
    assert relative_error(values, ref_values) <= TOLERANCE[torch.float32]


SINGLE_POSITION_INPUTS = ("float32-tokens", "window-as-large-as-a-channels_last-map",
                          "bfloat16-tokens", "float64-tokens")


@pytest.mark.parametrize("inputs", SINGLE_POSITION_INPUTS)
@pytest.mark.parametrize("metric", METRICS)
def test_single_position_across_blocks(metric, inputs):
    """With one position the GEMM writes blocks of rows x prototypes straight into the values
    (1024 x 1024 with BLAS; the packed GEMM's 384 x 256 are tests/backends/test_cpu_gemm.py's)
    and certifies them in place: rows and prototypes past a block's edge, read from x itself
    (contiguous float32 tokens) or from a packed copy (a window as large as a channels_last map,
    bfloat16 tokens; float64 in double blocks), match the brute force, every index 0."""
    torch.manual_seed(1)
    batch, num = 1024 + 37, 1024 + 29
    if inputs == "window-as-large-as-a-channels_last-map":
        x = torch.randn(batch, 3, 2, 2).to(memory_format=torch.channels_last)
        prototypes = torch.randn(num, 3, 2, 2)
    else:
        dtype = getattr(torch, inputs.split("-")[0])
        x = torch.randn(batch, 1, 6, dtype=dtype)  # (B, L = 1, D) tokens
        prototypes = torch.randn(num, 6, dtype=dtype)
    with pk.use_backend("cpu"):
        values, indices = pk.min_distance(x, prototypes, metric)
    assert (indices == 0).all()
    assert_matches_brute_force(x, prototypes, metric, values, indices)


@pytest.mark.parametrize("batch", [3, 300])  # 240 B of indices (the heap), 24 MB (a mapping)
def test_single_position_indices_are_fresh_zeros(batch):
    """The one-position indices are zeros the kernel never writes (zeros_untouched in
    csrc/cpu/huge_pages.h): they read as 0 even where the memory of an earlier call's indices,
    overwritten and freed, is handed out again, and they can be written like any tensor."""
    x, p = torch.randn(batch, 4, 1, 1), torch.randn(10000, 4)
    with pk.use_backend("cpu"):
        for _ in range(3):
            _, indices = pk.min_distance(x, p)
            assert indices.shape == (batch, 10000) and (indices == 0).all()
            indices.fill_(-1)  # the next call may get these bytes back
            assert (indices == -1).all()
            del indices


def _vm_flags_at(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(end, 16) for end in head.split("-"))
                inside = low <= address < high
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _transparent_huge_pages() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read()
    except OSError:
        return ""


@pytest.mark.skipif(not _transparent_huge_pages() or "[never]" in _transparent_huge_pages(),
                    reason="needs Linux with transparent huge pages not set to 'never'")
def test_large_outputs_ask_for_huge_pages():
    """Outputs of 8 MB and more are advised MADV_HUGEPAGE before the kernel writes them (fresh
    4 KiB pages cost 11-14 ms per 41 MB on first touch on the 2-core hosts: benchmarks/NOTES.md,
    "Page faults at one position"), forward and backward; the values are the same either way."""
    x = torch.randn(300, 4, 1, 1, requires_grad=True)
    p = torch.randn(10000, 250, 1, 1)[:, :4].contiguous().requires_grad_()  # grad_p 160 KB
    with pk.use_backend("cpu"):
        values, indices = pk.min_distance(x, p)  # 12 MB and 24 MB
        big = torch.randn(10000, 300, 1, 1, requires_grad=True)  # grad of 12 MB
        near, _ = pk.nearest_prototypes(big, torch.randn(7, 300), k=1)
        near.sum().backward()
    for tensor in (values, indices, big.grad):
        middle = tensor.data_ptr() + tensor.numel() * tensor.element_size() // 2
        assert "hg" in _vm_flags_at(middle), tensor.shape
    assert_matches_brute_force(x.detach(), p.detach(), "sqeuclidean", values, indices)
