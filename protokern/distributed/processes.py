"""Starting and joining several processes: data-parallel ProtoPNet training and push.

Two ways to start N processes that train one model together::

    protokern train --nproc 2 --data planted-parts ...                 # N local processes
    torchrun --standalone --nproc-per-node 2 -m protokern train --data planted-parts ...

The first spawns the processes itself; the second lets ``torchrun`` do it (it sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, which `process_group`
reads; ``--nnodes``/``--rdzv-endpoint`` give several machines, which then need the same data
and a shared output folder). Processes use gloo on CPU and NCCL on CUDA (one GPU per local
rank). Code that runs distributed asks `world` for its rank and the number of processes; with
no process group initialised (or a group of one) every function here is the single-process
path. Collectives are in `protokern.distributed.collectives`, batch norm across processes in
`protokern.distributed.batch_norm`.
"""

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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
