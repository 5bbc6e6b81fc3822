"""FeCAMHead against an explicit covariance, shrinkage and matrix inverse in float64."""

import pytest
import torch

from protokern.heads import FeCAMHead
from protokern.testing import TOLERANCE, relative_error

F32 = TOLERANCE[torch.float32]
F64 = TOLERANCE[torch.float64]


def explicit_shrunk(cov, g1, g2, normalize):
    """FeCAM's shrinkage written out entry by entry."""
    d = cov.shape[0]
    diag_mean = sum(float(cov[i, i]) for i in range(d)) / d
    off = [float(cov[i, j]) for i in range(d) for j in range(d) if i != j]
    off_mean = sum(off) / len(off)
    s = cov.clone()
    for i in range(d):
        for j in range(d):
            s[i, j] += g1 * diag_mean if i == j else g2 * off_mean
    if normalize:
        s = torch.stack([torch.stack([s[i, j] / (s[i, i] * s[j, j]).sqrt() for j in range(d)])
                         for i in range(d)])
    return s


def explicit_covariance(samples):
    """Unbiased covariance by explicit outer products, float64."""
    x = samples.double()
    mean = x.mean(0)
    return sum(torch.outer(r - mean, r - mean) for r in x) / (len(x) - 1), mean


def clustered(num_classes, per_class, dim, gen):
    mixing = torch.randn(num_classes, dim, dim, generator=gen)  # anisotropic, per class
    centers = 3 * torch.randn(num_classes, dim, generator=gen)
    x = torch.cat([centers[c] + torch.randn(per_class, dim, generator=gen) @ mixing[c]
                   for c in range(num_classes)])
    return x, torch.arange(num_classes).repeat_interleave(per_class)


@pytest.mark.parametrize("normalize", [True, False])
def test_per_class_matches_explicit_inverse(normalize):
    gen = torch.Generator().manual_seed(0)
    x, y = clustered(3, 15, 6, gen)
    head = FeCAMHead(6, 3, covariance="per_class", shrink=(1.0, 0.5), normalize=normalize)
    head.update(x, y)
    queries = torch.randn(10, 6, generator=gen) * 3
    expected = torch.empty(10, 3, dtype=torch.float64)
    for c in range(3):
        cov, mean = explicit_covariance(x[y == c])
        inverse = torch.linalg.inv(explicit_shrunk(cov, 1.0, 0.5, normalize))
        for i in range(10):
            diff = queries[i].double() - mean
            expected[i, c] = -(diff @ inverse @ diff)
    assert relative_error(head(queries), expected) <= F32
    assert relative_error(head(queries.double()), expected) <= F64


def test_shared_matches_explicit_inverse(cpu_backend):
    gen = torch.Generator().manual_seed(1)
    x, y = clustered(4, 12, 5, gen)
    head = FeCAMHead(5, 5, covariance="shared")  # class 4 without samples: -inf
    head.update(x, y)
    # pooled within-class covariance: sum of per-class scatters over N - C
    scatter = sum(explicit_covariance(x[y == c])[0] * (12 - 1) for c in range(4))
    inverse = torch.linalg.inv(explicit_shrunk(scatter / (48 - 4), 1.0, 1.0, True))
    means = [x[y == c].double().mean(0) for c in range(4)]
    queries = torch.randn(9, 5, generator=gen) * 3
    expected = torch.tensor([[-float((q.double() - m) @ inverse @ (q.double() - m))
                              for m in means] for q in queries])
    logits = head(queries)
    assert torch.isneginf(logits[:, 4]).all()
    assert relative_error(logits[:, :4], expected) <= F32


def test_streaming_updates_equal_one_big_update():
    gen = torch.Generator().manual_seed(2)
    x, y = clustered(3, 30, 4, gen)
    perm = torch.randperm(90, generator=gen)
    x, y = x[perm], y[perm]
    for covariance in ("shared", "per_class"):
        one, many = FeCAMHead(4, 3, covariance), FeCAMHead(4, 3, covariance)
        one.update(x, y)
        for lo in range(0, 90, 7):
            many.update(x[lo:lo + 7], y[lo:lo + 7])
        assert torch.equal(one.class_counts, many.class_counts)
        assert relative_error(many.outer_sums, one.outer_sums) <= F64
        assert relative_error(many.class_sums, one.class_sums) <= F64
        queries = torch.randn(5, 4, generator=gen)
        assert relative_error(many(queries), one(queries)) <= F32


def test_factors_are_cached_no_inverse_per_evaluation(monkeypatch):
    head = FeCAMHead(4, 2, covariance="per_class")
    head.update(torch.randn(20, 4), torch.arange(20) % 2)
    queries = torch.randn(6, 4)
    first = head(queries)

    def forbidden(*args, **kwargs):
        raise AssertionError("a matrix factorisation or inverse ran during evaluation")

    for name in ("cholesky", "cholesky_ex", "inv", "pinv", "solve_triangular", "solve"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    assert torch.equal(head(queries), first)
    monkeypatch.undo()
    head.update(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))  # new data: refactorised
    assert not torch.equal(head(queries), first)


def test_growth_keeps_old_per_class_logits_and_state_dict_round_trip():
    gen = torch.Generator().manual_seed(3)
    x, y = clustered(4, 10, 3, gen)
    head = FeCAMHead(3, 2, covariance="per_class")
    head.update(x[y < 2], y[y < 2])
    queries = torch.randn(5, 3, generator=gen)
    before = head(queries)
    head.add_classes(2)
    head.update(x[y >= 2], y[y >= 2])
    assert torch.equal(head(queries)[:, :2], before)
    fresh = FeCAMHead(3, 0, covariance="per_class")
    fresh.load_state_dict(head.state_dict())
    assert fresh.num_classes == 4 and torch.equal(fresh(queries), head(queries))
    with pytest.raises(ValueError, match="covariance"):
        FeCAMHead(3, 0, covariance="shared").load_state_dict(head.state_dict())


def test_errors():
    head = FeCAMHead(3, 2, covariance="per_class")
    head.update(torch.randn(3, 3), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match=r"classes \[1\] have 1"):
        head(torch.randn(2, 3))
    with pytest.raises(ValueError, match="covariance must be one of"):
        FeCAMHead(3, covariance="diagonal")
    shared = FeCAMHead(3, 2)
    shared.update(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="more samples than classes"):
        shared(torch.randn(2, 3))


@pytest.mark.parametrize("covariance", ["shared", "per_class"])
def test_non_finite_features_are_named(covariance):
    x, y = torch.randn(30, 4), torch.arange(30) % 3
    x[4, 2] = float("nan")  # class 1, feature 2
    head = FeCAMHead(4, 3, covariance)
    head.update(x, y)
    # without the check: "shrunk covariance ... is not positive definite; increase shrinkage"
    with pytest.raises(ValueError, match=r"classes \[1\] are not finite \(NaN or inf\) in "
                                         r"feature dimensions \[2\]"):
        head(torch.randn(2, 4))
    # finite sums whose squares overflow float64: named too
    big = FeCAMHead(4, 3, covariance)
    z = torch.randn(30, 4, dtype=torch.float64)
    z[7, 3] = 1e200  # class 1
    big.update(z, y)
    assert big.class_sums.isfinite().all()
    which = r"classes \[1\]" if covariance == "per_class" else "the shared covariance"
    with pytest.raises(ValueError, match=which + r" .* feature dimensions \[3\]"):
        big(torch.randn(2, 4))
