"""A competing load for the bench (``protokern bench --load N``): N processes, each a
single-threaded loop of 256 x 256 float32 matmuls, standing in for another job on the same cores.

A kernel that splits its work statically across threads is only as fast as its slowest thread;
on a machine where another process takes a core, that thread runs at a fraction of its speed.
The bench runs each case quiet, with the load stopped (`paused`: SIGSTOP), and right after under
it (SIGCONT), so the two ratios sit side by side and were measured seconds apart: quiet medians
of one case moved by 20-40% between two runs of the whole plan minutes apart
(benchmarks/NOTES.md, "Packing 1x1 windows as 8 x 8 blocks, ..., and the loaded clause
paired"), more than the effect being measured. ``--load-rounds R`` repeats the pair R times.
"""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

# The loop runs while its parent (the bench, whose pid is its argument) lives: a bench killed by
# a signal that runs no `finally` (SIGTERM, SIGKILL) would otherwise leave it running, and every
# later measurement on the machine would be loaded without saying so (this happened: a run
# killed with pkill left one behind for 78 minutes; benchmarks/NOTES.md, "The Intel Xeon again").
_LOOP = (
    "import os, sys\n"
    "import torch\n"
    "torch.set_num_threads(1)\n"
    "parent = int(sys.argv[1])\n"
    "a = torch.randn(256, 256)\n"
    "while os.getppid() == parent:\n"
    "    a = torch.mm(a, a).clamp_(-1, 1)\n"
)


@contextmanager
def competing_load(processes: int) -> Iterator[list[subprocess.Popen]]:
    """Keep ``processes`` busy single-threaded processes running for the ``with`` block; they are
    killed when it ends, also on an error or Ctrl-C, and end by themselves when this process
    dies. ValueError on a negative count."""
    if processes < 0:
        raise ValueError(f"processes must be >= 0, got {processes}")
    started = [subprocess.Popen([sys.executable, "-c", _LOOP, str(os.getpid())],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for _ in range(processes)]
    try:
        time.sleep(2.0 if started else 0.0)  # past their import of torch: busy from the start
        ensure_running(started, "at once")
        yield started
    finally:
        for process in started:
            process.kill()
        for process in started:
            process.wait()


def ensure_running(processes: list[subprocess.Popen], when: str = "mid-plan") -> None:
    """RuntimeError if one of the load processes has exited: the loaded times after it would be
    taken under less load than the record says."""
    for process in processes:
        if process.poll() is not None:
            raise RuntimeError(f"a load process exited {when} (status {process.returncode})")


@contextmanager
def paused(processes: list[subprocess.Popen]) -> Iterator[None]:
    """Stop ``processes`` (SIGSTOP) for the ``with`` block and let them go on after it (SIGCONT),
    also on an error: a stopped process takes no CPU time, and it resumes where it was, busy at
    once, without starting again."""
    for process in processes:
        process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for process in processes:
            process.send_signal(signal.SIGCONT)
