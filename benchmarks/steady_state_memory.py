"""Peak extra memory of one contender's call in a training loop, i.e. after warm-up.

`protokern bench` measures a case in a fresh process, so its peak includes what the first call
of anything costs (thread pools, BLAS buffers, allocator arenas). This measures the third call
instead: two warm-up calls, then the resident-set high-water mark is reset and one more call
runs. Linux only (``/proc/self/clear_refs``).

    python benchmarks/steady_state_memory.py cub14 protokern:cpu
    python benchmarks/steady_state_memory.py cub14 naive_conv
"""

import argparse

import torch

from protokern.bench.contenders import contender_named
from protokern.bench.measure import fix_malloc_threshold, make_inputs, peak_of_next_call
from protokern.bench.shapes import SHAPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("contender")
    parser.add_argument("--pass", dest="pass_name", default="forward+backward")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    fix_malloc_threshold()  # as the suite does: see protokern/bench/measure.py
    torch.set_num_threads(args.threads)
    x, prototypes, grad = make_inputs(SHAPES[args.shape], torch.float32, "cpu", 0)
    step = contender_named("cpu", args.contender).make_step(x, prototypes, grad, args.pass_name)
    step()
    step()
    extra, _ = peak_of_next_call(step)
    print(f"{args.shape} {args.contender} {args.pass_name}: steady-state peak extra "
          f"{extra / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
