"""Collectives with gradients for a prototype bank sharded over a process group
(`protokern.nn.ShardedPrototypeLayer`).

`torch.distributed.nn.functional.all_gather` is not used: its backward always sums the
gradients of every rank, which is right only when each rank's loss is its own (data-parallel
inputs). When every rank computes the same loss from the same gathered output, that sum counts
the loss ``world_size`` times; `gather` lets the caller say which of the two it is.
"""

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


def shard_sizes(total: int, world_size: int) -> list[int]:
    """Sizes of ``world_size`` contiguous shards of ``total`` rows; they differ by at most one,
    the first ranks holding the larger ones."""
    base, extra = divmod(total, world_size)
    return [base + (rank < extra) for rank in range(world_size)]


def all_gather_uneven(tensor: Tensor, sizes: list[int], dim: int, group: ProcessGroup) -> Tensor:
    """Concatenation along ``dim`` of every rank's ``tensor``, rank ``r``'s having ``sizes[r]``
    entries along ``dim`` and equal sizes elsewhere. No gradient."""
    # all_gather wants equal, contiguous blocks: pad each rank's block to the largest one.
    moved = tensor.movedim(dim, 0)
    block = moved.new_zeros((max(sizes), *moved.shape[1:]))
    block[: moved.shape[0]] = moved
    blocks = [torch.empty_like(block) for _ in sizes]
    dist.all_gather(blocks, block, group=group)
    return torch.cat([b[:n].movedim(0, dim) for b, n in zip(blocks, sizes)], dim=dim)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, sizes: list[int], dim: int, group: ProcessGroup,
                sum_gradients: bool) -> Tensor:
        ctx.sizes, ctx.dim, ctx.group, ctx.sum_gradients = sizes, dim, group, sum_gradients
        return all_gather_uneven(tensor, sizes, dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.sum_gradients:
            # a copy: autograd may hand the same gradient buffer to other nodes
            grad = grad.clone(memory_format=torch.contiguous_format)
            dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        start = sum(ctx.sizes[:rank])
        return grad.narrow(ctx.dim, start, ctx.sizes[rank]), None, None, None, None


class _SumGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def gather(tensor: Tensor, sizes: list[int], dim: int, group: ProcessGroup, *,
           sum_gradients: bool) -> Tensor:
    """`all_gather_uneven` with a gradient: each rank gets back the part of the gradient of
    the gathered tensor that its own ``tensor`` became.

    ``sum_gradients=False`` takes that part from this rank's gradient alone, which is right when
    every rank computes the same loss from the gathered tensor (its gradient is then the same
    everywhere). ``sum_gradients=True`` sums it over the ranks, which is right when each rank
    computes its own loss and the objective is their sum.
    """
    return _Gather.apply(tensor, sizes, dim, group, sum_gradients)


def sum_gradients(tensor: Tensor, group: ProcessGroup) -> Tensor:
    """``tensor`` itself, whose gradient is summed over the ranks of ``group`` in backward.

    For an input every rank holds the same copy of but uses only partly (with its own shard):
    each rank's gradient is then a partial sum of the full one.
    """
    return _SumGradients.apply(tensor, group)
