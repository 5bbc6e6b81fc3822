"""protokern on several processes.

- `processes`: start or join a process group (``protokern train --nproc N``, ``torchrun``), rank
  and world size;
- `collectives`: sums and gathers across processes, each with the gradient rule its use needs
  (data-parallel training and push, a prototype bank sharded over the ranks);
- `batch_norm`: batch norm whose statistics span every process's batch.
"""
