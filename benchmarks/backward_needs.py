"""What computing only the needed gradients saves: forward+backward of `pk.min_distance` with
both inputs requiring grad, with only the prototypes (frozen features), and with only ``x``
(a frozen or statistical bank, as in the heads).

    python benchmarks/backward_needs.py --shape cub --threads 2 --json out.json

The three variants run interleaved, round after round, in one process, so drift on a shared
machine hits them alike; the table gives each one's median and its ratio to "both".
"""

import argparse
import json
import statistics
import time

import torch

import protokern as pk
from protokern.bench.measure import make_inputs
from protokern.bench.runner import cpu_isa, device_name
from protokern.bench.shapes import SHAPES

VARIANTS = {"both": (True, True), "prototypes only": (False, True), "x only": (True, False)}


def step(x: torch.Tensor, prototypes: torch.Tensor, grad: torch.Tensor, needs_x: bool,
         needs_prototypes: bool):
    xg = x.detach().requires_grad_(needs_x)
    pg = prototypes.detach().requires_grad_(needs_prototypes)

    def run() -> None:
        values, _ = pk.min_distance(xg, pg)
        values.backward(grad)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape", default="cub", help="named shape")
    parser.add_argument("--backend", default=None, help="backend (default: the automatic one)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per variant")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    x, prototypes, grad = make_inputs(shape, torch.float32, "cpu")
    runs = {name: step(x, prototypes, grad, *needs) for name, needs in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with pk.use_backend(args.backend), pk.recording() as calls:
        for run in runs.values():
            run()  # warm-up
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    ran_on = sorted({backend for _, backend in calls})
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    print(f"{shape.name}: forward+backward, {args.threads} threads, backend {', '.join(ran_on)}, "
          f"{device_name('cpu')} ({', '.join(cpu_isa())})")
    for name, median in medians.items():
        print(f"  {name:<16} {median:8.2f} ms   {median / medians['both']:.2f}x of both")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"shape": shape.name, "threads": args.threads, "ran_on": ran_on,
                       "cpu_name": device_name("cpu"), "cpu_isa": cpu_isa(),
                       "command": "python benchmarks/backward_needs.py " + " ".join(
                           f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                           if v is not None),
                       "median_ms": medians,
                       "times_s": times, "torch": torch.__version__}, out, indent=2)


if __name__ == "__main__":
    main()
