"""Ops over a prototype bank split across the ranks of a process group: each rank holds a
contiguous shard (`protokern.distributed.collectives.shard_sizes`) and every rank passes the
same ``x``; the result is the unsharded op's over the whole bank.

`sharded_nearest_prototypes`: each rank takes the ``k`` nearest of its own shard, the ranks'
candidates are gathered and merged by (value, global index), so ties go to the lowest global
index and the result is the unsharded `protokern.nearest_prototypes`, bit for bit; gradients
reach each shard's rows on its own rank and ``x`` on every rank.
"""

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from protokern.distributed.collectives import all_gather_uneven, gather, sum_gradients
from protokern.ops import NearestPrototypes, nearest_prototypes


def merge_candidates(values: Tensor, indices: Tensor, k: int) -> NearestPrototypes:
    """The first ``k`` of candidates ``(..., C)`` by (value, index): NaN first (the minimum, as
    in `torch.min`), ties to the lowest index. Differentiable in ``values``."""
    by_index = indices.argsort(dim=-1, stable=True)
    values, indices = values.gather(-1, by_index), indices.gather(-1, by_index)
    key = torch.where(values.isnan(), float("-inf"), values.detach())
    order = key.argsort(dim=-1, stable=True)[..., :k]
    return NearestPrototypes(values.gather(-1, order), indices.gather(-1, order))


def sharded_nearest_prototypes(x: Tensor, shard: Tensor, k: int, metric: str, *,
                               shard_sizes: list[int], rank: int,
                               group: ProcessGroup) -> NearestPrototypes:
    """`protokern.nearest_prototypes` of ``x`` over the bank whose rank-``r`` shard has
    ``shard_sizes[r]`` rows, ``shard`` being this rank's; indices are global. A collective:
    every rank of ``group`` calls it with the same ``x`` and ``k``.

    Gradient convention (as `protokern.nn.ShardedPrototypeLayer`'s default): every rank
    computes the same loss from the result, and the gradients are the unsharded op's (each
    rank gets its shard's rows, ``x`` the full gradient on every rank).
    """
    total = sum(shard_sizes)
    if not 1 <= k <= total:
        raise ValueError(f"sharded_nearest_prototypes: k={k} must be between 1 and the bank's "
                         f"M={total} prototypes")
    x = sum_gradients(x, group)  # each rank's shard contributes a part of x's gradient
    local_k = min(k, shard.shape[0])
    values, indices = nearest_prototypes(x, shard, local_k, metric)
    indices = indices + sum(shard_sizes[:rank])
    if local_k < k:  # a shard smaller than k: pad; the padding sorts after every prototype
        shape = (*values.shape[:-1], k - local_k)
        values = torch.cat([values, values.new_full(shape, float("inf"))], -1)
        indices = torch.cat([indices, indices.new_full(shape, total)], -1)
    world = len(shard_sizes)
    gathered = gather(values, [k] * world, -1, group, sum_gradients=False)
    gathered_indices = all_gather_uneven(indices, [k] * world, -1, group)
    return merge_candidates(gathered, gathered_indices, k)
