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
    gradients_at,
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
def test_kernels_compile_with_nvcc_for_sm80():
    """Every csrc/cuda/*.cu compiles with bare nvcc, warnings as errors, on a machine without a
    GPU, and the glue compiles against torch's and CUDA's headers and calls only kernels the
    .cu files define. sm_80 only, to keep this test near 20 s: it is the lowest architecture
    the kernels support, so it catches any newer-only feature; .ci/run compiles for sm_80 and
    sm_90."""
    result = subprocess.run([str(ROOT / "csrc" / "cuda" / "compile_check.sh"), "80"],
                            check=False, capture_output=True, text=True, timeout=300)
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
