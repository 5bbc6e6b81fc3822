"""The cpu backend's two GEMMs for its float32 forward tiles (csrc/cpu/packed_gemm.h): the
packed AVX-512 kernel must give what PyTorch's BLAS gives, across its panel (48 rows) and
micro-tile (8 prototypes) boundaries, for each forward kernel that uses it, whichever of the
two `protokern.backends.cpu.gemm`'s ``"auto"`` picks on this host."""

import pytest
import torch
from brute_force import distances
from cases import METRICS
from helpers import assert_matches_brute_force, assert_nearest, brute_force_grads

import protokern as pk
from protokern.backends import cpu
from protokern.bench.runner import _cpuinfo
from protokern.testing import TOLERANCE, relative_error

pytestmark = pytest.mark.skipif(
    "cpu" not in pk.available_backends("cpu"),
    reason="the C++ extension is not built (pip install --no-build-isolation -e .)",
)
needs_packed = pytest.mark.skipif(
    not cpu.packed_gemm_supported(),
    reason="this CPU lacks AVX-512F, so the packed GEMM cannot run here ('auto' is BLAS)")

# B, D, H, W, M, ph, pw: rows (B * L) and prototypes on both sides of 48 and 8, depth 1 to 498.
SHAPES = {
    "vectors-47-rows-9-prototypes": (47, 5, 1, 1, 9, 1, 1),
    "vectors-49-rows-7-prototypes": (49, 12, 1, 1, 7, 1, 1),
    "depth-1": (3, 1, 4, 4, 17, 1, 1),
    "L49-two-tiles-of-prototypes": (9, 16, 7, 7, 263, 1, 1),
    "patch-depth-498": (2, 83, 5, 6, 300, 2, 3),
    "784-rows-per-image": (1, 16, 28, 28, 41, 1, 1),
    "vectors-400-rows": (400, 33, 1, 1, 260, 1, 1),
}


def _inputs(case: str):
    torch.manual_seed(hash(case) % 2**31)
    batch, dim, height, width, num, ph, pw = SHAPES[case]
    return torch.randn(batch, dim, height, width), torch.randn(num, dim, ph, pw)


def _run(gemm: str, op, *args):
    with pk.use_backend("cpu"), cpu.gemm(gemm):
        return op(*args)


def test_choice_is_validated_and_restored():
    before = cpu.gemm_in_use()
    with pytest.raises(ValueError, match="choice must be one of"):
        with cpu.gemm("mkl"):
            pass
    with pytest.raises(ValueError, match="'auto', 'blas' or 'packed'"):
        torch.ops.protokern_cpu.set_gemm("fast")
    with cpu.gemm("blas"):
        assert cpu.gemm_in_use() == "blas"
    assert cpu.gemm_in_use() == before


def test_packed_is_refused_without_avx512():
    if cpu.packed_gemm_supported():
        with cpu.gemm("packed"):
            assert cpu.gemm_in_use() == "packed"
    else:
        with pytest.raises(ValueError, match="AVX-512F"):
            with cpu.gemm("packed"):
                pass


def test_auto_is_packed_exactly_on_amd_family_26_and_later():
    """Where it was measured faster than torch's BLAS (a Zen 5) and nowhere else."""
    info = _cpuinfo()
    wanted = (info.get("vendor_id") == "AuthenticAMD" and int(info.get("cpu family", 0)) >= 26
              and "avx512f" in info.get("flags", "").split())
    with cpu.gemm("auto"):
        assert cpu.gemm_in_use() == ("packed" if wanted else "blas")


@needs_packed
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", SHAPES)
def test_min_distance_same_on_both(case, metric):
    x, prototypes = _inputs(case)
    packed = _run("packed", pk.min_distance, x, prototypes, metric)
    blas = _run("blas", pk.min_distance, x, prototypes, metric)
    assert_matches_brute_force(x, prototypes, metric, *packed)
    assert torch.equal(packed.indices, blas.indices)
    if x.shape[2] * x.shape[3] > 1:  # the chosen value is recomputed exactly: bit for bit
        assert torch.equal(packed.values, blas.values)


@needs_packed
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", ["depth-1", "L49-two-tiles-of-prototypes", "patch-depth-498"])
def test_topk_distance_same_on_both(case, metric):
    x, prototypes = _inputs(case)
    packed = _run("packed", pk.topk_distance, x, prototypes, 3, metric)
    blas = _run("blas", pk.topk_distance, x, prototypes, 3, metric)
    assert torch.equal(packed.indices, blas.indices)
    assert torch.equal(packed.values, blas.values)
    want = distances(x, prototypes, metric).sort(-1).values[..., :3]
    assert (packed.values.double() - want).abs().max() <= 1e-5 * want.abs().max().clamp_min(1)


@needs_packed
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("metric", [*METRICS, "dot"])
@pytest.mark.parametrize("case", SHAPES)
def test_nearest_prototypes_same_on_both(case, metric, k):
    x, prototypes = _inputs(case)
    if x.shape[2] * x.shape[3] == 1:
        x = x.flatten(1)  # (N, D) vectors
    if prototypes.shape[2:] != (1, 1) and x.dim() == 2:
        pytest.skip("vectors take 1 x 1 prototypes")
    packed = _run("packed", pk.nearest_prototypes, x, prototypes, k, metric)
    blas = _run("blas", pk.nearest_prototypes, x, prototypes, k, metric)
    assert_nearest(x, prototypes, metric, k, *packed)
    assert torch.equal(packed.indices, blas.indices)
    assert torch.equal(packed.values, blas.values)


@needs_packed
def test_nearest_with_nan_inf_huge_and_ties():
    """Untrusted rows and prototypes (non-finite or huge norms) and exact duplicates through the
    packed tiles: the same answers as BLAS's, NaN rows NaN."""
    torch.manual_seed(3)
    x = torch.randn(130, 24)
    prototypes = torch.randn(70, 24)
    prototypes[5] = prototypes[60]  # a duplicate: ties go to 5
    x[7] = prototypes[60]
    x[11, 3] = float("nan")
    x[12, 0] = float("inf")
    x[13] = 1e30
    prototypes[20, 2] = float("inf")
    prototypes[21] = 3e25
    packed = _run("packed", pk.nearest_prototypes, x, prototypes, 3)
    blas = _run("blas", pk.nearest_prototypes, x, prototypes, 3)
    assert torch.equal(packed.indices, blas.indices)
    torch.testing.assert_close(packed.values, blas.values, rtol=0, atol=0, equal_nan=True)
    assert packed.values[11].isnan().all()
    assert packed.indices[7, 0] == 5 and packed.values[7, 0] == 0


@needs_packed
def test_packed_results_do_not_depend_on_the_thread_count():
    x, prototypes = _inputs("L49-two-tiles-of-prototypes")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run("packed", pk.nearest_prototypes, x, prototypes, 4)
        torch.set_num_threads(max(2, threads))
        many = _run("packed", pk.nearest_prototypes, x, prototypes, 4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.values, many.values) and torch.equal(one.indices, many.indices)


def _gradients(gemm: str, x, prototypes, metric, weights):
    x = x.detach().clone().requires_grad_()
    prototypes = prototypes.detach().clone().requires_grad_()
    with pk.use_backend("cpu"), cpu.gemm(gemm):
        values, _ = pk.min_distance(x, prototypes, metric)
        (values * weights).sum().backward()
    return x.grad, prototypes.grad


@needs_packed
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", ["vectors-47-rows-9-prototypes", "vectors-49-rows-7-prototypes",
                                  "vectors-400-rows"])
def test_single_position_backward_same_on_both(case, metric):
    """With one position the backward is two dense products (packed_matmul where the packed
    GEMM is chosen): rows and columns past its 8 x 48 tiles and depth chunks of 128."""
    x, prototypes = _inputs(case)
    weights = torch.randn(x.shape[0], prototypes.shape[0])
    packed = _gradients("packed", x, prototypes, metric, weights)
    blas = _gradients("blas", x, prototypes, metric, weights)
    want = brute_force_grads(x, prototypes, metric, weights)
    for got, other, expected in zip(packed, blas, want, strict=True):
        assert relative_error(got, expected) <= TOLERANCE[torch.float32]
        assert relative_error(got, other) <= TOLERANCE[torch.float32]


@needs_packed
def test_packed_matmul_depth_and_edges():
    """The product itself through the one-position backward: depth 1 and 600 (five chunks),
    one prototype, against float64."""
    torch.manual_seed(5)
    for rows, depth, num in [(5, 1, 3), (17, 600, 53), (300, 70, 1)]:
        x = torch.randn(rows, 1, depth)  # (B, L = 1, D) tokens
        prototypes = torch.randn(num, depth)
        weights = torch.randn(rows, num)
        grad_x, grad_p = _gradients("packed", x, prototypes, "sqeuclidean", weights)
        want_x, want_p = brute_force_grads(x, prototypes, "sqeuclidean", weights)
        assert relative_error(grad_x, want_x) <= TOLERANCE[torch.float32]
        assert relative_error(grad_p, want_p) <= TOLERANCE[torch.float32]
