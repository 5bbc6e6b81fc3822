"""Running protokern on several processes: data-parallel ProtoPNet training and push.

Two ways to start N processes that train one model together::

    protokern train --nproc 2 --data planted-parts ...                 # N local processes
    torchrun --standalone --nproc-per-node 2 -m protokern train --data planted-parts ...

The first spawns the processes itself; the second lets ``torchrun`` do it (it sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, which `process_group`
reads; ``--nnodes``/``--rdzv-endpoint`` give several machines, which then need the same data
and a shared output folder). Processes use gloo on CPU and NCCL on CUDA (one GPU per local
rank). Code that runs distributed asks `world` for its rank and the number of processes; with
no process group initialised (or a group of one) every function here is the single-process
path.

Batch norm: a data-parallel step equals the single-process step on the whole batch only if
batch norm normalises with the statistics of the whole batch, so `synchronize_batch_norm`
swaps every batch-norm layer for `SyncedBatchNorm`, which sums its statistics across processes
(PyTorch's own ``SyncBatchNorm`` runs only on GPUs).
"""

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return world()[1] > 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes files and prints."""
    return world()[0] == 0


def barrier() -> None:
    """Wait for every process (nothing to wait for with one)."""
    if is_distributed():
        dist.barrier()


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
    all), stacked in rank order."""
    if not is_distributed():
        return values[None]
    parts = [torch.empty_like(values) for _ in range(world()[1])]
    dist.all_gather(parts, values.contiguous())
    return torch.stack(parts)


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


class SyncedBatchNorm(_BatchNorm):
    """Batch norm over the union of every process's batch, on any device (gloo or NCCL).

    With one process (or in eval mode) it is `torch.nn.BatchNorm2d`'s computation. With
    several, in training mode, the mean and the (biased) variance of each channel are sums of
    every process's ``(B, C, *)`` input divided by the total count, two passes for accuracy,
    and gradients flow back across processes; the running statistics (unbiased variance) are
    then the same on every process. Processes may hold batches of different sizes.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncedBatchNorm: input must be (B, C, *), got shape "
                             f"{tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = (1, -1) + (1,) * (input.dim() - 2)
        count = input.new_tensor([input.numel() / max(input.shape[1], 1)])
        sums = _DifferentiableSum.apply(torch.cat([input.sum(dims), count]))
        total = sums[-1].detach()
        mean = sums[:-1] / total
        centered = input - mean.view(shape)
        variance = _DifferentiableSum.apply((centered * centered).sum(dims)) / total
        output = centered * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1 / float(self.num_batches_tracked) if self.momentum is None
                            else self.momentum)
                self.running_mean.lerp_(mean.detach(), momentum)
                unbiased = variance.detach() * (total / (total - 1).clamp_min(1))
                self.running_var.lerp_(unbiased, momentum)
        return output


def synchronize_batch_norm(module: nn.Module) -> nn.Module:
    """Replace, in place, every batch-norm layer of ``module`` by a `SyncedBatchNorm` holding
    the same parameter and buffer objects (optimisers built earlier keep working, state-dict
    keys are unchanged). Returns ``module``; already synced layers are left as they are."""
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, SyncedBatchNorm):
            synced = SyncedBatchNorm(child.num_features, child.eps, child.momentum,
                                     child.affine, child.track_running_stats)
            for attribute in ("weight", "bias", "running_mean", "running_var",
                              "num_batches_tracked"):
                setattr(synced, attribute, getattr(child, attribute))
            synced.train(child.training)
            setattr(module, name, synced)
        else:
            synchronize_batch_norm(child)
    return module


def backend_for(device: torch.device | str) -> str:
    """The collective backend for tensors on ``device``: NCCL for CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@contextmanager
def process_group(device: str | torch.device) -> Iterator[torch.device]:
    """Join the process group described by the environment (``torchrun``'s ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) for the ``with`` block,
    and yield this process's device: ``cuda:LOCAL_RANK`` for a CUDA ``device``.

    Without ``WORLD_SIZE`` > 1, or with a group already initialised (which is then left to its
    owner), nothing is joined.
    """
    device = torch.device(device)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method="env://")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launched(local_rank: int, nproc: int, port: int, threads: int,
              function: Callable[..., Any], args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    function(*args)


def launch(nproc: int, function: Callable[..., Any], *args: Any) -> None:
    """Run ``function(*args)`` in ``nproc`` spawned local processes that see the environment
    ``torchrun --standalone --nproc-per-node nproc`` would give them (so ``function`` joins
    the group with `process_group`), each with ``cpu_count // nproc`` threads.

    ``function`` must be importable (module level). Raises if any process fails, with its
    traceback.
    """
    if nproc < 1:
        raise ValueError(f"launch: nproc must be >= 1, got {nproc}")
    if "WORLD_SIZE" in os.environ:
        raise RuntimeError("launch: already inside a launched process group (WORLD_SIZE is "
                           "set, e.g. by torchrun); do not ask for processes twice")
    threads = max(1, (os.cpu_count() or 1) // nproc)
    mp.spawn(_launched, args=(nproc, _free_port(), threads, function, args), nprocs=nproc,
             join=True)
