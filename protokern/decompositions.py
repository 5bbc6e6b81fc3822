"""ATen formulations of protokern's ops, which exported programs hold in place of the fused
custom ops (`torch.export`, and so ``torch.onnx.export(..., dynamo=True)``).

While `torch.compiler.is_exporting()`, the public functions of `protokern.ops` call
``DECOMPOSITIONS[op]`` instead of ``torch.ops.protokern.<op>``: the exported program holds only
standard ATen ops (matmul, unfold, argmin, gather, scatter, ...), so it runs in onnxruntime or
after ``torch.export.load`` without protokern, while eager and compiled code keep the fused
kernels. Each entry takes the op's canonical arguments (``x`` ``(B, D, H, W)``, ``prototypes``
``(M, D, ph, pw)``, a `protokern.ops.KERNEL_METRICS` metric, then ``k`` where the op has one)
and returns what the op does, with its semantics:

- The distances are the reference's GEMM expansion (`protokern.backends.reference.expansion`,
  of its `rows_and_protos`), sqeuclidean's taken about the prototypes' mean
  (`reference.finite_mean`) so that features and prototypes far from the origin keep their
  digits. The expansion only chooses; every returned value is then recomputed directly at its
  pair (`reference.distance_at`) and the chosen ones are ordered by (value, index). So values
  ascend, ties go to the lowest index (between windows or prototypes whose expansions are
  equal too: identical ones are), and the value at a pushed patch is 0;
  as with the fused backends, an index may move between positions whose distances differ by
  less than the expansion's rounding (DESIGN §5). Computed in float32 for float16, bfloat16
  and float32 inputs (no float64 in the graph), in float64 for float64.
- A NaN distance comes first (its index the first NaN's), as in eager: the choice is an argmin
  of a key where NaN is ``-inf``, since ONNX's ArgMin skips NaN where `torch.argmin` takes it.
  The ``k`` smallest are ``k`` argmins (`first_k_positions`): ONNX has no stable sort and the
  order of `torch.topk` among ties is unspecified.
- Memory: where the fused ops stream, the graph holds per block of ``c`` prototypes (`blocks`:
  about `BLOCK_ELEMENTS` entries per image, at most `MAX_BLOCKS` blocks) the expansion
  ``(B, c, L')`` and the rows of the chosen pairs for the recompute ``(B, c k, K)``,
  ``K = D ph pw``, with a few temporaries of each; ``ph x pw`` windows add their unfolded
  patches ``(B, L', K)``. `nearest_prototypes` holds ``(B, L', c)`` per block and the chosen
  prototypes' rows ``(B, L', k, K)``. `mean_distance` is the reference's closed form: no map.

Inference only: export in eval mode; training (backward, the optimiser steps, push) stays in
PyTorch, on the fused ops.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from protokern.backends import reference
from protokern.backends.reference import (
    distance_at,
    expansion,
    finite_mean,
    prototype_blocks,
    rows_and_protos,
)

BLOCK_ELEMENTS = 1 << 16
"""About how many entries (distances, and the rows gathered for the recompute) one block of
prototypes holds per image: 256 KiB in float32. The batch is dynamic and a graph has no loop
over it, so the blocks are sized per image, by the static dimensions."""

MAX_BLOCKS = 64
"""At most this many blocks per op (each adds its nodes to the graph, and export time goes by
nodes); past it, the blocks grow instead."""

DECOMPOSITIONS: dict[str, Callable] = {}
"""Custom op name (``torch.ops.protokern.<name>``) -> its ATen formulation; every forward op
has one (the tests check)."""


def decomposition(op: str) -> Callable[[Callable], Callable]:
    """Register the decorated function as op ``op``'s entry in `DECOMPOSITIONS`."""

    def register(function: Callable) -> Callable:
        DECOMPOSITIONS[op] = function
        return function

    return register


def blocks(num_prototypes: int, elements_per_prototype: int) -> list[slice]:
    """The prototype blocks of a graph whose prototypes each hold ``elements_per_prototype``
    entries per image: `prototype_blocks` of `BLOCK_ELEMENTS` per image, or of more where that
    would make more than `MAX_BLOCKS`. One block when the count is dynamic (a map of dynamic
    size: a graph cannot size its blocks by it)."""
    if not isinstance(elements_per_prototype, int):
        return [slice(0, num_prototypes)]
    fewest = -(-num_prototypes // MAX_BLOCKS) * elements_per_prototype
    return prototype_blocks(num_prototypes, elements_per_prototype,
                            max(BLOCK_ELEMENTS, fewest))


def row_sum(terms: Tensor) -> Tensor:
    """The recompute's sum over the last dim: one reduction (ONNX ReduceSum), where
    `reference.fixed_order_sum`'s pairwise adds cost a few slices and pads per halving. Every row
    is summed alike, so identical windows (or prototypes) still get identical values."""
    return terms.sum(-1)


def nan_first(distances: Tensor) -> Tensor:
    """The selection key of ``distances``: NaN as ``-inf``, so that it comes first (as a NaN is
    `torch.min`'s minimum) in onnxruntime as in PyTorch."""
    return torch.where(distances.isnan(), float("-inf"), distances)


def first_k_positions(distances: Tensor, k: int) -> Tensor:
    """Positions ``(..., k)`` int64 of the ``k`` smallest of ``distances`` ``(..., n)`` along the
    last dim, ascending, ties to the lowest position, NaN first (`nan_first`): ``k`` argmins
    (first index on ties, in PyTorch and ONNX alike), each taken position then set to ``inf``
    (a real ``inf`` was lowered to the largest finite value, so that it comes before a taken
    one)."""
    key = nan_first(distances)
    if k == 1:
        return key.argmin(-1, keepdim=True)
    key = torch.where(key == float("inf"), torch.finfo(key.dtype).max, key)
    picks = []
    for rank in range(k):
        picks.append(key.argmin(-1, keepdim=True))
        if rank + 1 < k:
            key = key.scatter(-1, picks[-1], float("inf"))
    return torch.cat(picks, -1)


def in_exact_order(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """The ``k`` chosen pairs ``(..., k)`` (exact ``values``, their ``indices``) ordered by
    (value, index), NaN first: by index, then by value with ties to the earlier."""
    if values.shape[-1] == 1:
        return values, indices
    indices, by_index = indices.sort(-1)  # distinct indices: no tie to break
    values = values.gather(-1, by_index)
    order = first_k_positions(values, values.shape[-1])
    return values.gather(-1, order), indices.gather(-1, order)


def selection_space(rows: Tensor, protos: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """``rows`` and ``protos`` as the expansion sees them: sqeuclidean's about the prototypes'
    mean (distances do not change; their rounding shrinks with the norms), the others' as
    they are (neither metric is invariant under a shift)."""
    if metric != "sqeuclidean":
        return rows, protos
    shift = finite_mean(protos)
    return rows - shift, protos - shift


def _nearest_positions(x: Tensor, prototypes: Tensor, metric: str, k: int
                       ) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per block of prototypes: ``(expansion (B, c, L'), chosen positions (B, c, k), their
    exact distances (B, c, k))``, the positions the ``k`` smallest of the expansion."""
    rows, protos = rows_and_protos(x, prototypes)
    near_rows, near_protos = selection_space(rows, protos, metric)
    batch, positions, _ = rows.shape
    image = torch.arange(batch, device=x.device)[:, None]
    results = []
    for block in blocks(protos.shape[0], positions + k * protos.shape[1]):
        dist = expansion(near_rows, near_protos[block], metric)
        chosen = first_k_positions(dist, k)
        block_protos = protos[block].repeat_interleave(k, 0) if k > 1 else protos[block]
        exact = distance_at(rows[image, chosen.flatten(1)], block_protos, metric, row_sum)
        results.append((dist, chosen, exact.view(chosen.shape)))
    return results


@decomposition("topk_distance")
def topk_distance(x: Tensor, prototypes: Tensor, metric: str, k: int) -> tuple[Tensor, Tensor]:
    """`protokern.topk_distance`: ``values`` ``(B, M, k)`` ascending in ``x.dtype`` and their
    positions, flat over ``H' x W'``."""
    values, indices = zip(*(in_exact_order(exact, chosen)
                            for _, chosen, exact in _nearest_positions(x, prototypes, metric, k)),
                          strict=True)
    return torch.cat(values, 1).to(x.dtype), torch.cat(indices, 1)


@decomposition("min_distance")
def min_distance(x: Tensor, prototypes: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """`protokern.min_distance`: ``values`` and ``indices`` ``(B, M)``."""
    values, indices = topk_distance(x, prototypes, metric, 1)
    return values[..., 0], indices[..., 0]


@decomposition("distance_map")
def distance_map(x: Tensor, prototypes: Tensor, metric: str) -> Tensor:
    """`protokern.distance_map` ``(B, M, H', W')`` in ``x.dtype``: the expansion, with each
    (image, prototype)'s minimum (its first position) the exact distance."""
    maps = [dist.scatter(2, chosen, exact.to(dist.dtype))
            for dist, chosen, exact in _nearest_positions(x, prototypes, metric, 1)]
    out_h, out_w = x.shape[2] - prototypes.shape[2] + 1, x.shape[3] - prototypes.shape[3] + 1
    return torch.cat(maps, 1).unflatten(-1, (out_h, out_w)).to(x.dtype)


@decomposition("nearest_prototypes")
def nearest_prototypes(x: Tensor, prototypes: Tensor, metric: str, k: int
                       ) -> tuple[Tensor, Tensor]:
    """`protokern.nearest_prototypes` of every window: ``values`` ``(B, L', k)`` ascending in
    ``x.dtype`` and ``indices`` into the prototypes. Each block's ``k`` nearest are kept and
    the blocks' merged in block order, so ties still go to the lowest index."""
    rows, protos = rows_and_protos(x, prototypes)
    near_rows, near_protos = selection_space(rows, protos, metric)
    keys, candidates = [], []
    for block in blocks(protos.shape[0], rows.shape[1]):
        dist = expansion(near_rows, near_protos[block], metric).transpose(1, 2)  # (B, L', c)
        chosen = first_k_positions(dist, min(k, dist.shape[-1]))
        keys.append(dist.gather(-1, chosen))
        candidates.append(chosen + block.start)
    indices = candidates[0]
    if len(candidates) > 1:
        indices = torch.cat(candidates, -1).gather(-1, first_k_positions(torch.cat(keys, -1), k))
    exact = distance_at(rows[:, :, None, :], protos[indices], metric, row_sum)  # (B, L', k)
    values, indices = in_exact_order(exact, indices)
    return values.to(x.dtype), indices


decomposition("mean_distance")(reference.mean_distance)  # a closed form already: no map
