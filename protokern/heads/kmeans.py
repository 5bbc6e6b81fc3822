"""k-means whose assignment step is protokern's fused nearest-prototypes op.

Used to find several prototypes per class (`PrototypeHead(protos_per_class=K)`) and to place
new part prototypes (`PartPrototypeHead.add_task(init="kmeans")`).
"""

from typing import NamedTuple

import torch
from torch import Tensor

from protokern.ops import check_metric, nearest_prototypes


class KMeansResult(NamedTuple):
    """Centers ``(k', D)`` (``k' = min(k, N)``, in the points' dtype) and the index of each
    point's center, ``(N,)`` int64."""

    centers: Tensor
    assignments: Tensor


def assign(points: Tensor, centers: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Nearest center of every point: ``(distances (N,), indices (N,) int64)``, by
    `protokern.nearest_prototypes` with the centers as the prototypes: fused, without the
    ``(N, k)`` distance matrix, ties going to the lowest center index."""
    values, indices = nearest_prototypes(points, centers, 1, metric)
    return values[:, 0], indices[:, 0]


def _normalized(t: Tensor) -> Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def kmeans(points: Tensor, k: int, metric: str = "sqeuclidean", iterations: int = 25,
           seed: int = 0) -> KMeansResult:
    """Lloyd's k-means (spherical k-means for ``metric="cosine"``), seeded k-means++ init.

    Args:
        points: ``(N, D)`` float tensor, N >= 1.
        k: number of centers wanted; ``min(k, N)`` are returned.
        metric: ``"sqeuclidean"`` (centers are means) or ``"cosine"`` (centers are unit-norm
            means of unit-norm points, which is what maximises the summed cosine similarity).
        iterations: at most this many assignment/update rounds (stops earlier when no
            assignment changes).
        seed: seeds the k-means++ draws, so equal inputs give equal centers.

    Returns:
        `KMeansResult`: ``centers`` ``(k', D)`` and ``assignments`` ``(N,)``. Every point is
        assigned to its nearest returned center (the final step is an assignment step).

    An empty cluster is re-seeded with the point farthest from its center (deterministic).
    Means are accumulated in float64, distances computed by the op in the points' dtype.
    Raises ValueError if a point has a NaN or infinite coordinate.
    """
    if not isinstance(points, Tensor) or points.dim() != 2:
        shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
        raise ValueError(f"kmeans: points must be a (N, D) tensor, got {shape}")
    if points.shape[0] == 0:
        raise ValueError(f"kmeans: points {tuple(points.shape)} is empty; need N >= 1")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"kmeans: k must be a positive int, got {k!r}")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"kmeans: iterations must be a positive int, got {iterations!r}")
    check_metric(metric, "kmeans")
    points = points.detach()
    finite = torch.isfinite(points).all(dim=1)
    if not finite.all():
        # a NaN or inf point has no distance to anything: k-means++ could not draw from its
        # NaN probabilities and the means would be NaN, so refuse the input by name
        bad = (~finite).nonzero().flatten()
        raise ValueError(f"kmeans: points {tuple(points.shape)} contain NaN or inf in "
                         f"{len(bad)} rows (first: {bad[:10].tolist()}); k-means needs finite "
                         f"points")
    if metric == "cosine":
        points = _normalized(points)
    num = points.shape[0]
    k = min(k, num)
    generator = torch.Generator().manual_seed(seed)

    # k-means++: each next center drawn with probability proportional to its distance to the
    # nearest center chosen so far (squared euclidean, or cosine distance on the sphere).
    chosen = [int(torch.randint(num, (1,), generator=generator))]
    nearest = assign(points, points[chosen], metric)[0].double().clamp_min(0)
    while len(chosen) < k:
        total = nearest.sum()
        if total <= 0:  # all remaining points coincide with centers: take unused ones in order
            unused = [i for i in range(num) if i not in set(chosen)]
            chosen.append(unused[0])
        else:
            chosen.append(int(torch.multinomial((nearest / total).cpu(), 1,
                                                generator=generator)))
        nearest = torch.minimum(
            nearest, assign(points, points[chosen[-1:]], metric)[0].double().clamp_min(0))
    centers = points[chosen].clone()

    assignments = assign(points, centers, metric)[1]
    for _ in range(iterations):
        sums = torch.zeros(k, points.shape[1], dtype=torch.float64, device=points.device)
        sums.index_add_(0, assignments, points.double())
        counts = torch.bincount(assignments, minlength=k)
        new_centers = (sums / counts.clamp_min(1)[:, None]).to(points.dtype)
        if metric == "cosine":
            new_centers = _normalized(new_centers)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            distances = assign(points, centers, metric)[0]
            farthest = distances.argsort(descending=True).tolist()
            for cluster, point in zip(empty, farthest, strict=False):
                new_centers[cluster] = points[point]
        centers = new_centers
        new_assignments = assign(points, centers, metric)[1]
        if torch.equal(new_assignments, assignments) and not empty:
            break
        assignments = new_assignments
    return KMeansResult(centers, assignments)
