"""The coreset's greedy k-center against a brute force that holds the full (N, D) differences
every step (anomalib's formulation): the same selected indices, ties included; the sparse
random projection and the Johnson-Lindenstrauss dimension."""

import math

import pytest
import torch

from protokern.nn.coreset import (
    coreset_indices,
    johnson_lindenstrauss_dim,
    k_center_greedy,
    sparse_random_projection,
)


def brute_force_k_center(points: torch.Tensor, num_centers: int, start: int) -> list[int]:
    """Greedy k-center: each step the point farthest from all chosen centers (first on ties),
    never one chosen before."""
    selected = [start]
    nearest = ((points - points[start]) ** 2).sum(1)
    nearest[start] = float("-inf")
    while len(selected) < num_centers:
        center = int(nearest.argmax())
        selected.append(center)
        nearest = torch.minimum(nearest, ((points - points[center]) ** 2).sum(1))
        nearest[selected] = float("-inf")
    return selected


def _clusters(count: int, dim: int) -> torch.Tensor:
    """Points around 12 far-apart centers: most steps screen out most points (the matrix-vector
    screen's sparse path), unlike spread-out random points."""
    generator = torch.Generator().manual_seed(5)
    centers = 20 * torch.randn(12, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(12, (count,), generator=generator)
    return centers[labels] + torch.randn(count, dim, generator=generator, dtype=torch.float64)


def _lattice(count: int, dim: int) -> torch.Tensor:
    """Integer points with many repeats: every distance is an exact small integer whatever the
    summation order, so ties are exact ties."""
    return torch.randint(0, 3, (count, dim), generator=torch.Generator().manual_seed(3)).float()


@pytest.mark.parametrize("points, num_centers, start", [
    (torch.randn(300, 7, dtype=torch.float64), 40, 0),
    (torch.randn(257, 33), 25, 100),  # float32: the op's exact distances, no near ties here
    (_clusters(3000, 8), 40, 17),
    (_clusters(3000, 8).float(), 40, 17),
    (_lattice(120, 3), 27, 5),  # 27 distinct lattice points: ties at every step, then zeros
    (_lattice(60, 2), 60, 59),  # every point, duplicates last at distance 0 (lowest index)
])
def test_matches_brute_force(points, num_centers, start):
    expected = brute_force_k_center(points, num_centers, start)
    assert k_center_greedy(points, num_centers, start=start).tolist() == expected


def test_coreset_indices_draw_the_start_and_size():
    points = torch.randn(500, 16, dtype=torch.float64)
    indices = coreset_indices(points, 0.05, seed=4)
    start = int(torch.randint(500, (), generator=torch.Generator().manual_seed(4)))
    assert indices.tolist() == brute_force_k_center(points, 25, start)
    projected = sparse_random_projection(points, 8, seed=4)
    assert coreset_indices(points, 0.05, projection=8, seed=4).tolist() == (
        brute_force_k_center(projected, 25, start))


def test_sparse_random_projection_matrix():
    dim_in, dim_out = 64, 20
    matrix = sparse_random_projection(torch.eye(dim_in, dtype=torch.float64), dim_out, seed=1)
    scale = math.sqrt(math.sqrt(dim_in)) / math.sqrt(dim_out)  # sqrt(1 / density) / sqrt(d)
    values = set(matrix.unique().tolist())
    assert values <= {-scale, 0.0, scale} and len(values) == 3
    assert abs((matrix != 0).double().mean().item() - 1 / math.sqrt(dim_in)) < 0.05
    assert torch.equal(matrix, sparse_random_projection(torch.eye(dim_in, dtype=torch.float64),
                                                        dim_out, seed=1))


def test_johnson_lindenstrauss_dim():
    assert johnson_lindenstrauss_dim(1_000_000, 0.5) == 663  # scikit-learn's documented value
    assert johnson_lindenstrauss_dim(50_000, 0.9) == 267


@pytest.mark.parametrize("call, error, message", [
    (lambda: k_center_greedy(torch.randn(5, 2, 2), 2), ValueError, r"\(N, D\).*\(5, 2, 2\)"),
    (lambda: k_center_greedy(torch.randn(5, 2), 6), ValueError, r"num_centers=6.*N=5"),
    (lambda: k_center_greedy(torch.randn(5, 2), 2, start=5), ValueError, "start=5"),
    (lambda: k_center_greedy(torch.tensor([[1.0], [float("nan")]]), 1), ValueError, "NaN"),
    (lambda: k_center_greedy(torch.ones(4, 2, dtype=torch.int64), 1), TypeError, "int64"),
    (lambda: coreset_indices(torch.randn(5, 2), 0.0), ValueError, "ratio"),
    (lambda: coreset_indices(torch.randn(5, 2), 0.5, projection="big"), ValueError,
     "projection"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
