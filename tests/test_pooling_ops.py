"""`pk.topk_distance`, `pk.mean_distance` and the ``euclidean`` and ``dot`` metrics (the other
poolings and metrics of the prototype family, issue 18), on every backend this install runs,
against the independent float64 brute force (tests/brute_force.py). A backend that refuses a
call (`Backend.supports`: no kernel, or a rule) skips the rest of the test with its reason."""

import pytest
import torch
from brute_force import distances
from cases import FULL_PRECISION, HALF_PRECISION, map_layout
from helpers import first_k, refusal
from torch.library import opcheck

import protokern as pk
from protokern.backends import registry
from protokern.ops import canonicalize
from protokern.testing import TOLERANCE, relative_error

ALL_METRICS = ("sqeuclidean", "cosine", "euclidean", "dot")

# name -> (x shape, prototypes shape); x (B, D, H, W) or (B, L, D) tokens
CASES = {
    "1x1": ((2, 5, 4, 6), (7, 5)),
    "2x3": ((3, 4, 5, 6), (9, 4, 2, 3)),
    "tokens": ((2, 9, 8), (6, 8)),
    "D300": ((2, 300, 3, 2), (5, 300)),
    "L1": ((6, 8, 1, 1), (7, 8)),  # one position: the kernels' every-pair path
}


def skip_if_refused(backend: str, op: str, x, p, metric: str, **options) -> None:
    """Skip with the backend's reason where it does not run ``op`` on these inputs."""
    reason = refusal(backend, op, x, p, metric, **options)
    if reason is not None:
        pytest.skip(f"the backend refuses {op} (Backend.supports): {reason}")


def make(case, dtype=torch.float32):
    x_shape, p_shape = CASES[case]
    return torch.randn(x_shape, dtype=dtype), torch.randn(p_shape, dtype=dtype)


def positions(x, p) -> int:
    if x.dim() == 3:
        return x.shape[1]
    ph, pw = p.shape[2:] if p.dim() == 4 else (1, 1)
    return (x.shape[2] - ph + 1) * (x.shape[3] - pw + 1)


def brute_topk(x, p, metric, k):
    """(values, indices) (B, M, k) of the brute force: NaN first, ties to the lowest."""
    d = distances(x, p, metric)
    values, indices = first_k(d.flatten(0, 1), k)
    return values.view(*d.shape[:2], k), indices.view(*d.shape[:2], k)


def topk_grads(x, p, metric, k, weights):
    xd = x.detach().double().requires_grad_()
    pd = p.detach().double().requires_grad_()
    d = distances(xd, pd, metric)
    _, indices = brute_topk(x, p, metric, k)
    return torch.autograd.grad((d.gather(-1, indices) * weights.double()).sum(), (xd, pd))


def mean_grads(x, p, metric, weights):
    xd = x.detach().double().requires_grad_()
    pd = p.detach().double().requires_grad_()
    return torch.autograd.grad((distances(xd, pd, metric).mean(-1) * weights.double()).sum(),
                               (xd, pd))


# ---------------------------------------------------------------------------------------------
# topk_distance


@pytest.mark.parametrize("dtype", FULL_PRECISION)
@pytest.mark.parametrize("metric", ALL_METRICS)
@pytest.mark.parametrize("case", CASES)
def test_topk_matches_brute_force(backend, case, metric, dtype):
    x, p = make(case, dtype)
    k = min(3, positions(x, p))
    skip_if_refused(backend, "topk_distance", x, p, metric, k=k)
    x.requires_grad_(), p.requires_grad_()
    values, indices = pk.topk_distance(x, p, k, metric)
    want_values, want_indices = brute_topk(x, p, metric, k)
    assert values.shape == indices.shape == want_values.shape
    assert values.dtype == dtype and indices.dtype == torch.int64
    assert relative_error(values, want_values) <= TOLERANCE[dtype]
    assert torch.equal(indices, want_indices)  # random data: no near-ties
    weights = torch.randn(values.shape, dtype=dtype)
    (values * weights).sum().backward()
    want_x, want_p = topk_grads(x, p, metric, k, weights)
    assert relative_error(x.grad, want_x) <= TOLERANCE[dtype]
    assert relative_error(p.grad, want_p) <= TOLERANCE[dtype]


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_topk_with_k1_is_min_distance(backend, metric):
    x, p = make("2x3")
    skip_if_refused(backend, "topk_distance", x, p, metric, k=1)
    values, indices = pk.topk_distance(x, p, 1, metric)
    want = pk.min_distance(x, p, metric)
    assert torch.equal(values[..., 0], want.values) and torch.equal(indices[..., 0], want.indices)


@pytest.mark.parametrize("dtype", HALF_PRECISION)
@pytest.mark.parametrize("metric", ALL_METRICS)
def test_topk_half_precision(backend, metric, dtype):
    x, p = make("2x3", dtype)
    skip_if_refused(backend, "topk_distance", x, p, metric, k=4)
    values, indices = pk.topk_distance(x, p, 4, metric)
    want_values, _ = brute_topk(x, p, metric, 4)
    assert values.dtype == dtype
    assert relative_error(values, want_values) <= TOLERANCE[dtype]
    # each returned position's true distance is its value
    true = distances(x, p, metric).gather(-1, indices)
    assert relative_error(values, true) <= TOLERANCE[dtype]


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "expanded"])
def test_topk_and_mean_take_any_strides(backend, layout):
    data, p = make("2x3", torch.float64)
    x = map_layout(data, layout)
    skip_if_refused(backend, "topk_distance", x, p, "sqeuclidean", k=5)
    values, indices = pk.topk_distance(x, p, 5)
    want_values, want_indices = brute_topk(x, p, "sqeuclidean", 5)
    assert relative_error(values, want_values) <= TOLERANCE[torch.float64]
    assert torch.equal(indices, want_indices)
    skip_if_refused(backend, "mean_distance", x, p, "sqeuclidean")
    mean = pk.mean_distance(x, p)
    assert relative_error(mean, distances(x, p, "sqeuclidean").mean(-1)) <= 1e-10


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_topk_ties_go_to_the_lowest_position(backend, metric):
    x = torch.randn(2, 6, 1, 1).expand(2, 6, 3, 4).contiguous()  # every position the same
    x[1, :, 2, 1] += 1  # one different position in image 1
    p = torch.randn(3, 6)
    skip_if_refused(backend, "topk_distance", x, p, metric, k=12)
    values, indices = pk.topk_distance(x, p, 12, metric)
    assert torch.equal(indices[0], torch.arange(12).expand(3, 12))
    assert (values[0] == values[0, :, :1]).all()
    _, want = brute_topk(x, p, metric, 12)
    assert torch.equal(indices[1], want[1])


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_topk_nan_comes_first(backend, metric):
    x, p = make("1x1")
    x[0, 2, 1, 3] = float("nan")  # position 1 * 6 + 3 = 9 of image 0
    skip_if_refused(backend, "topk_distance", x, p, metric, k=3)
    values, indices = pk.topk_distance(x, p, 3, metric)
    assert values[0, :, 0].isnan().all() and (indices[0, :, 0] == 9).all()
    assert not values[0, :, 1:].isnan().any() and not values[1].isnan().any()
    want_values, want_indices = brute_topk(x, p, metric, 3)
    assert torch.equal(indices, want_indices)


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_topk_infinite_distances_are_each_taken_once(backend, metric):
    """An inf entry at position 15 of image 0 and in prototype 2 (sqeuclidean: infinitely
    far; cosine: NaN; dot: either): the brute force's order, equal infinite distances by
    position, every position once."""
    x, p = make("1x1")
    x[0, 1, 2, 3] = float("inf")
    p[2, 4] = float("inf")
    skip_if_refused(backend, "topk_distance", x, p, metric, k=6)
    values, indices = pk.topk_distance(x, p, 6, metric)
    want_values, want_indices = brute_topk(x, p, metric, 6)
    assert torch.equal(indices, want_indices)
    ordered = indices.sort(-1).values
    assert (ordered[..., 1:] != ordered[..., :-1]).all()
    assert torch.equal(values.isnan(), want_values.isnan())
    assert torch.equal(values.isinf(), want_values.isinf())


@pytest.mark.parametrize("k", [0, 25])
def test_topk_k_out_of_range_is_a_value_error(k):
    x, p = torch.randn(2, 5, 4, 6), torch.randn(7, 5)
    with pytest.raises(ValueError, match=r"k=\d+ must be between 1 and the number of positions"):
        pk.topk_distance(x, p, k)


def test_topk_k_must_be_an_int():
    with pytest.raises(TypeError, match="k must be an int"):
        pk.topk_distance(torch.randn(2, 5, 4, 6), torch.randn(7, 5), 2.0)


# ---------------------------------------------------------------------------------------------
# mean_distance


@pytest.mark.parametrize("dtype", FULL_PRECISION)
@pytest.mark.parametrize("metric", ALL_METRICS)
@pytest.mark.parametrize("case", CASES)
def test_mean_matches_brute_force(backend, case, metric, dtype):
    x, p = make(case, dtype)
    skip_if_refused(backend, "mean_distance", x, p, metric)
    x.requires_grad_(), p.requires_grad_()
    mean = pk.mean_distance(x, p, metric)
    want = distances(x, p, metric).mean(-1)
    assert mean.shape == want.shape and mean.dtype == dtype
    assert relative_error(mean, want) <= TOLERANCE[dtype]
    weights = torch.randn(mean.shape, dtype=dtype)
    (mean * weights).sum().backward()
    want_x, want_p = mean_grads(x, p, metric, weights)
    assert relative_error(x.grad, want_x) <= TOLERANCE[dtype]
    assert relative_error(p.grad, want_p) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", HALF_PRECISION)
@pytest.mark.parametrize("metric", ALL_METRICS)
def test_mean_half_precision(backend, metric, dtype):
    x, p = make("2x3", dtype)
    skip_if_refused(backend, "mean_distance", x, p, metric)
    mean = pk.mean_distance(x, p, metric)
    assert mean.dtype == dtype
    assert relative_error(mean, distances(x, p, metric).mean(-1)) <= TOLERANCE[dtype]


def test_mean_stays_accurate_far_from_the_origin(backend):
    """Features around 1000 with spread 0.01: the plain ``mean|x|^2 - 2 p.mean(x) + |p|^2`` in
    float32 loses everything to cancellation (|x|^2 ~ 6e7 against distances ~ 1e-3); taken
    about the mean patch it keeps float32 accuracy."""
    centre = 1000 + torch.randn(1, 64, 1, 1)
    x = centre + 0.01 * torch.randn(2, 64, 5, 5)
    p = centre[0, :, 0, 0] + 0.01 * torch.randn(4, 64)
    skip_if_refused(backend, "mean_distance", x, p, "sqeuclidean")
    want = distances(x, p, "sqeuclidean").mean(-1)
    assert relative_error(pk.mean_distance(x, p), want) <= TOLERANCE[torch.float32]
    rows = x.flatten(2).transpose(1, 2)
    naive = ((rows.square().sum(-1).mean(1)[:, None] - 2 * rows.mean(1) @ p.T
              + p.square().sum(-1)))
    assert relative_error(naive, want) > 100 * TOLERANCE[torch.float32]  # the test bites


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_mean_nan_only_in_its_image(backend, metric):
    x, p = make("1x1")
    x[1, 0, 2, 2] = float("nan")
    skip_if_refused(backend, "mean_distance", x, p, metric)
    mean = pk.mean_distance(x, p, metric)
    assert mean[1].isnan().all() and not mean[0].isnan().any()


# ---------------------------------------------------------------------------------------------
# the new metrics on the existing ops


@pytest.mark.parametrize("dtype", FULL_PRECISION)
@pytest.mark.parametrize("metric", ["euclidean", "dot"])
@pytest.mark.parametrize("case", CASES)
def test_min_distance_and_nearest_with_the_new_metrics(backend, case, metric, dtype):
    x, p = make(case, dtype)
    x.requires_grad_(), p.requires_grad_()
    values, indices = pk.min_distance(x, p, metric)
    d = distances(x, p, metric)
    want_values, want_indices = first_k(d.flatten(0, 1), 1)
    assert relative_error(values, want_values.view(values.shape)) <= TOLERANCE[dtype]
    assert torch.equal(indices, want_indices.view(indices.shape))
    weights = torch.randn(values.shape, dtype=dtype)
    (values * weights).sum().backward()
    want_x, want_p = topk_grads(x, p, metric, 1, weights[..., None])
    assert relative_error(x.grad, want_x) <= TOLERANCE[dtype]
    assert relative_error(p.grad, want_p) <= TOLERANCE[dtype]
    near = pk.nearest_prototypes(x.detach(), p.detach(), 2, metric)
    want_near, want_near_indices = first_k(d.transpose(1, 2).reshape(-1, d.shape[1]), 2)
    assert relative_error(near.values.reshape(-1, 2), want_near) <= TOLERANCE[dtype]
    assert torch.equal(near.indices.reshape(-1, 2), want_near_indices)


@pytest.mark.parametrize("metric", ALL_METRICS)
def test_distance_map_is_exact_at_each_minimum(backend, metric):
    """After a push a prototype equals a patch: the map's GEMM expansion alone gives ~1e-5
    there (7.6e-6 in the issue), min_distance 0. At each (image, prototype)'s minimum the map
    holds the exact distance, rounded once: 0 at a pushed patch, min_distance's value up to
    its own rounding (bit for bit on the reference, but for the euclidean root, which the map
    takes in float64 and min_distance in float32)."""
    x = torch.sigmoid(torch.randn(3, 128, 5, 5))
    p = torch.cat([x[0, :, 2, 3][None], x[[1, 2], :, 4, 0], torch.rand(2, 128)])
    dmap = pk.distance_map(x, p, metric)
    d = distances(x, p, metric)
    want_values, want_indices = first_k(d.flatten(0, 1), 1)
    at_minimum = dmap.flatten(2).gather(2, want_indices.view(3, 5, 1))[..., 0]
    assert torch.equal(at_minimum, want_values.view(3, 5).float())  # rounded once
    if metric in ("sqeuclidean", "cosine"):  # (euclidean: the root of its eps)
        assert at_minimum[0, 0] == 0 and at_minimum[1, 1] == 0 and at_minimum[2, 2] == 0
    skip_if_refused(backend, "min_distance", x, p, metric)
    values, indices = pk.min_distance(x, p, metric)
    assert torch.equal(indices, want_indices.view(3, 5))
    assert relative_error(at_minimum, values) <= TOLERANCE[torch.float32]
    if backend == "reference" and metric != "euclidean":  # (its root: in float64 or float32)
        assert torch.equal(at_minimum, values)
    assert relative_error(dmap.flatten(2), d) <= 1e-5


def test_dot_finds_the_true_maximum_where_the_gemm_misorders_it(backend):
    """Patches of norm ~8e5 orthogonal to every prototype, plus small projections onto them
    (gaps >= 0.002 between the two largest): the float32 GEMM's products are off by ~0.3, so
    its argmax is wrong for several pairs (checked: the test bites). The dot bound (g |x| |p|)
    must shortlist every position and prototype the GEMM cannot rule out, and the recomputed
    products decide: indices exactly the float64 truth's, in both reductions."""
    generator = torch.Generator().manual_seed(0)
    p = torch.randn(6, 64, dtype=torch.float64, generator=generator)
    basis, _ = torch.linalg.qr(p.T)  # (64, 6): the prototypes' span
    w = torch.randn(4, 49, 64, dtype=torch.float64, generator=generator) * 1e5
    w = w - (w @ basis) @ basis.T
    coef = torch.randn(4, 49, 6, dtype=torch.float64, generator=generator) * 1e-2
    x, p = (w + coef @ p).float(), p.float()  # tokens (B, L, D), prototypes (M, D)
    truth = -(x.double() @ p.double().T)  # (B, L, M)
    gemm = -(x @ p.T)
    assert (gemm.argmin(1) != truth.argmin(1)).any() and (gemm.argmin(2) != truth.argmin(2)).any()
    skip_if_refused(backend, "min_distance", x, p, "dot")
    values, indices = pk.min_distance(x, p, "dot")
    assert torch.equal(indices, truth.argmin(1))
    assert relative_error(values, truth.amin(1)) <= TOLERANCE[torch.float32]
    skip_if_refused(backend, "nearest_prototypes", x, p, "dot", k=2)
    near = pk.nearest_prototypes(x, p, 2, "dot")
    want_values, want_indices = first_k(truth.reshape(-1, 6), 2)
    assert torch.equal(near.indices.reshape(-1, 2), want_indices)
    assert relative_error(near.values.reshape(-1, 2), want_values) <= TOLERANCE[torch.float32]
    skip_if_refused(backend, "topk_distance", x, p, "dot", k=3)
    top = pk.topk_distance(x, p, 3, "dot")
    want_values, want_indices = first_k(truth.transpose(1, 2).reshape(-1, 49), 3)
    assert torch.equal(top.indices.reshape(-1, 3), want_indices)


@pytest.mark.parametrize("shape", [(4, 1, 32), (4, 32, 1, 1)])
def test_euclidean_gradients_at_a_copy_with_one_position(backend, shape):
    """One position per image (every pair selected) and a prototype equal to a vector: the
    euclidean root's factor 1 / (2 sqrt(d + eps)) is 5e6 there, which the dense form
    2 (rowsum(G) a - G P) turned into a float32 gradient 66% off (the long pooling fuzz found
    it); the copy's own term is exactly 0."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    p = torch.randn(10, 32, generator=generator)
    p[3] = x[1].flatten()
    weights = torch.randn(4, 10, generator=generator)
    skip_if_refused(backend, "min_distance", x, p, "euclidean")
    xg, pg = x.clone().requires_grad_(), p.clone().requires_grad_()
    (pk.min_distance(xg, pg, "euclidean").values * weights).sum().backward()
    want_x, want_p = topk_grads(x, p, "euclidean", 1, weights[..., None])
    assert relative_error(xg.grad, want_x) <= TOLERANCE[torch.float32]
    assert relative_error(pg.grad, want_p) <= TOLERANCE[torch.float32]


def test_euclidean_eps_is_checked_and_used():
    x, p = torch.randn(2, 4, 3, 3), torch.randn(3, 4)
    p[0] = x[0, :, 1, 1]
    values, _ = pk.min_distance(x, p, "euclidean", eps=1e-6)
    assert values[0, 0] == pytest.approx(1e-3, rel=1e-6)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        pk.min_distance(x, p, "euclidean", eps=-1.0)
    with pytest.raises(TypeError, match="eps must be a float"):
        pk.mean_distance(x, p, "euclidean", eps="1e-14")


def test_unknown_metric_names_the_new_ones():
    with pytest.raises(ValueError, match="'euclidean', 'dot'"):
        pk.topk_distance(torch.randn(2, 4, 3, 3), torch.randn(3, 4), 1, "l1")


# ---------------------------------------------------------------------------------------------
# registration: opcheck, compile, double backward


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine", "dot"])
def test_opcheck(backend, metric):
    x, p = make("2x3", torch.float64)
    x4, p4, _ = canonicalize(x, p, metric, "test")
    x4, p4 = x4.requires_grad_(), p4.requires_grad_()
    for op, args in (("topk_distance", (metric, 2)), ("mean_distance", (metric,))):
        skip_if_refused(backend, op, x, p, metric, **({"k": 2} if op == "topk_distance" else {}))
        opcheck(getattr(torch.ops.protokern, op).default, (x4, p4, *args, backend))
    values, indices = torch.ops.protokern.topk_distance(x4, p4, metric, 2, backend)
    mean = torch.ops.protokern.mean_distance(x4, p4, metric, backend)
    for needs in [(True, True), (True, False), (False, True)]:
        opcheck(torch.ops.protokern.topk_distance_backward.default,
                (torch.randn_like(values), x4.detach(), p4.detach(), indices, metric, backend,
                 *needs))
        opcheck(torch.ops.protokern.mean_distance_backward.default,
                (torch.randn_like(mean), x4.detach(), p4.detach(), metric, backend, *needs))


def test_compiles_without_graph_breaks():
    """ProtoPool's focal similarity and Deformable ProtoPNet's top-k mean, with the euclidean
    metric, compiled with fullgraph=True: equal values and gradients to eager."""
    torch._dynamo.reset()
    p = torch.randn(6, 8, requires_grad=True)

    def heads(x):
        focal = pk.min_distance(x, p, "euclidean").values - pk.mean_distance(x, p)
        topk = pk.topk_distance(x, p, 3, "dot").values.mean(-1)
        return (focal.square() + topk).sum()

    compiled = torch.compile(heads, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 8, 3, 4, requires_grad=True)
    loss = compiled(x)
    loss.backward()
    grads = x.grad.clone(), p.grad.clone()
    x.grad = p.grad = None
    eager = heads(x)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for got, want in zip(grads, (x.grad, p.grad), strict=True):
        torch.testing.assert_close(got, want)
    torch._dynamo.reset()


def test_double_backward_is_refused():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    p = torch.randn(3, 4)
    for out in (pk.topk_distance(x, p, 2).values, pk.mean_distance(x, p)):
        (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="do not support double backward"):
            grad.sum().backward()


def test_reference_gradcheck():
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    p = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    with pk.use_backend("reference"):
        for metric in ALL_METRICS:
            assert torch.autograd.gradcheck(
                lambda a, b, m=metric: (pk.topk_distance(a, b, 2, m).values,
                                        pk.mean_distance(a, b, m)), (x, p))


# ---------------------------------------------------------------------------------------------
# what runs where (the automatic choice)


@pytest.mark.skipif("cpu" not in pk.available_backends(), reason="protokern._C is not built")
def test_the_automatic_choice_on_cpu_tensors():
    """cpu runs topk_distance (its C++ tile reduction with k survivors, the fused min backward)
    and mean_distance (the closed form), and every op with the dot metric (its own bound)."""
    x, p = make("2x3")
    cpu = registry.registered_backend("cpu")
    x4, p4, _ = canonicalize(x, p, "sqeuclidean", "test")
    for op in ("min_distance", "nearest_prototypes", "topk_distance"):
        assert cpu.supports(op, x4, p4, metric="dot", k=2) is None
    with pk.recording() as calls:
        pk.topk_distance(x.requires_grad_(), p, 3).values.sum().backward()
        pk.mean_distance(x, p)
        pk.min_distance(x, p, "dot").values.sum().backward()
        pk.nearest_prototypes(x, p, 2, "dot").values.sum().backward()
    assert calls == [("topk_distance", "cpu"), ("topk_distance_backward", "cpu"),
                     ("mean_distance", "cpu"), ("min_distance", "cpu"),
                     ("min_distance_backward", "cpu"), ("nearest_prototypes", "cpu"),
                     ("nearest_prototypes_backward", "cpu")]
