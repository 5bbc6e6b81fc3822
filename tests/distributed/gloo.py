"""Run a function in several CPU processes joined by a gloo process group, for the tests of
distributed code (`run_on_gloo`)."""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str, results: str,
            target: Callable[..., Any], args: tuple) -> None:
    # one thread per process: 2 ranks on a 2-core machine, and thread-count-independent sums
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        torch.save(target(rank, world_size, *args), Path(results) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_gloo(target: Callable[..., Any], world_size: int = 2, *args: Any) -> list[Any]:
    """``[target(rank, world_size, *args) for rank in range(world_size)]``, each call in its
    own spawned process inside an initialised gloo group.

    ``target`` must be importable (a module-level function of a test file); its return value
    must be `torch.save`-able. An exception in any rank fails the call with that rank's
    traceback.
    """
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "init")
        mp.spawn(_worker, args=(world_size, init_file, folder, target, args),
                 nprocs=world_size, join=True)
        return [torch.load(Path(folder) / f"{rank}.pt", weights_only=False)
                for rank in range(world_size)]
