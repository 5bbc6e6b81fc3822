"""PatchCore's coreset: greedy k-center selection on the fused nearest-prototypes op, and the
sparse random projection anomalib applies first.

k-center greedy keeps, for every point, its distance to the nearest selected center; each step
selects the point farthest from every center, then lowers each distance to the new center's
where that is smaller. anomalib's `KCenterGreedy` computes that update as
``torch.linalg.norm(features - center, dim=1)``, an ``(N, D)`` temporary every step. Here a
step is one matrix-vector product that screens out the points the new center cannot bring
closer (a GEMM expansion with a rounding bound), and `protokern.nearest_prototypes` against the
center recomputes the others exactly, a block of rows at a time: ``O(N)`` memory a step.

Exactness and ties: the distances are the op's exact squared distances (directly computed at
the pair, not the GEMM expansion), in the features' dtype; squared or not, the order, and so the
selection, is the same. Already selected points are set to ``-inf`` so that none is chosen
twice (duplicated points: their distance falls to 0, and a later step may choose one only when
every unselected point is at distance 0). ``argmax`` returns the first maximal entry: ties go
to the lowest index.
"""

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from protokern.ops import nearest_prototypes


def all_finite(features: Tensor) -> bool:
    """Whether ``features`` hold no NaN and no infinity, without a temporary of their size (as
    ``isfinite().all()`` makes: 85 MiB at 50000 x 256): their largest magnitude, a reduction,
    is finite."""
    return bool(torch.linalg.vector_norm(features, ord=float("inf")).isfinite())


def _check_points(features: Tensor, where: str) -> None:
    """TypeError/ValueError unless ``features`` is a floating ``(N, D)`` tensor without NaN."""
    if not isinstance(features, Tensor):
        raise TypeError(f"{where}: features must be a torch.Tensor, got "
                        f"{type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"{where}: features must be (N, D) vectors, got a {features.dim()}-d "
                         f"tensor of shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"{where}: features must be floating point, got {features.dtype} "
                        f"(shape {tuple(features.shape)})")
    if not all_finite(features):
        raise ValueError(f"{where}: features {tuple(features.shape)} contain NaN or infinity")


CHUNK_ROWS = 4096
"""Rows gathered at a time for the exact recomputation (bounds the gathered copy)."""


def k_center_greedy(features: Tensor, num_centers: int, *, start: int = 0,
                    progress: bool = False) -> Tensor:
    """Indices ``(num_centers,)`` int64 of the points greedy k-center selects, in the order
    selected, starting from point ``start``.

    Args:
        features: ``(N, D)`` points (float32 or float64; float64 for the exact selection a
            float64 brute force makes).
        num_centers: how many to select, ``1 <= num_centers <= N``.
        start: the first center (anomalib draws it at random; pass a seeded draw for that).
        progress: a tqdm bar over the steps.

    Each step screens every point with one matrix-vector product against the new center
    (``|x|^2 + |c|^2 - 2 x.c`` from the norms computed once, one pass over the points) and a
    rounding bound on it, then recomputes exactly, with `protokern.nearest_prototypes`
    against the center, only the points the center may bring closer, ``CHUNK_ROWS`` at a time:
    no ``(N, D)`` temporary. The distances kept are the op's exact ones, so the selection is
    that of one op call on every point per step. Ties go to the lowest index (module
    docstring).
    """
    where = "k_center_greedy"
    _check_points(features, where)
    count, dim = features.shape
    if isinstance(num_centers, bool) or not isinstance(num_centers, int):
        raise TypeError(f"{where}: num_centers must be an int, got {num_centers!r}")
    if not 1 <= num_centers <= count:
        raise ValueError(f"{where}: num_centers={num_centers} must be between 1 and the N={count} "
                         f"points of features {tuple(features.shape)}")
    if not 0 <= start < count:
        raise ValueError(f"{where}: start={start} is not a row of features "
                         f"{tuple(features.shape)}")
    features = features.detach()
    norms = torch.linalg.vector_norm(features, dim=1).square_()
    # |expansion - exact| <= (D + 3) eps (|x|^2 + |c|^2) for any summation order (a
    # gamma_D bound on each dot product and norm, three more roundings), and the op's exact
    # value is within D eps (|x|^2 + |c|^2) of the true distance: screen with both, doubled.
    slack = 2 * (2 * dim + 3) * torch.finfo(features.dtype).eps
    selected = torch.empty(num_centers, dtype=torch.int64, device=features.device)
    nearest = torch.full((count,), float("inf"), dtype=features.dtype, device=features.device)
    center = start
    for step in tqdm(range(num_centers), desc="coreset", disable=not progress, leave=False):
        selected[step] = center
        if step + 1 == num_centers:
            break
        new = features[center:center + 1]
        # |x|^2 + |c|^2 - 2 x.c less the bound (torch.mv, then in place: addmv is no BLAS call)
        screen = torch.mv(features, new[0]).mul_(-2).add_(norms + norms[center],
                                                          alpha=1 - slack)
        closer = (screen < nearest).nonzero()[:, 0]
        if len(closer) > count // 4:  # most of them: the op on all (it reads them in tiles)
            torch.minimum(nearest, nearest_prototypes(features, new, 1).values[:, 0],
                          out=nearest)
        else:  # a few: gathered, a block at a time
            for rows in closer.split(CHUNK_ROWS):
                exact = nearest_prototypes(features[rows], new, 1).values[:, 0]
                nearest[rows] = torch.minimum(nearest[rows], exact)
        nearest[center] = float("-inf")
        center = int(nearest.argmax())
    return selected


def johnson_lindenstrauss_dim(num_points: int, eps: float) -> int:
    """The smallest dimension a random projection of ``num_points`` points needs to keep every
    pairwise distance within a factor ``1 +- eps`` (scikit-learn's
    `johnson_lindenstrauss_min_dim`, which anomalib's coreset uses with ``eps = 0.9``)."""
    if not 0 < eps < 1:
        raise ValueError(f"johnson_lindenstrauss_dim: eps must be in (0, 1), got {eps!r}")
    return int(4 * math.log(num_points) / (eps ** 2 / 2 - eps ** 3 / 3))


def sparse_random_projection(features: Tensor, dim: int, seed: int = 0) -> Tensor:
    """``features`` ``(N, D)`` projected to ``(N, dim)`` by a sparse random matrix (Li et al.,
    as scikit-learn's `SparseRandomProjection` with its default density ``1 / sqrt(D)``):
    entries ``+-sqrt(1 / density) / sqrt(dim)`` with probability ``density / 2`` each, else 0.
    Drawn from ``seed`` on the CPU, so the same on every device and run."""
    _check_points(features, "sparse_random_projection")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"sparse_random_projection: dim must be a positive int, got {dim!r}")
    in_dim = features.shape[1]
    density = 1 / math.sqrt(in_dim)
    generator = torch.Generator().manual_seed(seed)
    draw = torch.rand(in_dim, dim, generator=generator, dtype=torch.float64)
    scale = math.sqrt(1 / density) / math.sqrt(dim)
    signs = (draw > 1 - density / 2).double() - (draw < density / 2).double()  # -1, 0 or +1
    matrix = signs * scale
    return features.detach() @ matrix.to(features.device, features.dtype)


def coreset_indices(features: Tensor, ratio: float, *, projection: int | str | None = None,
                    eps: float = 0.9, seed: int = 0, progress: bool = False) -> Tensor:
    """PatchCore's coreset of ``features`` ``(N, D)``: ``max(1, int(N * ratio))`` indices,
    greedy k-center on the features (or on a sparse random projection of them: ``projection``
    an int dimension, or ``"auto"`` for `johnson_lindenstrauss_dim` with ``eps``, anomalib's
    choice). The first center is drawn from ``seed``."""
    where = "coreset_indices"
    _check_points(features, where)
    if not 0 < ratio <= 1:
        raise ValueError(f"{where}: ratio must be in (0, 1], got {ratio!r}")
    count = features.shape[0]
    if count == 0:
        raise ValueError(f"{where}: features {tuple(features.shape)} has no points")
    points = features
    if projection == "auto":
        projection = johnson_lindenstrauss_dim(count, eps)
    if projection is not None:
        if isinstance(projection, bool) or not isinstance(projection, int):
            raise ValueError(f"{where}: projection must be None, 'auto' or an int, got "
                             f"{projection!r}")
        points = sparse_random_projection(features, projection, seed)
    start = int(torch.randint(count, (), generator=torch.Generator().manual_seed(seed)))
    return k_center_greedy(points, max(1, int(count * ratio)), start=start, progress=progress)
