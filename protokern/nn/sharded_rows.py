"""A bank of rows (a VQ codebook, a PatchCore memory bank) split over the ranks of a process
group, as `protokern.nn.ShardedPrototypeLayer` splits its prototypes: the shard layout, the
nearest rows of the global bank, and rows looked up by global index.

Every rank passes the same queries and computes the same loss from the results (the
convention of `protokern.distributed.sharded.sharded_nearest_prototypes`); each rank's shard
then gets its rows of the unsharded gradient.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from protokern.distributed.collectives import shard_sizes
from protokern.distributed.sharded import sharded_nearest_prototypes
from protokern.nn.prototype_layers import _resolve_group, _SharedHandle
from protokern.ops import NearestPrototypes, nearest_prototypes


@dataclass
class Sharding:
    """Where this rank's shard sits in a global bank of ``sum(sizes)`` rows; ``group`` None
    means one process holding the whole bank."""

    sizes: list[int]
    rank: int
    handle: _SharedHandle  # a ProcessGroup cannot be deep-copied (copies of a module share it)

    @classmethod
    def of(cls, total: int, process_group: ProcessGroup | None, where: str) -> "Sharding":
        """The layout of ``total`` rows over ``process_group`` (the default group when None and
        one is initialised; one process otherwise)."""
        group, rank, world_size = _resolve_group(process_group)
        if total < world_size:
            raise ValueError(f"{where}: the bank's {total} rows must be at least the number of "
                             f"ranks ({world_size})")
        return cls(shard_sizes(total, world_size), rank, _SharedHandle(group))

    @property
    def group(self) -> ProcessGroup | None:
        return self.handle.value

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def rows(self) -> slice:
        """This rank's rows of the global bank."""
        start = sum(self.sizes[: self.rank])
        return slice(start, start + self.sizes[self.rank])

    def nearest(self, x: Tensor, shard: Tensor, k: int, metric: str) -> NearestPrototypes:
        """`protokern.nearest_prototypes` of ``x`` over the global bank (global indices)."""
        if self.group is None:
            return nearest_prototypes(x, shard, k, metric)
        return sharded_nearest_prototypes(x, shard, k, metric, shard_sizes=self.sizes,
                                          rank=self.rank, group=self.group)

    def lookup(self, shard: Tensor, indices: Tensor) -> Tensor:
        """``bank[indices]`` ``(*indices.shape, D)`` for global ``indices`` (the same on every
        rank); differentiable in ``shard``, which gets the gradient of its own rows."""
        if self.group is None:
            return torch.nn.functional.embedding(indices, shard)
        return _LookupRows.apply(shard, indices, self.rows.start, self.group)

    def sum(self, value: Tensor) -> Tensor:
        """``value`` summed over the ranks (no gradient)."""
        if self.group is None:
            return value
        total = value.clone()
        dist.all_reduce(total, group=self.group)
        return total


class _LookupRows(torch.autograd.Function):
    """Each rank writes the rows it owns, zeros elsewhere, and the ranks' parts are summed;
    backward hands each rank's shard its rows of the gradient (every rank computed the same
    loss, so the gradient is the same everywhere: no reduction)."""

    @staticmethod
    def forward(ctx, shard: Tensor, indices: Tensor, start: int, group: ProcessGroup) -> Tensor:
        local = indices.reshape(-1) - start
        owned = (local >= 0) & (local < shard.shape[0])
        rows = shard.new_zeros(local.shape[0], shard.shape[1])
        rows[owned] = shard[local[owned]]
        dist.all_reduce(rows, group=group)
        ctx.save_for_backward(local, owned)
        ctx.num_rows = shard.shape[0]
        return rows.view(*indices.shape, shard.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        local, owned = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        grad_shard = grad.new_zeros(ctx.num_rows, grad.shape[1])
        grad_shard.index_add_(0, local[owned], grad[owned])
        return grad_shard, None, None, None
