"""Collectives over a process group, with the gradient rule each use needs.

- `sum_across_processes`, `gather_from_processes`: plain sums and stacks for data-parallel
  training and push (no gradient);
- `differentiable_sum`: a sum whose gradient is summed back (batch-norm statistics);
- `all_gather_uneven`, `gather`, `sum_gradients`, `shard_sizes`: a prototype bank sharded over a
  process group (`protokern.nn.ShardedPrototypeLayer`).

`torch.distributed.nn.functional.all_gather` is not used: its backward always sums the
gradients of every rank, which is right only when each rank's loss is its own (data-parallel
inputs). When every rank computes the same loss from the same gathered output, that sum counts
the loss ``world_size`` times; `gather` lets the caller say which of the two it is.
"""

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from protokern.distributed.processes import is_distributed, world


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
    return torch.cat([b[:n].movedim(0, dim) for b, n in zip(blocks, sizes, strict=True)], dim=dim)


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


def sum_across_processes(values: Tensor) -> Tensor:
    """``values`` summed over the processes (a new tensor; ``values`` itself without a group).

    Not differentiable; `SyncedBatchNorm` uses a differentiable sum.
    """
    if not is_distributed():
        return values
    total = values.clone()
    dist.all_reduce(total)
    return total


def gather_from_processes(values: Tensor) -> Tensor:
    """``(world size, *values.shape)``: every process's ``values`` (same shape and dtype on
    all), stacked in rank order. No gradient."""
    if not is_distributed():
        return values[None]
    return all_gather_uneven(values[None], [1] * world()[1], 0, group=None)


class _DifferentiableSum(torch.autograd.Function):
    """Sum over processes whose gradient is the sum of every process's upstream gradient: each
    process's output depends on every process's input."""

    @staticmethod
    def forward(ctx: Any, values: Tensor) -> Tensor:
        total = values.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _DifferentiableSum.apply(grad)


def differentiable_sum(values: Tensor) -> Tensor:
    """``values`` summed over the processes; its gradient is every process's upstream gradient
    summed (each process's output depends on every process's input)."""
    return _DifferentiableSum.apply(values)
