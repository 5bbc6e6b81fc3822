"""PrototypeHead against explicit float64 computations: means, logits, growth, TEEN, saving."""

import math

import pytest
import torch

from protokern.heads import PrototypeHead, kmeans
from protokern.testing import TOLERANCE, relative_error

F32 = TOLERANCE[torch.float32]
F64 = TOLERANCE[torch.float64]


def brute_force_logits(features, prototypes_per_class, metric, scale):
    """Explicit loops in float64: ``prototypes_per_class`` is a list (one entry per class) of
    lists of prototype vectors, or None for a class without samples (-inf)."""
    x = features.double()
    out = torch.empty(x.shape[0], len(prototypes_per_class), dtype=torch.float64)
    for i in range(x.shape[0]):
        for c, protos in enumerate(prototypes_per_class):
            if protos is None:
                out[i, c] = -math.inf
                continue
            best = -math.inf
            for p in protos:
                p = p.double()
                if metric == "cosine":
                    sim = float((x[i] * p).sum() / (max(float(x[i].norm()), 1e-8)
                                                    * max(float(p.norm()), 1e-8)))
                else:
                    sim = -float(((x[i] - p) ** 2).sum())
                best = max(best, sim)
            out[i, c] = scale * best
    return out


def explicit_means(features, labels, num_classes):
    means = []
    for c in range(num_classes):
        rows = [features[i].double() for i in range(len(labels)) if labels[i] == c]
        means.append(None if not rows else [sum(rows) / len(rows)])
    return means


@pytest.mark.parametrize("metric", ["cosine", "sqeuclidean"])
def test_logits_match_brute_force(cpu_backend, metric):
    features, labels = torch.randn(40, 12), torch.randint(0, 4, (40,))
    labels[labels == 3] = 2  # class 3 gets no sample: masked
    head = PrototypeHead(12, num_classes=4, metric=metric, scale=3.0)
    head.update(features, labels)
    queries = torch.randn(9, 12)
    logits = head(queries)
    expected = brute_force_logits(queries, explicit_means(features, labels, 4), metric, 3.0)
    assert logits.shape == (9, 4) and logits.dtype == torch.float32
    assert torch.isneginf(logits[:, 3]).all()
    assert relative_error(logits[:, :3], expected[:, :3]) <= F32
    assert torch.equal(head.predict(queries, topk=2), expected.topk(2, dim=1).indices)


def test_streaming_updates_equal_one_big_update():
    features, labels = torch.randn(500, 16) * 10 + 3, torch.randint(0, 7, (500,))
    one = PrototypeHead(16, 7, metric="sqeuclidean")
    one.update(features, labels)
    many = PrototypeHead(16, 7, metric="sqeuclidean")
    bounds = [0, 1, 2, 5, 5, 37, 38, 120, 121, 300, 499, 500]  # includes empty and 1-row calls
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        many.update(features[lo:hi], labels[lo:hi])
    assert torch.equal(one.class_counts, many.class_counts)
    assert relative_error(many.class_sums, one.class_sums) <= F64
    expected = torch.stack([features[labels == c].double().mean(0) for c in range(7)])
    assert relative_error(many.class_means(), expected) <= F64
    queries = torch.randn(20, 16)
    assert relative_error(many(queries), one(queries)) <= F32


@pytest.mark.parametrize("protos_per_class", [1, 3])
def test_growth_keeps_old_logits(protos_per_class):
    head = PrototypeHead(10, 3, metric="cosine", protos_per_class=protos_per_class)
    head.update(torch.randn(60, 10), torch.arange(60) % 3)
    queries = torch.randn(15, 10)
    before = head(queries)
    new = head.add_classes(2)
    assert list(new) == [3, 4]
    grown_unseen = head(queries)
    assert torch.equal(grown_unseen[:, :3], before) and torch.isneginf(grown_unseen[:, 3:]).all()
    head.update(torch.randn(30, 10), 3 + torch.arange(30) % 2)
    after = head(queries)
    assert torch.equal(after[:, :3], before)
    assert torch.isfinite(after).all()


def test_several_prototypes_per_class_are_kmeans_centers_and_max_similarity(cpu_backend):
    # each class: two tight blobs far apart, so its 2 k-means centers are the blob means
    gen = torch.Generator().manual_seed(1)
    centers = torch.randn(3, 2, 6, generator=gen) * 10
    features = torch.cat([centers[c, b] + 0.1 * torch.randn(25, 6, generator=gen)
                          for c in range(3) for b in range(2)])
    labels = torch.arange(3).repeat_interleave(50)
    head = PrototypeHead(6, 3, metric="sqeuclidean", protos_per_class=2, scale=0.5)
    head.update(features, labels)
    bank, valid = head.prototypes()
    assert valid.all()
    blob_means = features.double().view(3, 2, 25, 6).mean(2)
    for c in range(3):  # centers in either order
        found = sorted(bank[c].tolist())
        assert relative_error(torch.tensor(found), torch.tensor(sorted(blob_means[c].tolist()))
                              ) <= F32
    queries = torch.randn(12, 6) * 10
    expected = brute_force_logits(queries, [list(bank[c]) for c in range(3)], "sqeuclidean",
                                  0.5)
    assert relative_error(head(queries), expected) <= F32


def test_class_with_fewer_samples_than_prototypes():
    head = PrototypeHead(4, 2, metric="cosine", protos_per_class=3)
    head.update(torch.randn(5, 4), torch.tensor([0, 0, 0, 0, 1]))  # class 1: one sample
    bank, valid = head.prototypes()
    assert valid[0].all() and valid[1].tolist() == [True, False, False]
    queries = torch.randn(6, 4)
    expected = brute_force_logits(queries, [list(bank[0]), [bank[1, 0]]], "cosine", 1.0)
    assert relative_error(head(queries), expected) <= F32


def test_teen_cosine_hand_checked():
    # base means (1, 0) and (0, 1); new class mean (3, 4), i.e. (0.6, 0.8) normalised.
    # cosines 0.6 and 0.8; temperature 0.1: w = softmax(6, 8) = (0.1192029, 0.8807971);
    # sum w p_b = (0.1192029, 0.8807971), normalised: (0.1341127, 0.9909661);
    # alpha 0.5: 0.5 * (0.6, 0.8) + 0.5 * (0.1341127, 0.9909661) = (0.3670563, 0.8954830)
    head = PrototypeHead(2, 2, metric="cosine")
    head.update(torch.tensor([[2.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 1]))
    head.add_classes(1)
    head.update(torch.tensor([[3.0, 4.0]]), torch.tensor([2]))
    calibrated = head.calibrate_teen(alpha=0.5, temperature=0.1)
    expected = torch.tensor([[0.3670563, 0.8954830]], dtype=torch.float64)
    assert (calibrated - expected).abs().max() < 1e-6
    bank, _ = head.prototypes()
    assert (bank[2, 0] - expected[0]).abs().max() < 1e-6
    # the forward pass uses it: cosine of a query with the calibrated prototype
    query = torch.tensor([[1.0, 1.0]])
    expected_logit = float(expected[0].sum() / (math.sqrt(2) * expected[0].norm()))
    assert abs(float(head(query)[0, 2]) - expected_logit) < 1e-6
    # new samples of the class drop the calibration
    head.update(torch.tensor([[3.0, 4.0]]), torch.tensor([2]))
    assert not head.teen_calibrated[2]


def test_teen_sqeuclidean_hand_checked():
    # base means (0, 0) and (3, 0); new mean (1, 0): squared distances 1 and 4, temperature 1:
    # w = softmax(-1, -4) = (0.9525741, 0.0474259); sum w p_b = (0.1422776, 0);
    # alpha 0.5: 0.5 * (1, 0) + 0.5 * (0.1422776, 0) = (0.5711388, 0)
    head = PrototypeHead(2, 2, metric="sqeuclidean")
    head.update(torch.tensor([[0.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 1]))
    head.add_classes(1)
    head.update(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), torch.tensor([2, 2]))
    calibrated = head.calibrate_teen(alpha=0.5, temperature=1.0)
    assert (calibrated - torch.tensor([[0.5711388, 0.0]], dtype=torch.float64)).abs().max() < 1e-6


def test_teen_errors():
    head = PrototypeHead(2, 2, protos_per_class=2)
    with pytest.raises(ValueError, match="protos_per_class=2"):
        head.calibrate_teen(0.5, 0.1)
    head = PrototypeHead(2, 2)
    head.update(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="alpha"):
        head.calibrate_teen(1.5, 0.1)
    with pytest.raises(ValueError, match="temperature"):
        head.calibrate_teen(0.5, 0.0)


@pytest.mark.parametrize("protos_per_class", [1, 2])
def test_state_dict_round_trips_across_growth(protos_per_class):
    head = PrototypeHead(8, 2, metric="cosine", protos_per_class=protos_per_class, scale=4.0,
                         seed=11)
    head.update(torch.randn(20, 8), torch.arange(20) % 2)
    head.add_classes(3)
    head.update(torch.randn(30, 8), 2 + torch.arange(30) % 3)
    if protos_per_class == 1:
        head.calibrate_teen(0.3, 0.2)
    queries = torch.randn(7, 8)
    expected = head(queries)
    state = head.state_dict()
    for start in (0, 2, 9):  # smaller, equal-at-first, larger head
        fresh = PrototypeHead(8, start, metric="cosine", protos_per_class=protos_per_class)
        fresh.load_state_dict(state)
        assert fresh.num_classes == 5 and fresh.scale == 4.0 and fresh.num_sessions == 2
        assert fresh.seed == 11
        assert torch.equal(fresh(queries), expected)
    with pytest.raises(ValueError, match="dim=8"):
        PrototypeHead(6, 0, protos_per_class=protos_per_class).load_state_dict(state)
    with pytest.raises(ValueError, match="metric"):
        PrototypeHead(8, 0, metric="sqeuclidean",
                      protos_per_class=protos_per_class).load_state_dict(state)


def test_errors_name_arguments_and_shapes():
    head = PrototypeHead(4, 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\).*add_classes"):
        head.update(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"features must be \(N, 4\), got \(3, 5\)"):
        head.update(torch.randn(3, 5), torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError, match="labels"):
        head.update(torch.randn(3, 4), torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="disagree on N"):
        head.update(torch.randn(3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="topk"):
        head.predict(torch.randn(3, 4))  # no class has samples yet
    with pytest.raises(ValueError, match="metric"):
        PrototypeHead(4, metric="l1")


def test_gradient_reaches_features():
    head = PrototypeHead(5, 3, metric="cosine", scale=10.0)
    head.update(torch.randn(30, 5), torch.arange(30) % 3)
    x = torch.randn(4, 5, requires_grad=True)
    torch.nn.functional.cross_entropy(head(x), torch.tensor([0, 1, 2, 0])).backward()
    xd = x.detach().double().requires_grad_()
    means = head.class_means()
    logits = 10.0 * torch.nn.functional.cosine_similarity(xd[:, None], means[None], dim=-1)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    assert relative_error(x.grad, xd.grad) <= 1e-4


def test_kmeans_helper_is_used_per_class():
    """The head's centers for a class are exactly `kmeans` on that class's samples."""
    features, labels = torch.randn(40, 3), torch.arange(40) % 2
    head = PrototypeHead(3, 2, metric="sqeuclidean", protos_per_class=3, seed=5)
    head.update(features[:17], labels[:17])
    head.update(features[17:], labels[17:])
    bank, _ = head.prototypes()
    for c in range(2):
        expected = kmeans(features[labels == c], 3, "sqeuclidean", seed=5 + c).centers
        assert torch.equal(bank[c].float(), expected)


def test_nan_features():
    x = torch.randn(10, 4)
    x[0, 0] = float("nan")  # class 0
    labels = torch.arange(10) % 2
    several = PrototypeHead(4, 2, protos_per_class=2)
    several.update(x, labels)
    with pytest.raises(ValueError, match=r"class 0 \(protos_per_class=2\).*NaN or inf"):
        several(torch.randn(3, 4))
    # one prototype per class: the mean of class 0 is NaN, so are its logits; class 1 is not
    single = PrototypeHead(4, 2, metric="sqeuclidean")
    single.update(x, labels)
    logits = single(torch.randn(3, 4))
    assert logits[:, 0].isnan().all() and logits[:, 1].isfinite().all()
