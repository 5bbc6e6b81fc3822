"""The ``cuda`` backend (csrc/cuda/, protokern/backends/cuda.py) against the float64 brute force.

Tests marked ``cuda`` need a GPU and a build of ``protokern._C`` with its CUDA kernels; they skip
without a GPU (tests/conftest.py) and fail, with the reason, on a GPU machine where the kernels
were not built. The unmarked tests run everywhere: the kernels compile with bare nvcc (where
nvcc is on PATH), and the backend's registration and fallbacks.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from brute_force import distances, first_min
from helpers import (
    assert_gradients_at_own_positions,
    assert_matches_brute_force,
    assert_nearest,
    first_k,
    gradients_at,
    nearest_brute_force,
    nearest_gradients_at,
    pushed_patches,
)
from torch.library import opcheck

import protokern as pk
from protokern import backends
from protokern.backends import cuda as cuda_backend
from protokern.ops import canonicalize
from protokern.testing import TF32_TOLERANCE, TOLERANCE, relative_error

ROOT = Path(__file__).resolve().parents[2]
METRICS = ["sqeuclidean", "cosine"]

# name -> (x shape, prototypes shape); a 3-d x is (B, L, D) tokens. The kernels' tiles are
# 64 prototypes x 64 rows x 32 channels: these shapes cut them unevenly, and the token cases
# put many images into one tile of rows.
CASES = {
    "map": ((2, 5, 4, 6), (7, 5)),
    "map-MD11": ((2, 5, 4, 6), (7, 5, 1, 1)),
    "ragged-tiles": ((3, 37, 9, 11), (131, 37)),
    "M1-D3": ((2, 3, 5, 5), (1, 3)),
    "L1-map": ((3, 8, 1, 1), (5, 8)),
    "large-D": ((2, 300, 3, 4), (11, 300)),
    "tokens": ((3, 9, 16), (10, 16)),
    "tokens-L1-many-images": ((70, 1, 40), (65, 40)),
    "tokens-L3-across-tiles": ((50, 3, 24), (70, 24)),
}

# name -> (dtype, float32 matmul precision); "tf32" lets the float32 GEMM use TF32 tensor cores
PRECISIONS = {
    "float32": (torch.float32, "ieee"),
    "tf32": (torch.float32, "tf32"),
    "float16": (torch.float16, "ieee"),
    "bfloat16": (torch.bfloat16, "ieee"),
}


def make(case: str, dtype: torch.dtype, requires_grad: bool = False):
    x_shape, p_shape = CASES[case]
    x = torch.randn(x_shape, device="cuda").to(dtype).requires_grad_(requires_grad)
    p = torch.randn(p_shape, device="cuda").to(dtype).requires_grad_(requires_grad)
    return x, p


@pytest.fixture
def on_cuda_backend():
    """Every op inside the test runs on the cuda backend (an error if it is not available)."""
    with pk.use_backend("cuda"):
        yield


@pytest.fixture(params=PRECISIONS)
def precision(request):
    """(dtype, tolerance) with the float32 matmul precision set for the test, then restored."""
    dtype, fp32_precision = PRECISIONS[request.param]
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = fp32_precision
    yield dtype, TF32_TOLERANCE if request.param == "tf32" else TOLERANCE[dtype]
    torch.backends.cuda.matmul.fp32_precision = saved


# ----------------------------------------------------------------------------------------------
# Everywhere: the kernels compile, the backend is registered and routes what it cannot run.


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_kernels_compile_with_nvcc_for_sm80_and_sm90():
    """Every csrc/cuda/*.cu compiles with bare nvcc, warnings as errors, for sm_80 and sm_90 on
    a machine without a GPU, and every glue compiles against torch's and CUDA's headers and calls
    only kernels the .cu files define. CI's only nvcc check (.ci/run runs this suite): sm_80 is
    the lowest architecture the kernels support, sm_90 the device's."""
    result = subprocess.run([str(ROOT / "csrc" / "cuda" / "compile_check.sh"), "80", "90"],
                            check=False, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr


def test_registered_as_the_cuda_default_above_triton():
    cuda = backends.registered_backend("cuda")
    assert cuda.device_types == frozenset({"cuda"})
    # DESIGN §3: CUDA tensors go to `cuda` if built, else `triton`
    assert cuda.priority > backends.registered_backend("triton").priority
    if not torch.cuda.is_available():
        assert "cuda" not in pk.available_backends()
        assert cuda.unavailable_reason()
        with pytest.raises(RuntimeError, match="'cuda' is not available"):
            pk.set_backend("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("window", [(1, 1), (2, 3)])
def test_says_what_it_runs(dtype, window):
    """1x1 prototypes in float32/16/bf16 run on the kernels; float64 and ph x pw windows are
    refused with the reason (the automatic choice then takes the next backend)."""
    x, p = torch.randn(2, 3, 4, 4, dtype=dtype), torch.randn(5, 3, *window, dtype=dtype)
    reason = cuda_backend.unsupported_reason(x, p, metric="sqeuclidean")
    if dtype == torch.float64:
        assert reason == "the CUDA kernels take float32, float16 and bfloat16, not float64"
    elif window != (1, 1):
        assert reason == "the CUDA kernels take 1x1 prototypes, not a 2x3 window"
    else:
        assert reason is None


@pytest.mark.parametrize("case", ["runs", "k-past-max", "float64", "window", "dot"])
def test_says_what_it_runs_for_nearest_prototypes(case):
    """k up to MAX_K (32) on 1x1 prototypes in float32/16/bf16; past it, float64, windows and
    the dot metric are refused with the reason."""
    dtype = torch.float64 if case == "float64" else torch.float32
    window = (2, 2) if case == "window" else (1, 1)
    x, p = torch.randn(2, 3, 4, 4, dtype=dtype), torch.randn(40, 3, *window, dtype=dtype)
    k = 33 if case == "k-past-max" else cuda_backend.MAX_K
    metric = "dot" if case == "dot" else "cosine"
    reason = cuda_backend.nearest_prototypes_reason(x, p, metric=metric, k=k)
    expected = {
        "runs": None,
        "k-past-max": "the CUDA nearest_prototypes kernel keeps at most k=32 per row (one upper "
                      "bound and one candidate slot per lane of a warp), got k=33",
        "float64": "the CUDA kernels take float32, float16 and bfloat16, not float64",
        "window": "the CUDA kernels take 1x1 prototypes, not a 2x2 window",
        "dot": "the CUDA kernels have no rounding bound for the 'dot' metric (relative to "
               "|x| |p|); the reference runs it",
    }[case]
    assert reason == expected


# ----------------------------------------------------------------------------------------------
# On a GPU: the contract.


@pytest.mark.cuda
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", CASES)
def test_min_distance_matches_brute_force(on_cuda_backend, precision, case, metric):
    dtype, tol = precision
    x, p = make(case, dtype)
    values, indices = pk.min_distance(x, p, metric)
    assert_matches_brute_force(x, p, metric, values, indices, tol)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "tokens-transposed"])
@pytest.mark.parametrize("metric", METRICS)
def test_strided_inputs(on_cuda_backend, metric, layout):
    base = torch.randn(3, 40, 7, 9, device="cuda")
    if layout == "channels_last":
        x = base.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = base[:, ::2, 1:, ::2]
    else:
        x = base.flatten(2).transpose(1, 2)  # (B, L, D) tokens whose channels are strided
    p = torch.randn(70, x.shape[-1] if x.dim() == 3 else x.shape[1], device="cuda")
    values, indices = pk.min_distance(x, p, metric)
    assert_matches_brute_force(x, p, metric, values, indices)


@pytest.mark.cuda
@pytest.mark.parametrize("metric", METRICS)
def test_ties_go_to_the_lowest_index(on_cuda_backend, precision, metric):
    dtype, _ = precision
    x = torch.randn(2, 16, 5, 5, device="cuda").to(dtype)
    for position in (7, 12, 24):  # exact copies of position 3 (0, 3), after it
        x[:, :, position // 5, position % 5] = x[:, :, 0, 3]
    p = torch.cat([x[0, :, 0, 3][None], torch.randn(70, 16, device="cuda").to(dtype)])
    values, indices = pk.min_distance(x, p, metric)
    assert (indices[0, 0] == 3).all()
    if metric == "sqeuclidean":
        assert values[0, 0] == 0  # recomputed exactly: a copy is at distance 0


@pytest.mark.cuda
def test_identical_positions_everywhere_give_index_zero(on_cuda_backend, precision):
    dtype, _ = precision
    x = torch.randn(3, 24, 1, 1, device="cuda").expand(3, 24, 6, 6).contiguous().to(dtype)
    _, indices = pk.min_distance(x, torch.randn(67, 24, device="cuda").to(dtype))
    assert (indices == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("metric", METRICS)
def test_nan_gives_nan_at_the_first_nan_position(on_cuda_backend, precision, metric):
    dtype, tol = precision
    x = torch.randn(3, 20, 4, 5, device="cuda").to(dtype)
    x[1, 4, 2, 1] = float("nan")  # position 11 of image 1
    x[1, 0, 3, 3] = float("nan")  # position 18, later
    p = torch.randn(9, 20, device="cuda").to(dtype)
    p[6, 2] = float("nan")
    values, indices = pk.min_distance(x, p, metric)
    keep = [0, 1, 2, 3, 4, 5, 7, 8]  # the prototypes without NaN
    assert values[1].isnan().all() and (indices[1, keep] == 11).all()
    assert values[:, 6].isnan().all() and (indices[:, 6] == 0).all()
    clean = [0, 2]  # the images without NaN
    assert_matches_brute_force(x[clean], p[keep], metric, values[clean][:, keep],
                               indices[clean][:, keep], tol)


@pytest.mark.cuda
def test_infinite_input_gives_the_true_value(on_cuda_backend, precision):
    dtype, tol = precision
    x = torch.randn(2, 12, 3, 4, device="cuda").to(dtype)
    x[0, 5, 0, 0] = float("inf")  # position 0 of image 0 is infinitely far
    x[1] = float("inf")  # every position of image 1 is
    p = torch.randn(66, 12, device="cuda").to(dtype)
    values, indices = pk.min_distance(x, p, "sqeuclidean")
    assert (indices[0] != 0).all()
    assert_matches_brute_force(x[:1], p, "sqeuclidean", values[:1], indices[:1], tol)
    assert (values[1] == float("inf")).all() and (indices[1] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("metric", METRICS)
def test_huge_magnitudes_do_not_overflow_into_wrong_numbers(on_cuda_backend, metric):
    """|x|^2 overflows float32: such pairs are computed directly (cosine after an exact
    power-of-two scaling), not by the expansion."""
    if metric == "sqeuclidean":  # the distances (~1e27) fit in float32
        x = 1e19 + 1e13 * torch.randn(2, 5, 8, device="cuda")
        p = 1e19 + 1e13 * torch.randn(3, 8, device="cuda")
    else:  # cosine is scale-free
        x = 1e20 * torch.randn(2, 5, 8, device="cuda")
        p = torch.randn(3, 8, device="cuda")
    values, indices = pk.min_distance(x, p, metric)
    true_values, true_indices = first_min(distances(x, p, metric))
    assert relative_error(values, true_values) <= TOLERANCE[torch.float32]
    assert torch.equal(indices, true_indices)
    same = torch.full((1, 2, 3), 1e19, device="cuda")
    assert pk.min_distance(same, same[0, :1], metric).values.item() == 0


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", ["map", "ragged-tiles", "large-D", "tokens-L3-across-tiles"])
def test_gradients_match_brute_force(on_cuda_backend, case, metric, deterministic):
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        x, p = make(case, torch.float32, requires_grad=True)
        values, indices = pk.min_distance(x, p, metric)
        weights = torch.randn_like(values)
        (values * weights).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    ref_x, ref_p = gradients_at(x, p, metric, weights, indices)
    assert x.grad.shape == x.shape and p.grad.shape == p.shape
    assert relative_error(x.grad, ref_x) <= TOLERANCE[torch.float32]
    assert relative_error(p.grad, ref_p) <= TOLERANCE[torch.float32]


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [True, False])
def test_sqeuclidean_gradients_of_prototypes_on_their_patches(on_cuda_backend, deterministic):
    """ProtoPNet after push: every pair's gradient 2 g (p - x) is ~1e-4 of the entries. The
    kernels computed c2 p + c3 x (FMA-contracted), which cancels to float32's eps of the
    entries: ~1e-3 relative error, past the 1e-5 tolerance."""
    x, p = pushed_patches("cuda")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        assert_gradients_at_own_positions(x, p, "sqeuclidean", TOLERANCE[torch.float32])
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("shape", [((2, 5, 16), (3, 16)), ((2, 16, 3, 3), (70, 16)),
                                   ((3, 1, 40), (5, 40))])
def test_cosine_gradients_of_huge_norms(on_cuda_backend, shape, deterministic):
    """Norms ~1e21, past sqrt(float32 max) ~ 1.8e19: |v|^2 overflows float32 and the
    coefficients ~ g / |v|^2 (~1e-42) underflow it, though the gradients (~1e-21) are in
    range. With float32 coefficients the x term was lost (|x|^2 = inf) and the scale
    subnormal (a few bits); in double both are right. Maps, tokens and one position per
    image."""
    x_shape, p_shape = shape
    x = 1e20 * torch.randn(x_shape, device="cuda")
    p = 1e20 * torch.randn(p_shape, device="cuda")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        assert_gradients_at_own_positions(x, p, "cosine", TOLERANCE[torch.float32])
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
def test_half_precision_gradients(on_cuda_backend, dtype, metric):
    x, p = make("ragged-tiles", dtype, requires_grad=True)
    values, indices = pk.min_distance(x, p, metric)
    weights = torch.randn_like(values)
    (values * weights).sum().backward()
    ref_x, ref_p = gradients_at(x, p, metric, weights, indices)
    assert x.grad.dtype == dtype and p.grad.dtype == dtype
    assert relative_error(x.grad, ref_x) <= TOLERANCE[dtype]
    assert relative_error(p.grad, ref_p) <= TOLERANCE[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("metric", METRICS)
def test_deterministic_scatter_is_reproducible_bit_for_bit(on_cuda_backend, metric):
    """Many prototypes choose the same few positions, so the scatter into x collides a lot."""
    x = torch.randn(4, 64, 3, 3, device="cuda")
    p = (x[:, :, 1, 1].repeat(100, 1) + 0.01 * torch.randn(400, 64, device="cuda"))
    x.requires_grad_()
    p.requires_grad_()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        grads = []
        for _ in range(3):
            values, _ = pk.min_distance(x, p, metric)
            grads.append(torch.autograd.grad(values.sum(), (x, p)))
    finally:
        torch.use_deterministic_algorithms(False)
    for grad_x, grad_p in grads[1:]:
        assert torch.equal(grad_x, grads[0][0]) and torch.equal(grad_p, grads[0][1])
    atomic = torch.autograd.grad(pk.min_distance(x, p, metric).values.sum(), (x, p))
    assert relative_error(atomic[0], grads[0][0]) <= TOLERANCE[torch.float32]
    assert relative_error(atomic[1], grads[0][1]) <= TOLERANCE[torch.float32]


@pytest.mark.cuda
def test_empty_batch(on_cuda_backend):
    x = torch.randn(0, 8, 3, 3, device="cuda", requires_grad=True)
    p = torch.randn(5, 8, device="cuda", requires_grad=True)
    values, indices = pk.min_distance(x, p)
    assert values.shape == indices.shape == (0, 5)
    values.sum().backward()
    assert (p.grad == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("metric", METRICS)
def test_opcheck(on_cuda_backend, metric):
    x, p = make("ragged-tiles", torch.float32, requires_grad=True)
    x4, p4, _ = canonicalize(x, p, metric, "test")
    opcheck(torch.ops.protokern.min_distance, (x4, p4, metric, "cuda"))


@pytest.mark.cuda
def test_patches_and_float64_are_refused_with_the_reason(on_cuda_backend):
    x = torch.randn(2, 6, 5, 6, device="cuda", dtype=torch.float64)
    p = torch.randn(9, 6, device="cuda", dtype=torch.float64)
    with pytest.raises(ValueError, match="'cuda' cannot run this call.*not float64"):
        pk.min_distance(x, p)
    patches = torch.randn(9, 6, 2, 3, device="cuda")
    with pytest.raises(ValueError, match="'cuda' cannot run this call.*not a 2x3 window"):
        pk.min_distance(x.float(), patches)


@pytest.mark.cuda
def test_the_automatic_choice_runs_what_cuda_refuses_elsewhere():
    x = torch.randn(2, 6, 5, 6, device="cuda", dtype=torch.float64)
    p = torch.randn(9, 6, device="cuda", dtype=torch.float64)
    patches = torch.randn(9, 6, 2, 3, device="cuda")
    with pk.recording() as calls:
        values, indices = pk.min_distance(x, p)
        assert_matches_brute_force(x, p, "sqeuclidean", values, indices)
        values, indices = pk.min_distance(x.float(), patches)
        assert_matches_brute_force(x.float(), patches, "sqeuclidean", values, indices)
        values, indices = pk.min_distance(x.float(), p.float())
    # the next backend in priority order that supports the call: triton where installed
    runner_up = "triton" if "triton" in pk.available_backends("cuda") else "reference"
    assert [name for _, name in calls] == [runner_up, runner_up, "cuda"]


@pytest.mark.cuda
def test_kernel_glue_errors_name_the_problem_and_the_shapes():
    import protokern._C  # noqa: F401

    op = torch.ops.protokern_cuda.min_distance
    x = torch.randn(2, 4, 3, 3, device="cuda")
    with pytest.raises(ValueError, match=r"1x1 prototypes.*\[5, 4, 2, 2\]"):
        op(x, torch.randn(5, 4, 2, 2, device="cuda"), "sqeuclidean", False)
    with pytest.raises(TypeError, match=r"float32, float16 and bfloat16.*Double"):
        op(x.double(), torch.randn(5, 4, 1, 1, device="cuda").double(), "sqeuclidean", False)
    with pytest.raises(ValueError, match="unknown metric 'manhattan'"):
        op(x, torch.randn(5, 4, 1, 1, device="cuda"), "manhattan", False)
    with pytest.raises(ValueError, match=r"one CUDA device.*cpu"):
        op(x, torch.randn(5, 4, 1, 1), "sqeuclidean", False)
    with pytest.raises(ValueError, match=r"\(B, D, H, W\).*\[5, 3, 1, 1\]"):
        op(x, torch.randn(5, 3, 1, 1, device="cuda"), "sqeuclidean", False)


# ----------------------------------------------------------------------------------------------
# On a GPU: nearest_prototypes against the float64 brute force (tests/helpers.py). The search
# takes 64 rows per block against tiles of 64 prototypes: these shapes cut both unevenly.

# name -> (x shape, prototypes shape, k); x is (B, D, H, W), (B, L, D) tokens or (N, D) vectors
NEAREST_CASES = {
    "vectors-k1": ((70, 24), (130, 24), 1),
    "map-k3": ((2, 37, 9, 11), (131, 37), 3),
    "tokens-k9": ((3, 11, 40), (300, 40), 9),
    "k-equals-M": ((65, 16), (7, 16), 7),
    "k-max": ((40, 20), (100, 20), cuda_backend.MAX_K),
    "large-D": ((2, 300, 3, 4), (11, 300), 4),
    "M1": ((9, 8), (1, 8), 1),
}


def make_nearest(case: str, dtype: torch.dtype, requires_grad: bool = False):
    x_shape, p_shape, k = NEAREST_CASES[case]
    x = torch.randn(x_shape, device="cuda").to(dtype).requires_grad_(requires_grad)
    p = torch.randn(p_shape, device="cuda").to(dtype).requires_grad_(requires_grad)
    return x, p, k


@pytest.mark.cuda
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", NEAREST_CASES)
def test_nearest_matches_brute_force(on_cuda_backend, precision, case, metric):
    dtype, tol = precision
    x, p, k = make_nearest(case, dtype)
    with pk.recording() as calls:
        values, indices = pk.nearest_prototypes(x, p, k, metric)
    assert calls == [("nearest_prototypes", "cuda")]
    assert_nearest(x, p, metric, k, values, indices, tol)


@pytest.mark.cuda
@pytest.mark.parametrize("metric", METRICS)
def test_nearest_duplicated_prototypes_tie_to_the_lowest_index(on_cuda_backend, precision,
                                                                metric):
    dtype, tol = precision
    x = torch.randn(70, 16, device="cuda").to(dtype)
    base = torch.randn(6, 16, device="cuda").to(dtype)
    p = torch.cat([base, base, base[:2]])  # prototype m and m + 6 (and m + 12) are equal
    values, indices = pk.nearest_prototypes(x, p, k=3, metric=metric)
    want_values, want_indices = first_k(nearest_brute_force(x, p, metric), 3)
    assert torch.equal(indices.cpu(), want_indices.cpu())
    assert relative_error(values, want_values) <= tol


@pytest.mark.cuda
@pytest.mark.parametrize("metric", METRICS)
def test_nearest_more_near_ties_than_slots_are_searched_directly(on_cuda_backend, metric):
    """100 copies of each row's nearest prototype: more candidates than the 32 slots, so the
    rows go to the direct search, which keeps the lowest copies."""
    x = torch.randn(5, 24, device="cuda")
    p = torch.cat([torch.randn(40, 24, device="cuda"), x[2:3].expand(100, 24),
                   torch.randn(30, 24, device="cuda")])
    values, indices = pk.nearest_prototypes(x, p, k=4, metric=metric)
    assert torch.equal(indices[2].cpu(), torch.arange(40, 44))
    if metric == "sqeuclidean":
        assert (values[2] == 0).all()
    assert_nearest(x, p, metric, 4, values, indices)


@pytest.mark.cuda
def test_nearest_identical_distances_give_indices_0_to_k(on_cuda_backend, precision):
    dtype, _ = precision
    p = torch.randn(1, 32, device="cuda").to(dtype).expand(19, 32).contiguous()
    values, indices = pk.nearest_prototypes(torch.randn(70, 32, device="cuda").to(dtype), p,
                                            k=19)
    assert torch.equal(indices.cpu(), torch.arange(19).expand(70, 19))
    assert (values == values[:, :1]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["float32", "tf32"], indirect=True)
def test_nearest_prototype_on_a_patch_is_found_exactly(on_cuda_backend, precision):
    """A prototype equal to a patch, beside a near-duplicate (1e-4 away: float32 only, half
    types would round it onto the patch): distance 0 at its index, which the expansion alone
    (TF32's in particular) would lose to cancellation."""
    dtype, _ = precision
    x = torch.sigmoid(torch.randn(2, 128, 4, 4, device="cuda")).to(dtype)
    patch = x[1, :, 2, 3].clone()
    near = patch + (1e-4 * torch.randn(128, device="cuda")).to(dtype)
    p = torch.cat([near[None], torch.rand(70, 128, device="cuda").to(dtype), patch[None]])
    values, indices = pk.nearest_prototypes(x, p, k=2)
    assert indices[1, 2, 3, 0] == 71 and values[1, 2, 3, 0] == 0


@pytest.mark.cuda
@pytest.mark.parametrize("metric", METRICS)
def test_nearest_nan_rows_and_prototypes(on_cuda_backend, precision, metric):
    """A NaN in a row: that row's values NaN at indices 0..k-1 (the reference's); a NaN
    prototype comes first in every row; the other rows as without the NaN row."""
    dtype, tol = precision
    x = torch.randn(70, 10, device="cuda").to(dtype)
    p = torch.randn(90, 10, device="cuda").to(dtype)
    clean = pk.nearest_prototypes(x, p, k=3, metric=metric)
    x[2, 4] = float("nan")
    values, indices = pk.nearest_prototypes(x, p, k=3, metric=metric)
    assert values[2].isnan().all() and torch.equal(indices[2].cpu(), torch.arange(3))
    keep = [r for r in range(70) if r != 2]
    assert torch.equal(values[keep], clean.values[keep])
    assert torch.equal(indices[keep], clean.indices[keep])
    p[5, 0] = float("nan")
    values, indices = pk.nearest_prototypes(x[keep], p, k=2, metric=metric)
    assert values[:, 0].isnan().all() and (indices[:, 0] == 5).all()
    assert not values[:, 1].isnan().any()
    rest = [m for m in range(90) if m != 5]
    # the second nearest is the nearest of the bank without prototype 5 (indices renumbered)
    assert_nearest(x[keep], p[rest], metric, 1, values[:, 1:],
                   indices[:, 1:] - (indices[:, 1:] > 5).long(), tol)


@pytest.mark.cuda
@pytest.mark.parametrize("metric", METRICS)
def test_nearest_huge_magnitudes_are_searched_directly(on_cuda_backend, metric):
    """Squared norms past float32's max / 8: the expansion cannot bound those pairs."""
    if metric == "sqeuclidean":  # the distances (~1e27) fit in float32
        x = 1e19 + 1e13 * torch.randn(70, 8, device="cuda")
        p = 1e19 + 1e13 * torch.randn(9, 8, device="cuda")
    else:  # cosine is scale-free
        x = 1e20 * torch.randn(70, 8, device="cuda")
        p = torch.randn(9, 8, device="cuda")
    values, indices = pk.nearest_prototypes(x, p, k=3, metric=metric)
    assert_nearest(x, p, metric, 3, values, indices)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "permuted-tokens", "sliced-bank"])
@pytest.mark.parametrize("metric", METRICS)
def test_nearest_strided_inputs(on_cuda_backend, layout, metric):
    if layout == "channels_last":
        x = torch.randn(2, 12, 7, 9, device="cuda").to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(3, 24, 9, 9, device="cuda")[:, ::2, 1:, ::2]
    elif layout == "permuted-tokens":
        x = torch.randn(12, 2, 35, device="cuda").permute(1, 2, 0)  # (B, L, D), D strided
    else:
        x = torch.randn(70, 12, device="cuda")
    dim = x.shape[-1] if x.dim() != 4 else x.shape[1]
    p = torch.randn(150, 2 * dim, device="cuda")[::2, 1::2]  # rows and entries strided
    values, indices = pk.nearest_prototypes(x, p, k=3, metric=metric)
    assert_nearest(x, p, metric, 3, values, indices)
    contiguous = pk.nearest_prototypes(x.contiguous(), p.contiguous(), k=3, metric=metric)
    assert torch.equal(values, contiguous.values) and torch.equal(indices, contiguous.indices)


def assert_nearest_gradients(x: torch.Tensor, p: torch.Tensor, k: int, metric: str,
                             tol: float) -> torch.Tensor:
    """The cuda backend's gradients of ``sum(weights * values)`` of `pk.nearest_prototypes`
    (random weights) within ``tol`` of float64 autograd at the pairs it chose, in the inputs'
    shapes and dtypes; returns its indices."""
    xg, pg = x.detach().requires_grad_(), p.detach().requires_grad_()
    values, indices = pk.nearest_prototypes(xg, pg, k, metric)
    weights = torch.randn_like(values)
    with pk.recording() as calls:
        (values * weights).sum().backward()
    assert calls == [("nearest_prototypes_backward", "cuda")]
    want_x, want_p = nearest_gradients_at(x, p, metric, weights, indices)
    assert xg.grad.shape == x.shape and pg.grad.shape == p.shape
    assert xg.grad.dtype == x.dtype and pg.grad.dtype == p.dtype
    assert relative_error(xg.grad, want_x) <= tol
    assert relative_error(pg.grad, want_p) <= tol
    return indices


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("case", "dtype"), [
    ("map-k3", torch.float32), ("tokens-k9", torch.float32), ("k-equals-M", torch.float32),
    ("large-D", torch.float32), ("map-k3", torch.float16), ("map-k3", torch.bfloat16)])
def test_nearest_gradients_match_brute_force(on_cuda_backend, case, dtype, metric,
                                             deterministic):
    x, p, k = make_nearest(case, dtype)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        assert_nearest_gradients(x, p, k, metric, TOLERANCE[dtype])
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
def test_nearest_sqeuclidean_gradients_of_prototypes_on_their_rows(on_cuda_backend):
    """A bank of the rows themselves plus ~1e-4 noise, each row's nearest its own copy: every
    pair's gradient 2 g (x - p) is ~1e-4 of the entries, within float32's tolerance with the
    difference taken first, where 2 g x - 2 g p would cancel to ~1e-3 relative error."""
    x = torch.rand(70, 64, device="cuda")
    p = x + 1e-4 * torch.randn(70, 64, device="cuda")
    indices = assert_nearest_gradients(x, p, 1, "sqeuclidean", TOLERANCE[torch.float32])
    assert torch.equal(indices[:, 0].cpu(), torch.arange(70))


@pytest.mark.cuda
@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_nearest_only_the_needed_gradient_is_computed(on_cuda_backend, needs):
    x, p, k = make_nearest("tokens-k9", torch.float32)
    x.requires_grad_(needs[0])
    p.requires_grad_(needs[1])
    pk.nearest_prototypes(x, p, k).values.sum().backward()
    assert (x.grad is not None, p.grad is not None) == needs


@pytest.mark.cuda
@pytest.mark.parametrize("metric", METRICS)
def test_nearest_deterministic_backward_is_reproducible_bit_for_bit(on_cuda_backend, metric):
    """Most rows choose the same few prototypes, so their gradients collide a lot."""
    p = torch.randn(200, 48, device="cuda")
    x = (p[:4].repeat(100, 1) + 0.01 * torch.randn(400, 48, device="cuda")).requires_grad_()
    p.requires_grad_()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        grads = []
        for _ in range(3):
            values, _ = pk.nearest_prototypes(x, p, k=5, metric=metric)
            grads.append(torch.autograd.grad(values.sum(), (x, p)))
    finally:
        torch.use_deterministic_algorithms(False)
    for grad_x, grad_p in grads[1:]:
        assert torch.equal(grad_x, grads[0][0]) and torch.equal(grad_p, grads[0][1])
    atomic = torch.autograd.grad(pk.nearest_prototypes(x, p, k=5, metric=metric).values.sum(),
                                 (x, p))
    assert torch.equal(atomic[0], grads[0][0])  # the rows' sums never use atomics
    assert relative_error(atomic[1], grads[0][1]) <= TOLERANCE[torch.float32]


@pytest.mark.cuda
def test_nearest_empty_batch(on_cuda_backend):
    x = torch.randn(0, 8, device="cuda", requires_grad=True)
    p = torch.randn(5, 8, device="cuda", requires_grad=True)
    values, indices = pk.nearest_prototypes(x, p, k=2)
    assert values.shape == indices.shape == (0, 2)
    values.sum().backward()
    assert (p.grad == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("metric", METRICS)
def test_nearest_opcheck(on_cuda_backend, metric):
    x, p, k = make_nearest("map-k3", torch.float32)
    x4, p4, _ = canonicalize(x, p, metric, "test")
    opcheck(torch.ops.protokern.nearest_prototypes.default, (x4, p4, metric, k, "cuda"))
    values, indices = torch.ops.protokern.nearest_prototypes(x4, p4, metric, k, "cuda")
    for needs in [(True, True), (True, False), (False, True)]:
        opcheck(torch.ops.protokern.nearest_prototypes_backward.default,
                (torch.randn_like(values), x4, p4, indices, metric, "cuda", *needs))


@pytest.mark.cuda
def test_nearest_k_past_max_runs_on_the_next_backend():
    x, p = torch.randn(70, 16, device="cuda"), torch.randn(90, 16, device="cuda")
    with pytest.raises(ValueError, match="'cuda' cannot run this call.*at most k=32"):
        with pk.use_backend("cuda"):
            pk.nearest_prototypes(x, p, k=33)
    with pk.recording() as calls:
        values, indices = pk.nearest_prototypes(x, p, k=33)
    assert_nearest(x, p, "sqeuclidean", 33, values, indices)
    runner_up = "triton" if "triton" in pk.available_backends("cuda") else "reference"
    assert calls == [("nearest_prototypes", runner_up)]


@pytest.mark.cuda
def test_nearest_kernel_glue_errors_name_the_problem_and_the_shapes():
    import protokern._C  # noqa: F401

    op = torch.ops.protokern_cuda.nearest_prototypes
    x = torch.randn(2, 4, 3, 3, device="cuda")
    p = torch.randn(40, 4, 1, 1, device="cuda")
    with pytest.raises(ValueError,
                       match=r"k=33 must be between 1 and min\(M, 32\).*\[40, 4, 1, 1\]"):
        op(x, p, "sqeuclidean", 33, False)
    with pytest.raises(ValueError, match=r"k=0 must be between"):
        op(x, p, "sqeuclidean", 0, False)
    with pytest.raises(ValueError, match=r"1x1 prototypes.*\[5, 4, 2, 2\]"):
        op(x, torch.randn(5, 4, 2, 2, device="cuda"), "sqeuclidean", 1, False)
    with pytest.raises(ValueError, match="unknown metric 'manhattan'"):
        op(x, p, "manhattan", 1, False)
    values, indices = op(x, p, "cosine", 2, False)
    backward = torch.ops.protokern_cuda.nearest_prototypes_backward
    with pytest.raises(ValueError, match=r"must both be \(B, L, k\)"):
        backward(values[:1], x, p, indices[:1], "cosine", True, True, False)
    with pytest.raises(TypeError, match="indices int64"):
        backward(values, x, p, indices.int(), "cosine", True, True, False)
