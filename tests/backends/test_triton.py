"""The Triton kernels beyond the op contract (which test_ops.py runs on them through the
``backend`` fixture): block boundaries, the deterministic and atomic backward paths, gradients
against the reference, 64-bit addressing, registration and torch.compile.

Without a GPU they run on CPU tensors in Triton's interpreter (conftest sets TRITON_INTERPRET);
tests marked ``cuda`` need a real GPU (TF32, large shapes) and skip here.
"""

import subprocess
import sys

import pytest
import torch
from brute_force import distances
from cases import DTYPES, METRICS, random_inputs
from helpers import (
    assert_gradients_at_own_positions,
    assert_matches_brute_force,
    brute_force_grads,
    first_k,
    nearest_brute_force,
    pushed_patches,
)

import protokern as pk
from protokern import backends
from protokern.backends import reference
from protokern.ops import canonicalize
from protokern.testing import TF32_TOLERANCE, TOLERANCE, near_tie_ok, relative_error

if "triton" not in pk.available_backends():
    pytest.skip(f"triton backend unavailable: "
                f"{backends.registered_backend('triton').unavailable_reason()}",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from protokern.backends.triton import INTERPRET, launch, tiles  # noqa: E402
from protokern.backends.triton import distance_map as distance_map_module  # noqa: E402
from protokern.backends.triton import min_distance as min_distance_module  # noqa: E402
from protokern.backends.triton import min_distance_backward as backward_module  # noqa: E402
from protokern.backends.triton import nearest_prototypes as nearest_module  # noqa: E402
from protokern.backends.triton import topk_distance as topk_module  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton():
    with pk.use_backend("triton"):
        yield


def _use_config(monkeypatch, kernel, config: triton.Config) -> None:
    """Launch ``kernel`` (fixed or autotuned) with ``config`` only, for this test."""
    if isinstance(kernel, launch.Fixed):
        monkeypatch.setattr(kernel, "config", config)
    else:
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(kernel, "cache", {})


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 everywhere, so that small shapes cross every block boundary."""
    tile = triton.Config({"BLOCK_ROWS": 16, "BLOCK_M": 16, "BLOCK_K": 16}, num_warps=2)
    _use_config(monkeypatch, min_distance_module._choose_kernel, tile)
    _use_config(monkeypatch, distance_map_module._distance_map_kernel, tile)
    pairs = triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=2)
    monkeypatch.setattr(min_distance_module, "EXACT", pairs)
    monkeypatch.setattr(backward_module, "PAIRS", pairs)
    monkeypatch.setattr(backward_module, "PIXELS", triton.Config({"BLOCK_D": 16}, num_warps=1))


# name -> (x shape, prototypes shape), against blocks of 16 rows, prototypes and entries
BOUNDARY_CASES = {
    # L = 35 positions: three chunks of 16, the last ragged; M = 37: three prototype blocks
    "chunks-of-positions": ((2, 3, 5, 7), (37, 3)),
    # L = 6 (2x3 windows of 3x4): two images per 16-row tile (8 rows each), B = 3 ragged;
    # K = 5 * 2 * 2 = 20 entries: two blocks of 16
    "images-per-tile": ((3, 5, 3, 4), (17, 5, 2, 2)),
    # L = 1: sixteen images per tile, B = 18 ragged; K = 40: three blocks
    "L1": ((18, 40, 1, 1), (5, 40)),
    "tokens": ((3, 9, 7), (15, 7)),
}


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", BOUNDARY_CASES)
def test_block_boundaries(small_blocks, case, metric):
    x, p = random_inputs(*BOUNDARY_CASES[case], requires_grad=True, device=DEVICE)
    values, indices = pk.min_distance(x, p, metric)
    assert_matches_brute_force(x, p, metric, values, indices)
    dmap = pk.distance_map(x, p, metric)
    assert relative_error(dmap.flatten(2), distances(x, p, metric)) <= TOLERANCE[torch.float32]
    weights = torch.randn_like(values)
    for deterministic in (False, True) if case == "images-per-tile" else (False,):
        torch.use_deterministic_algorithms(deterministic)
        try:
            grad_x, grad_p = torch.autograd.grad((values * weights).sum(), (x, p),
                                                 retain_graph=True)
        finally:
            torch.use_deterministic_algorithms(False)
        ref_x, ref_p = brute_force_grads(x, p, metric, weights)
        assert relative_error(grad_x, ref_x) <= TOLERANCE[torch.float32]
        assert relative_error(grad_p, ref_p) <= TOLERANCE[torch.float32]


def _backward_inputs(x_shape, p_shape, metric, dtype):
    """Canonical inputs, the triton forward's positions and random incoming gradients."""
    x, p = random_inputs(x_shape, p_shape, dtype, device=DEVICE)
    x4, p4, _ = canonicalize(x.detach(), p.detach(), metric, "test")
    _, indices = min_distance_module.min_distance(x4, p4, metric)
    grad = torch.randn(indices.shape, device=DEVICE).to(dtype)
    return grad, x4, p4, indices


# (x shape, prototypes shape): 1x1, a 2x3 patch, tokens; several prototypes share positions
PATCHES = {"1x1": ((3, 6, 4, 5), (40, 6)), "2x3": ((2, 5, 4, 5), (30, 5, 2, 3)),
           "tokens": ((4, 7, 9), (25, 9))}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("patch", PATCHES)
def test_backward_matches_reference_at_the_same_positions(patch, metric, dtype):
    """Both scatter paths and the gather against the reference's backward, given the same
    positions (so a near-tie choice cannot differ), for every metric, patch and dtype."""
    grad, x4, p4, indices = _backward_inputs(*PATCHES[patch], metric, dtype)
    want_x, want_p = reference.min_distance_backward(grad, x4, p4, indices, metric)
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            got_x, got_p = backward_module.min_distance_backward(grad, x4, p4, indices, metric)
        finally:
            torch.use_deterministic_algorithms(False)
        assert got_x.dtype == dtype and got_p.dtype == dtype
        assert got_x.shape == x4.shape and got_p.shape == p4.shape
        assert relative_error(got_x, want_x) <= TOLERANCE[dtype]
        assert relative_error(got_p, want_p) <= TOLERANCE[dtype]


@pytest.mark.parametrize("deterministic", [False, True])
def test_sqeuclidean_gradients_of_prototypes_on_their_patches(deterministic):
    """ProtoPNet after push: each prototype within 1e-4 of its patch, so the gradients
    2 g (p - x) are ~1e-4 of the entries; 2 g p - 2 g x cancels to float32's eps of the
    entries there (1e-3 relative), the difference taken first does not."""
    x, p = pushed_patches(DEVICE)
    torch.use_deterministic_algorithms(deterministic)
    try:
        assert_gradients_at_own_positions(x, p, "sqeuclidean", TOLERANCE[torch.float32])
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("metric", METRICS)
def test_deterministic_path_is_bitwise_reproducible_and_agrees_with_atomics(metric):
    grad, x4, p4, indices = _backward_inputs(*PATCHES["2x3"], metric, torch.float32)
    torch.use_deterministic_algorithms(True)
    try:
        first = backward_module.min_distance_backward(grad, x4, p4, indices, metric)
        second = backward_module.min_distance_backward(grad, x4, p4, indices, metric)
    finally:
        torch.use_deterministic_algorithms(False)
    atomic = backward_module.min_distance_backward(grad, x4, p4, indices, metric)
    for a, b, c in zip(first, second, atomic, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_deterministic_path_with_every_prototype_on_one_position():
    """One bucket holds every prototype (a pushed prototype bank): the pixel sums them all."""
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    x[:, :, 1, 1] = 10.0  # far from everything else, the nearest window for all prototypes
    p = (10.0 + 0.1 * torch.randn(50, 4, device=DEVICE))
    grad = torch.randn(2, 50, device=DEVICE)
    x4, p4, _ = canonicalize(x, p, "sqeuclidean", "test")
    _, indices = min_distance_module.min_distance(x4, p4, "sqeuclidean")
    assert (indices == 4).all()
    want = reference.min_distance_backward(grad, x4, p4, indices, "sqeuclidean")
    torch.use_deterministic_algorithms(True)
    try:
        got = backward_module.min_distance_backward(grad, x4, p4, indices, "sqeuclidean")
    finally:
        torch.use_deterministic_algorithms(False)
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w) <= TOLERANCE[torch.float32]


@triton.jit
def _no_second_pass(x_ptr, p_ptr, values_ptr, indices_ptr, M, L, K, OUT_W, PH, PW,
                    sxb, sxd, sxh, sxw, spm, spd, sph, spw, CONTIGUOUS: tl.constexpr,
                    METRIC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    pass


def test_the_second_pass_gets_only_what_the_tile_cannot_give(monkeypatch):
    """With `_exact_kernel` stubbed out, what `_choose_kernel` alone leaves: a prototype copied
    from a window (the expansion cancels to its rounding) is marked for recomputation at its
    certified position (-2 - position); prototypes far from every window are certified and
    get their values from the tile, which match the float64 brute force."""
    x = torch.randn(2, 16, 3, 3, device=DEVICE)
    p = 5 + 3 * torch.randn(6, 16, device=DEVICE)  # far from every window
    p[0] = x[0, :, 1, 2]  # position 5 of image 0
    monkeypatch.setattr(min_distance_module, "_exact_kernel", _no_second_pass)
    values, codes = pk.min_distance(x, p)
    assert codes[0, 0] == -2 - 5
    assert (codes[:, 1:] >= 0).all()
    assert_matches_brute_force(x, p[1:], "sqeuclidean", values[:, 1:], codes[:, 1:])


def _tf32_operands(monkeypatch) -> None:
    """`_choose_kernel` launched as with TF32 operands (the interpreter's tensors are on the
    CPU, where `launch.dot_precision` says IEEE): ``PRECISION="tf32"``, ``VALUES=False`` for
    L > 1, ``tf32x3`` for L = 1, as `min_distance.gemm_precision` chooses on a GPU."""
    monkeypatch.setattr(min_distance_module, "gemm_precision",
                        lambda x, length: "tf32" if length > 1 else "tf32x3")


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("map_size", [(5, 5), (7, 8)])  # several images a tile (L <= 32), one
def test_tf32_values_come_from_the_first_kernel(monkeypatch, metric, map_size):
    """With TF32 operands (L > 1) the tile's value is never kept, and each certified pair's
    value is computed directly in `_choose_kernel`'s epilogue: with `_exact_kernel` stubbed
    out, every pair holds its final position (no ``-2 - position`` mark left for a second
    pass), a copied window's distance is exactly 0, and the rest match the float64 brute
    force. (Before, every pair was marked and re-read 2 K entries in the second pass.)"""
    x = torch.randn(3, 16, *map_size, device=DEVICE)
    p = 4 + torch.randn(7, 16, device=DEVICE)
    p[0] = x[1, :, 2, 3]
    _tf32_operands(monkeypatch)
    monkeypatch.setattr(min_distance_module, "_exact_kernel", _no_second_pass)
    values, codes = pk.min_distance(x, p, metric)
    assert (codes >= 0).all(), codes
    assert codes[1, 0] == 2 * map_size[1] + 3 and values[1, 0] == 0
    assert_matches_brute_force(x, p, metric, values, codes)


@pytest.mark.parametrize("metric", METRICS)
def test_tf32_second_pass_searches_only_the_undecided(monkeypatch, small_blocks, metric):
    """TF32 operands with both kernels: an image whose norms overflow is searched by the
    second pass, the ordinary images' values come from the first kernel's epilogue, and all
    match the float64 brute force."""
    x = torch.randn(4, 3, 5, 6, device=DEVICE)
    p = torch.randn(20, 3, device=DEVICE)
    x[2] = 1e20 * x[2]
    _tf32_operands(monkeypatch)
    values, indices = pk.min_distance(x, p, metric)
    ordinary = torch.tensor([0, 1, 3])
    assert_matches_brute_force(x[ordinary], p, metric, values[ordinary], indices[ordinary])
    if metric == "cosine":  # scale-free: image 2 is found too
        assert_matches_brute_force(x, p, metric, values, indices)


@pytest.mark.parametrize("metric", METRICS)
def test_undecided_pairs_are_searched_exactly_and_alone(small_blocks, metric):
    """Image 2's norms overflow float32 and it shares tiles with ordinary images: only pairs
    the expansion cannot decide take the exact search, and they find the true minimum."""
    x = torch.randn(5, 2, 4, 4, device=DEVICE)
    p = torch.randn(20, 2, device=DEVICE)
    if metric == "sqeuclidean":  # |x|^2 + |p|^2 overflows for prototype 7, a copy of a window
        x[2] = 1e19 + 1e13 * x[2]
        p[7] = x[2, :, 3, 1]
    else:  # cosine is scale-free; the norms overflow
        x[2] = 1e20 * x[2]
    values, indices = pk.min_distance(x, p, metric)
    ordinary = torch.tensor([0, 1, 3, 4])
    clean = pk.min_distance(x[ordinary], p, metric)
    assert torch.equal(values[ordinary], clean.values)
    assert torch.equal(indices[ordinary], clean.indices)
    if metric == "sqeuclidean":
        assert indices[2, 7] == 3 * 4 + 1 and values[2, 7] == 0
    else:
        assert_matches_brute_force(x, p, metric, values, indices)


# ---------------------------------------------------------------------------------------------
# The running selections (selection.py) of nearest_prototypes and topk_distance


SMALL_TILE = triton.Config({"BLOCK_ROWS": 16, "BLOCK_M": 16, "BLOCK_K": 16}, num_warps=2)


@pytest.mark.parametrize("metric", METRICS)
def test_nearest_search_with_fewer_prototypes_per_tile_than_k(monkeypatch, metric):
    """Rows left to the search (all 40 prototypes tie but two), 16 prototypes per tile of both
    kernels and k = 20: each tile offers its own prototypes once and then nothing. (The
    search offered column 0 again as an infinite distance once a tile's 16 were taken; the
    copies then took several slots at once, and the rows came back with repeated indices.)"""
    _use_config(monkeypatch, nearest_module._nearest_kernel, SMALL_TILE)
    monkeypatch.setattr(nearest_module, "SEARCH", dict.fromkeys(nearest_module.SEARCH, SMALL_TILE))
    p = torch.randn(1, 8, device=DEVICE).expand(40, 8).contiguous()
    p[[5, 33]] = torch.randn(2, 8, device=DEVICE)
    x = torch.randn(5, 8, device=DEVICE)
    values, indices = pk.nearest_prototypes(x, p, k=20, metric=metric)
    want_values, want_indices = first_k(nearest_brute_force(x, p, metric), 20)
    assert torch.equal(indices, want_indices)
    assert relative_error(values, want_values) <= TOLERANCE[torch.float32]


@pytest.fixture
def small_topk_blocks(monkeypatch):
    """Tiles of 16 positions x 16 prototypes x 16 entries, searched 16 prototypes at a time:
    small maps cross every block boundary, and k = 16 keeps 32 slots, more than a tile has
    columns."""
    _use_config(monkeypatch, topk_module._topk_kernel, SMALL_TILE)
    monkeypatch.setattr(topk_module, "SEARCH",
                        triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=2))


def _brute_topk(x, p, metric, k):
    d = distances(x, p, metric)
    values, indices = first_k(d.flatten(0, 1), k)
    return values.view(*d.shape[:2], k), indices.view(*d.shape[:2], k)


@pytest.mark.parametrize("k", [5, 16])
@pytest.mark.parametrize("metric", METRICS)
def test_topk_block_boundaries(small_topk_blocks, metric, k):
    """L = 35 positions (three chunks of 16, the last ragged), M = 37 (three prototype
    blocks), K = 3 * 2 * 2 = 12 windowed entries; both gradients."""
    x, p = random_inputs((2, 3, 6, 8), (37, 3, 2, 2), requires_grad=True, device=DEVICE)
    values, indices = pk.topk_distance(x, p, k, metric)
    want_values, want_indices = _brute_topk(x, p, metric, k)
    assert relative_error(values, want_values) <= TOLERANCE[torch.float32]
    assert torch.equal(indices, want_indices)  # random data: no near-ties
    weights = torch.randn_like(values)
    grad_x, grad_p = torch.autograd.grad((values * weights).sum(), (x, p))
    xd, pd = x.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    picked = distances(xd, pd, metric).gather(-1, want_indices)
    want_x, want_p = torch.autograd.grad((picked * weights.double()).sum(), (xd, pd))
    assert relative_error(grad_x, want_x) <= TOLERANCE[torch.float32]
    assert relative_error(grad_p, want_p) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("metric", METRICS)
def test_topk_pairs_the_bounds_cannot_decide_are_searched(small_topk_blocks, metric):
    """Small integers (exact ties, to the lowest position, from the shortlist), a NaN in
    image 1 (NaN first, at its position), an inf in image 2 (sqeuclidean:
    that position infinitely far; cosine: NaN) and a prototype with an inf entry (the last
    three: the direct search): every pair as the brute force orders it, each position once."""
    x = torch.randint(-1, 2, (3, 2, 4, 5), device=DEVICE).float()
    p = torch.randint(-1, 2, (20, 2), device=DEVICE).float()
    x[1, 0, 3, 2] = float("nan")  # position 17
    x[2, 1, 0, 4] = float("inf")  # position 4
    p[17, 1] = float("inf")
    values, indices = pk.topk_distance(x, p, 16, metric)
    want_values, want_indices = _brute_topk(x, p, metric, 16)
    assert torch.equal(indices, want_indices)
    ordered = indices.sort(-1).values
    assert (ordered[..., 1:] != ordered[..., :-1]).all()
    assert torch.equal(values.isnan(), want_values.isnan())
    assert torch.equal(values.isinf(), want_values.isinf())
    finite = want_values.isfinite()
    assert relative_error(values[finite], want_values[finite]) <= 1e-6


def test_topk_refusals_name_the_bound():
    """k past MAX_TOPK and the dot metric are refused with a reason (the automatic choice
    then runs the reference); the bound itself runs."""
    x, p = torch.randn(1, 3, 5, 4, device=DEVICE), torch.randn(4, 3, device=DEVICE)
    x4, p4, _ = canonicalize(x, p, "sqeuclidean", "test")
    triton_backend = backends.registered_backend("triton")
    from protokern.backends.triton import MAX_TOPK

    assert triton_backend.supports("topk_distance", x4, p4, metric="sqeuclidean",
                                   k=MAX_TOPK) is None
    assert "at most k=16" in triton_backend.supports("topk_distance", x4, p4,
                                                     metric="sqeuclidean", k=MAX_TOPK + 1)
    assert "'dot'" in triton_backend.supports("topk_distance", x4, p4, metric="dot", k=2)
    assert triton_backend.supports("mean_distance", x4, p4, metric="dot") is None
    with pytest.raises(ValueError, match="at most k=16"):
        pk.topk_distance(x, p, MAX_TOPK + 1)


@triton.jit
def _offsets_kernel(out_ptr, image, position, k, OUT_W, PH, PW, s_b, s_d, s_h, s_w):
    tl.store(out_ptr, tiles.window_offsets(image, position, OUT_W, s_b, s_h, s_w))
    tl.store(out_ptr + 1, tiles.entry_offsets(k, PH, PW, s_d, s_h, s_w))


@pytest.mark.parametrize("s_b, s_d", [(3 * 2**30, 1), (1, 2**31 + 5), (2**20, 2**20)])
def test_offsets_do_not_overflow_32_bits(s_b, s_d):
    """Offsets past 2**31 from 32-bit indices and strides (B L D or B M beyond int32)."""
    image, position, k, out_w, ph, pw, s_h, s_w = 1000, 47, 700, 7, 2, 3, 70000, 9
    out = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    _offsets_kernel[(1,)](out, image, position, k, out_w, ph, pw, s_b, s_d, s_h, s_w)
    oh, ow = divmod(position, out_w)
    d, rest = divmod(k, ph * pw)
    i, j = divmod(rest, pw)
    assert out.tolist() == [image * s_b + oh * s_h + ow * s_w, d * s_d + i * s_h + j * s_w]


@triton.jit
def _positions_kernel(out_ptr, start, BLOCK_L: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    row = tl.arange(0, BLOCK_ROWS)
    tl.store(out_ptr + row, tiles.chunk_positions(start, row, BLOCK_L))


def test_chunk_positions_near_two_to_the_31():
    """The last chunk of an image with 2**31 - 1 positions: its padding rows' positions pass
    int32's range (they were computed as ``start + row % BLOCK_L`` in int32 and wrapped to
    negative numbers, which the ``position < L`` mask let through)."""
    start = 2**31 - 4
    out = torch.zeros(16, dtype=torch.int64, device=DEVICE)
    _positions_kernel[(1,)](out, start, BLOCK_L=8, BLOCK_ROWS=16)
    assert out.tolist() == [start + row % 8 for row in range(16)]


def test_tiles_pack_several_images_when_windows_are_few():
    for length, positions in [(49, 64), (1, 1), (196, 128), (16, 16)]:
        meta = {"BLOCK_ROWS": 128, "L": length}
        meta["BLOCK_L"] = launch.positions_per_tile_image(meta)
        assert meta["BLOCK_L"] == positions
        assert launch.images_per_tile(meta) * positions == 128


def test_registration():
    backend = backends.registered_backend("triton")
    assert backend.unavailable_reason() is None
    if INTERPRET:  # interpreted: on CPU tensors too, but never the default
        assert backend.device_types == {"cuda", "cpu"} and backend.priority < 0
        assert pk.available_backends("cpu")[-1] == "triton"
    else:
        assert backend.device_types == {"cuda"} and backend.priority > 0


def test_a_missing_triton_leaves_protokern_importable():
    code = ("import sys; sys.modules['triton'] = None; import protokern as pk; "
            "assert 'triton' not in pk.available_backends(); "
            "print(pk.backends.registered_backend('triton').unavailable_reason())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.startswith("triton is not importable")


def test_compiled_fullgraph_runs_the_triton_kernels():
    """The ops stay opaque custom ops under torch.compile: the graph calls the backend's
    kernels (no graph break) and matches eager."""
    torch._dynamo.reset()
    p = torch.randn(9, 4, 2, 2, device=DEVICE, requires_grad=True)

    def head(features):
        values, indices = pk.min_distance(features, p, "cosine")
        return values.sum() + pk.distance_map(features, p).mean(), indices

    compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 4, 5, 5, device=DEVICE, requires_grad=True)
    with pk.recording() as calls:
        loss, indices = compiled(x)
        loss.backward()
    assert sorted(set(calls)) == [("distance_map", "triton"), ("distance_map_backward", "triton"),
                                  ("min_distance", "triton"), ("min_distance_backward", "triton")]
    grads = x.grad.clone(), p.grad.clone()
    x.grad = p.grad = None
    eager_loss, eager_indices = head(x)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    assert torch.equal(indices, eager_indices)
    for got, want in zip(grads, (x.grad, p.grad), strict=True):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# Real GPU only


@pytest.fixture
def tf32_matmuls():
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    yield
    torch.backends.cuda.matmul.fp32_precision = saved


@pytest.mark.cuda
@pytest.mark.parametrize("metric", METRICS)
def test_tf32_when_pytorch_allows_it(tf32_matmuls, metric):
    x = torch.rand(8, 64, 7, 7, device="cuda")
    p = torch.rand(300, 64, device="cuda")
    assert launch.dot_precision(x) == "tf32" and launch.dot_precision(x.double()) == "ieee"
    values, indices = pk.min_distance(x, p, metric)
    d = distances(x, p, metric)
    chosen = d.gather(-1, indices[..., None])[..., 0]
    assert relative_error(values, chosen) <= TOLERANCE[torch.float32]  # exact at its pick
    assert near_tie_ok(indices, d, TF32_TOLERANCE).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
def test_protopnet_shape_against_reference(metric, dtype):
    """The cub benchmark shape (B 64, D 128, 7x7, M 2000): the autotuned configs."""
    x = torch.rand(64, 128, 7, 7, device="cuda").to(dtype)
    p = torch.rand(2000, 128, device="cuda").to(dtype)
    values, indices = pk.min_distance(x, p, metric)
    with pk.use_backend("reference"):
        ref_values, _ = pk.min_distance(x, p, metric)
    assert relative_error(values, ref_values) <= TOLERANCE[dtype]
    d = distances(x[:4], p, metric)
    assert near_tie_ok(indices[:4], d, TOLERANCE[dtype]).all()
    grad = torch.randn_like(values)
    x4, p4, _ = canonicalize(x, p, metric, "test")
    torch.use_deterministic_algorithms(True)
    try:
        first = backward_module.min_distance_backward(grad, x4, p4, indices, metric)
        second = backward_module.min_distance_backward(grad, x4, p4, indices, metric)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    want = reference.min_distance_backward(grad, x4, p4, indices, metric)
    for got, ref in zip(first, want, strict=True):
        assert relative_error(got, ref) <= TOLERANCE[dtype]


@pytest.mark.cuda
def test_more_than_two_to_the_31_elements():
    """x with B L D > 2**31 (4.3 GB of float16): the last images, addressed past 2**31."""
    batch = 2**31 // (128 * 49) + 2
    x = torch.empty(batch, 128, 7, 7, dtype=torch.float16, device="cuda")
    x[:-3].zero_()
    x[-3:] = torch.rand(3, 128, 7, 7, device="cuda")
    p = torch.rand(5, 128, device="cuda", dtype=torch.float16)
    values, indices = pk.min_distance(x, p)
    tail_values, tail_indices = pk.min_distance(x[-3:].clone(), p)
    assert torch.equal(values[-3:], tail_values) and torch.equal(indices[-3:], tail_indices)
    dmap = pk.distance_map(x, p)
    assert torch.equal(dmap[-3:], pk.distance_map(x[-3:].clone(), p))


def test_the_autotuners_pruning_keeps_the_defaults_of_the_launchs_gpu_dot_and_size(monkeypatch):
    """`launch.pruning` (both kernels' ``prune_configs``) keeps, of every default, the list of
    the launch's target, dot kind and size: L for min_distance, k for nearest_prototypes."""
    from protokern.backends.triton import min_distance, nearest_prototypes

    for capability, target in (((9, 0), "sm_90"), ((8, 6), "sm_80")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None,
                            capability=capability: capability)
        for x, precision, dot in ((torch.empty(1, dtype=torch.bfloat16), "tf32", "half"),
                                  (torch.empty(1), "ieee", "ieee"),
                                  (torch.empty(1), "tf32", "tf32")):
            kept = min_distance.prune_configs(min_distance.CONFIGS, {"x_ptr": x, "L": 49},
                                              PRECISION=precision)
            assert kept == min_distance.configs_for(49, dot, target)
            for k in (1, 9, 64):
                kept = nearest_prototypes.prune_configs(
                    nearest_prototypes.CONFIGS, {"x_ptr": x}, PRECISION=precision, K_NEAREST=k)
                assert kept == nearest_prototypes.configs_for(k, dot, target)
        single = min_distance.prune_configs(min_distance.CONFIGS, {"x_ptr": torch.empty(1),
                                                                   "L": 1}, PRECISION="tf32x3")
        assert single == min_distance.configs_for(1, "tf32x3", target)
    # a list narrowed (by a test) to none of the defaults is kept whole
    other = [triton.Config({"BLOCK_ROWS": 16, "BLOCK_M": 16, "BLOCK_K": 16})]
    assert min_distance.prune_configs(other, {"x_ptr": torch.empty(1), "L": 49},
                                      PRECISION="ieee") == other
