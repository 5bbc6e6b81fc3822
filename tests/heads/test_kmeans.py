"""k-means (assignment by protokern.min_distance) against explicit float64 loops."""

import pytest
import torch
from cases import METRICS

from protokern.heads import kmeans
from protokern.heads.kmeans import assign
from protokern.testing import TOLERANCE, relative_error


@pytest.mark.parametrize("metric", METRICS)
def test_assignment_is_the_nearest_center(cpu_backend, metric):
    points, centers = torch.randn(50, 7), torch.randn(6, 7)
    values, indices = assign(points, centers, metric)
    for i in range(50):
        d = []
        for c in range(6):
            p, q = points[i].double(), centers[c].double()
            d.append(float(((p - q) ** 2).sum()) if metric == "sqeuclidean"
                     else 1 - float(p @ q / (p.norm() * q.norm())))
        best = min(range(6), key=lambda c: d[c])
        assert int(indices[i]) == best
        assert abs(float(values[i]) - d[best]) <= TOLERANCE[torch.float32] * max(1, abs(d[best]))


@pytest.mark.parametrize("metric", METRICS)
def test_result_is_a_lloyd_fixed_point(metric):
    gen = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(30, 4, generator=gen) + 6 * torch.randn(4, generator=gen)
                        for _ in range(3)])
    centers, assignments = kmeans(points, 3, metric, iterations=50, seed=3)
    assert centers.shape == (3, 4) and assignments.shape == (90,)
    x = points.double()
    if metric == "cosine":
        x = x / x.norm(dim=1, keepdim=True)
    for c in range(3):
        members = x[assignments == c]
        assert len(members) > 0
        mean = members.mean(0)
        if metric == "cosine":
            mean = mean / mean.norm()
        assert relative_error(centers[c], mean) <= TOLERANCE[torch.float32]
    assert torch.equal(assign(points, centers, metric)[1], assignments)


def test_recovers_separated_clusters_and_is_deterministic():
    gen = torch.Generator().manual_seed(1)
    truth = torch.randn(4, 3, generator=gen) * 20
    labels = torch.arange(4).repeat_interleave(10)
    points = truth[labels] + 0.1 * torch.randn(40, 3, generator=gen)
    first = kmeans(points, 4, seed=7)
    assert torch.equal(first.centers, kmeans(points, 4, seed=7).centers)
    # same partition as the truth, up to renaming
    mapping = {int(t): int(a) for t, a in zip(labels, first.assignments, strict=True)}
    assert len(set(mapping.values())) == 4
    assert all(mapping[int(t)] == int(a) for t, a in zip(labels, first.assignments, strict=True))


def test_fewer_points_than_k_and_errors():
    result = kmeans(torch.randn(2, 3), 5)
    assert result.centers.shape == (2, 3)
    with pytest.raises(ValueError, match=r"points must be a \(N, D\) tensor"):
        kmeans(torch.randn(3), 2)
    with pytest.raises(ValueError, match="empty"):
        kmeans(torch.randn(0, 3), 2)
    with pytest.raises(ValueError, match="k must be"):
        kmeans(torch.randn(4, 3), 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("metric", METRICS)
def test_non_finite_points_raise_a_clear_error(bad, metric):
    points = torch.randn(12, 4)
    points[5, 2] = bad
    points[9, 0] = bad
    # without the check: a crash in torch.multinomial on NaN probabilities
    with pytest.raises(ValueError, match=r"contain NaN or inf in 2 rows \(first: \[5, 9\]\)"):
        kmeans(points, 3, metric)
    # one row but k = 1 never draws: still refused (a NaN center would be a silent NaN)
    with pytest.raises(ValueError, match="NaN or inf"):
        kmeans(points[5:6], 1, metric)
