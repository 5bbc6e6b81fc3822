"""`pk.nearest_prototypes`, the reduction over prototypes (DESIGN §2), on every backend this
install runs, against an independent float64 brute force (tests/brute_force.py)."""

import pytest
import torch
from cases import FULL_PRECISION, HALF_PRECISION, METRICS
from helpers import assert_nearest, first_k, nearest_brute_force, nearest_gradients_at
from torch.library import opcheck

import protokern as pk
from protokern.ops import canonicalize
from protokern.testing import TOLERANCE, relative_error

# name -> (x shape, prototypes shape, k); x is (B, D, H, W), (B, L, D) tokens or (N, D) vectors
# (the contract's shapes of tests/cases.py, plus k, vectors and prototype blocks past 256)
CASES = {
    "map-1x1-k1": ((2, 5, 4, 6), (7, 5), 1),
    "map-1x1-k3": ((2, 5, 4, 6), (37, 5, 1, 1), 3),
    "map-2x3-k2": ((3, 4, 5, 6), (37, 4, 2, 3), 2),
    "map-k-equals-M": ((2, 6, 3, 3), (5, 6), 5),
    "M1": ((2, 6, 3, 3), (1, 6), 1),
    "D300": ((2, 300, 3, 2), (11, 300), 4),
    "tokens": ((3, 9, 16), (300, 16), 9),
    "tokens-L1": ((2, 1, 8), (6, 8, 1, 1), 2),
    "vectors": ((50, 24), (257, 24), 1),
    "vectors-k7": ((33, 24), (130, 24), 7),
}


def make(case, dtype=torch.float32, requires_grad=False):
    x_shape, p_shape, k = CASES[case]
    x = torch.randn(x_shape, dtype=dtype, requires_grad=requires_grad)
    p = torch.randn(p_shape, dtype=dtype, requires_grad=requires_grad)
    return x, p, k


@pytest.mark.parametrize("dtype", FULL_PRECISION)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", CASES)
def test_matches_brute_force(backend, case, metric, dtype):
    x, p, k = make(case, dtype)
    values, indices = pk.nearest_prototypes(x, p, k, metric)
    assert_nearest(x, p, metric, k, values, indices)


@pytest.mark.parametrize("dtype", HALF_PRECISION)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", ["map-2x3-k2", "tokens", "vectors-k7"])
def test_half_precision(backend, case, metric, dtype):
    x, p, k = make(case, dtype)
    values, indices = pk.nearest_prototypes(x, p, k, metric)
    assert_nearest(x, p, metric, k, values, indices)


def test_result_is_a_named_tuple(backend):
    x, p, k = make("vectors")
    result = pk.nearest_prototypes(x, p)
    assert isinstance(result, pk.NearestPrototypes)
    assert result.values is result[0] and result.indices is result[1]


@pytest.mark.parametrize("metric", METRICS)
def test_duplicated_prototypes_tie_to_the_lowest_index(backend, metric):
    x = torch.randn(40, 16)
    base = torch.randn(6, 16)
    p = torch.cat([base, base, base[:2]])  # prototype m and m + 6 (and m + 12) are equal
    values, indices = pk.nearest_prototypes(x, p, k=3, metric=metric)
    # each row's nearest distinct prototype appears at its lowest copy first, then its copy
    d = nearest_brute_force(x, p, metric)
    want_values, want_indices = first_k(d, 3)
    assert torch.equal(indices, want_indices)
    assert relative_error(values, want_values) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("metric", METRICS)
def test_identical_rows_and_all_equal_distances(backend, metric):
    """A row equidistant from every prototype (the prototypes a row's copies): indices 0..k-1."""
    p = torch.randn(1, 32).expand(19, 32).contiguous()
    x = torch.randn(5, 32)
    values, indices = pk.nearest_prototypes(x, p, k=19, metric=metric)
    assert torch.equal(indices, torch.arange(19).expand(5, 19))
    assert (values == values[:, :1]).all()


def test_a_prototype_on_a_patch_is_found_exactly(backend):
    """As after ProtoPNet's push: a prototype equal to a patch has distance 0 to it, which
    the GEMM expansion alone would lose to cancellation among near-duplicates."""
    x = torch.sigmoid(torch.randn(2, 128, 4, 4))
    patch = x[1, :, 2, 3].clone()
    near = patch + 1e-4 * torch.randn(128)
    p = torch.cat([near[None], torch.rand(30, 128), patch[None]])
    values, indices = pk.nearest_prototypes(x, p, k=1)
    assert indices[1, 2, 3, 0] == 31 and values[1, 2, 3, 0] == 0


@pytest.mark.parametrize("metric", METRICS)
def test_nan_in_a_row_makes_that_rows_values_nan(backend, metric):
    x = torch.randn(6, 10)
    p = torch.randn(9, 10)
    clean = pk.nearest_prototypes(x, p, k=3, metric=metric)
    x[2, 4] = float("nan")
    values, indices = pk.nearest_prototypes(x, p, k=3, metric=metric)
    assert values[2].isnan().all() and torch.equal(indices[2], torch.arange(3))
    keep = torch.tensor([0, 1, 3, 4, 5])
    assert torch.equal(values[keep], clean.values[keep])
    assert torch.equal(indices[keep], clean.indices[keep])


def test_a_nan_prototype_comes_first_everywhere(backend):
    x, p = torch.randn(6, 10), torch.randn(9, 10)
    p[5, 0] = float("nan")
    values, indices = pk.nearest_prototypes(x, p, k=2)
    assert values[:, 0].isnan().all() and (indices[:, 0] == 5).all()
    assert not values[:, 1].isnan().any()


@pytest.mark.parametrize("metric", METRICS)
def test_infinite_entries(backend, metric):
    x, p = torch.randn(4, 6), torch.randn(5, 6)
    x[1, 0] = float("inf")
    values, indices = pk.nearest_prototypes(x, p, k=2, metric=metric)
    want_values, want_indices = first_k(nearest_brute_force(x, p, metric), 2)
    assert torch.equal(values.double().isnan(), want_values.isnan())
    finite = want_values.isfinite()
    assert torch.equal(values.double()[~finite].isinf(), want_values[~finite].isinf())
    assert relative_error(values.double()[finite], want_values[finite]) <= 1e-5
    assert torch.equal(indices, want_indices)


@pytest.mark.parametrize("metric", METRICS)
def test_infinitely_far_prototypes_are_each_taken_once(backend, metric):
    """Prototypes 1 and 3 hold an inf entry (sqeuclidean: infinitely far from every row;
    cosine: NaN) and row 1 is infinitely far from all of them, with k = M: every prototype
    once per row, in the brute force's order (equal infinite distances by index). A search
    that marked a taken column by setting it to inf took the first infinite one k times (the
    Triton kernel), and one that shortlisted an untrusted prototype twice took it twice (cpu)."""
    x, p = torch.randn(4, 6), torch.randn(5, 6)
    x[1, 0] = float("inf")
    p[1, 2] = p[3, 0] = float("inf")
    values, indices = pk.nearest_prototypes(x, p, k=5, metric=metric)
    want_values, want_indices = first_k(nearest_brute_force(x, p, metric), 5)
    assert torch.equal(indices.sort(-1).values, torch.arange(5).expand(4, 5))
    assert torch.equal(indices, want_indices)
    assert torch.equal(values.double().isnan(), want_values.isnan())
    assert torch.equal(values.double().isinf(), want_values.isinf())


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "permuted-tokens"])
def test_strided_inputs(backend, layout):
    if layout == "channels_last":
        x = torch.randn(2, 12, 5, 5).to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(3, 24, 7, 9)[:, ::2, 1:, ::2]
    else:
        x = torch.randn(16, 2, 11).permute(1, 2, 0)  # (B, L, D) with D strided
    p = torch.randn(23, 12 if layout != "permuted-tokens" else 16)[:, :x.shape[-1] if
                                                                    x.dim() == 3 else 12]
    values, indices = pk.nearest_prototypes(x, p, k=2)
    assert_nearest(x, p, "sqeuclidean", 2, values, indices)
    contiguous = pk.nearest_prototypes(x.contiguous(), p.contiguous(), k=2)
    assert torch.equal(values, contiguous.values) and torch.equal(indices, contiguous.indices)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", ["map-2x3-k2", "tokens", "vectors-k7", "map-k-equals-M"])
def test_gradients_match_nearest_brute_force(backend, case, metric):
    x, p, k = make(case, torch.float64, requires_grad=True)
    values, indices = pk.nearest_prototypes(x, p, k, metric)
    weights = torch.randn_like(values)
    grads = torch.autograd.grad((values * weights).sum(), (x, p))
    want = nearest_gradients_at(x, p, metric, weights, indices)
    for got, expected in zip(grads, want, strict=True):
        assert relative_error(got, expected) <= 1e-10


@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_only_the_needed_gradient_is_computed(backend, needs):
    x, p, k = make("map-2x3-k2", torch.float64)
    x.requires_grad_(needs[0])
    p.requires_grad_(needs[1])
    with pk.recording() as calls:
        pk.nearest_prototypes(x, p, k).values.sum().backward()
    assert ("nearest_prototypes_backward", backend) in calls
    assert (x.grad is not None, p.grad is not None) == needs


def test_double_backward_is_refused(backend):
    x, p, k = make("vectors", torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(pk.nearest_prototypes(x, p).values.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


def test_empty_batch(backend):
    values, indices = pk.nearest_prototypes(torch.randn(0, 8), torch.randn(5, 8), k=2)
    assert values.shape == indices.shape == (0, 2)


@pytest.mark.parametrize("k", [0, -1, 6])
def test_k_out_of_range_is_a_value_error(k):
    with pytest.raises(ValueError, match=rf"k={k} must be between 1 and the number of "
                                         r"prototypes M=5 \(prototypes \(5, 8\)\)"):
        pk.nearest_prototypes(torch.randn(3, 8), torch.randn(5, 8), k=k)


@pytest.mark.parametrize("k", [2.0, True, "3"])
def test_k_must_be_an_int(k):
    with pytest.raises(TypeError, match="k must be an int"):
        pk.nearest_prototypes(torch.randn(3, 8), torch.randn(5, 8), k=k)


def test_vectors_need_one_by_one_prototypes():
    with pytest.raises(ValueError, match=r"vectors x \(3, 8\) as \(N, D\) take prototypes"):
        pk.nearest_prototypes(torch.randn(3, 8), torch.randn(5, 8, 2, 2))


def test_min_distance_still_refuses_vectors():
    with pytest.raises(ValueError, match=r"feature map or \(B, L, D\) tokens, got a 2-d"):
        pk.min_distance(torch.randn(3, 8), torch.randn(5, 8))


@pytest.mark.parametrize("metric", METRICS)
def test_opcheck(backend, metric):
    x, p, k = make("map-2x3-k2", torch.float64)
    x4, p4, _ = canonicalize(x, p, metric, "test")
    x4, p4 = x4.requires_grad_(), p4.requires_grad_()
    choice = backend
    opcheck(torch.ops.protokern.nearest_prototypes.default, (x4, p4, metric, k, choice))
    values, indices = torch.ops.protokern.nearest_prototypes(x4, p4, metric, k, choice)
    for needs in [(True, True), (True, False), (False, True)]:
        opcheck(torch.ops.protokern.nearest_prototypes_backward.default,
                (torch.randn_like(values), x4.detach(), p4.detach(), indices, metric, choice,
                 *needs))


def test_compiles_without_graph_breaks(backend):
    torch._dynamo.reset()
    p = torch.randn(13, 8, requires_grad=True)

    def vq(x):
        values, indices = pk.nearest_prototypes(x, p, k=2)
        return values.sum(), indices

    compiled = torch.compile(vq, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, 8, requires_grad=True)
    loss, indices = compiled(x)
    loss.backward()
    grads = x.grad.clone(), p.grad.clone()
    x.grad = p.grad = None
    eager_loss, eager_indices = vq(x)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    assert torch.equal(indices, eager_indices)
    for got, want in zip(grads, (x.grad, p.grad), strict=True):
        torch.testing.assert_close(got, want)
    torch._dynamo.reset()


def test_reference_gradcheck():
    x, p, k = make("map-2x3-k2", torch.float64, requires_grad=True)
    with pk.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda a, b: pk.nearest_prototypes(a, b, k).values,
                                        (x, p))
