"""``protokern bench``: every contender on the named shapes; a table, JSON and a scaling plot.

    protokern bench --device cpu --shapes cub,imagenet --json out.json --plot out.png
    protokern bench --device cpu --shapes cub --load 1    # also under a competing process

Prints, per (shape, dtype, pass), each contender's median time and spread, speed-up over the
fastest naive PyTorch contender (and over KeOps, where it ran), time over a bare GEMM of the
same FLOPs, achieved TFLOP/s and peak memory. ``--plot`` adds a sweep of M (time and memory
vs M at the fixed B, D, H x W of ``--scaling-shape``) where contenders stop at the size that no
longer fits ``--memory-cap-gb``.
"""

import argparse
import dataclasses
import os
from pathlib import Path

import torch

from protokern.bench.contenders import PASSES, all_contenders
from protokern.bench.measure import DTYPES
from protokern.bench.plot import scaling_plot
from protokern.bench.report import format_load_comparison, format_markdown, format_table, write_json
from protokern.bench.runner import BenchConfig, environment, run_cases
from protokern.bench.shapes import CPU_SHAPES, GPU_SHAPES, SHAPES, parse_shapes

DEFAULT_SCALING_M = "1000,2000,5000,10000,20000,50000,100000"


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``protokern bench``."""
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device,
                        help="where the cases run (cuda when a GPU is visible)")
    parser.add_argument("--shapes", help=f"comma-separated named shapes among "
                        f"{', '.join(SHAPES)} (default: {','.join(CPU_SHAPES)} on cpu, "
                        f"{','.join(GPU_SHAPES)} on cuda)")
    parser.add_argument("--passes", default=",".join(PASSES),
                        help="comma-separated passes among forward, forward+backward")
    parser.add_argument("--contenders", help="comma-separated names or kinds (protokern, naive, "
                        "keops, floor) (default: all available)")
    parser.add_argument("--exclude", help="comma-separated contender names or kinds (protokern, "
                        "naive, keops, floor) to leave out")
    parser.add_argument("--dtypes", default="float32",
                        help=f"comma-separated dtypes among {', '.join(DTYPES)}")
    parser.add_argument("--tf32", action="store_true",
                        help="CUDA: let float32 matmuls and convs use TF32 (otherwise forbidden)")
    parser.add_argument("--repeats", type=int, help="timed calls per case (default 5 cpu, 20 cuda)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 1 cpu, 3 cuda)")
    parser.add_argument("--threads", type=int, default=2, help="CPU: torch.set_num_threads")
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="CPU: run each case quiet, then at once again while N "
                        "single-threaded processes compete for the cores (stopped during the "
                        "quiet runs), and print both side by side")
    parser.add_argument("--load-rounds", type=int, default=1, metavar="R",
                        help="with --load: R quiet/loaded pairs per case, each state's times "
                        "pooled (a loaded median moves with where the scheduler puts the threads)")
    parser.add_argument("--memory-cap-gb", type=float, help="skip cases estimated to need more "
                        "(default 4 on cpu, 90%% of the GPU's memory on cuda)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--json", help="write all results and the environment to this file")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    parser.add_argument("--plot", help="run the M sweep and write its plot (PNG) to this file")
    parser.add_argument("--scaling-shape", default="cub", help="B, D, H x W of the sweep")
    parser.add_argument("--scaling-m", default=DEFAULT_SCALING_M, help="M values of the sweep")
    parser.add_argument("--scaling-pass", default="forward+backward", choices=PASSES,
                        help="pass of the sweep")
    parser.add_argument("--scaling-contenders", help="comma-separated names or kinds for the "
                        "sweep (default: those of the table)")
    parser.add_argument("--scaling-repeats", type=int, help="timed calls per sweep case "
                        "(default: --repeats)")
    parser.add_argument("--list", action="store_true", help="list shapes and contenders, exit")


def _memory_cap(args: argparse.Namespace) -> int:
    if args.memory_cap_gb is not None:
        return int(args.memory_cap_gb * 2**30)
    if args.device == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(0).total_memory)
    return 4 << 30


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The `BenchConfig` the arguments describe; ValueError on a bad one."""
    on_cuda = args.device == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch.cuda.is_available() is False "
                         f"(torch {torch.__version__})")
    shapes = parse_shapes(args.shapes or ",".join(GPU_SHAPES if on_cuda else CPU_SHAPES))
    return BenchConfig(
        shapes=shapes, device=args.device, dtypes=_csv(args.dtypes), passes=_csv(args.passes),
        contenders=_csv(args.contenders) if args.contenders else None,
        exclude=_csv(args.exclude) if args.exclude else [],
        repeats=args.repeats if args.repeats is not None else (20 if on_cuda else 5),
        warmup=args.warmup if args.warmup is not None else (3 if on_cuda else 1),
        threads=args.threads, memory_cap_bytes=_memory_cap(args), tf32=args.tf32,
        seed=args.seed, load=args.load, load_rounds=args.load_rounds,
    )


def run(args: argparse.Namespace) -> int:
    """``protokern bench``; exit status 2 on bad arguments, 1 if a case failed with an error."""
    if args.list:
        for shape in SHAPES.values():
            print(f"shape {shape.name:<14} {shape.describe()}")
        for op in ("min_distance", "nearest_prototypes"):
            for contender in all_contenders(args.device, op):
                print(f"contender {contender.name:<22} {op:<18} {contender.description}")
        return 0
    try:
        config = config_from_args(args)
        try:
            for shape in config.shapes:
                config.selected_contenders(shape)
        except ValueError as error:
            raise ValueError(f"--contenders: {error}") from None
        scaling_shape = parse_shapes(args.scaling_shape)[0]
        scaling_m = [int(m) for m in _csv(args.scaling_m)]
        # the sweep's own copy: its contenders and repeats may differ from the table's
        scaling_config = dataclasses.replace(config)
        if args.scaling_contenders:
            scaling_config.contenders = _csv(args.scaling_contenders)
            try:  # a bad name is an error before any case runs
                scaling_config.selected_contenders()
            except ValueError as error:
                raise ValueError(f"--scaling-contenders: {error}") from None
    except ValueError as error:
        print(f"protokern bench: {error}")
        return 2
    env = environment(config)
    # per shape: the nearest-prototypes shapes have contenders of their own
    planned = dict.fromkeys(c.name for shape in config.shapes
                            for c in config.selected_contenders(shape))
    print(f"protokern bench on {env['device_name']} ({config.device}), torch {env['torch']}, "
          f"threads {env['threads']}, contenders: {', '.join(planned)}")
    scaling: list[dict] = []
    results: list[dict] = []

    def save(partial: list[dict] | None = None,
             partial_scaling: list[dict] | None = None) -> None:
        if args.json:
            write_json(args.json, env, results if partial is None else partial,
                       scaling if partial_scaling is None else partial_scaling)

    results = run_cases(config, checkpoint=save)
    print(format_table(results))
    if config.load:
        print("\n" + format_load_comparison(results, env["load_fair_share_slowdown"]))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(format_markdown(results) + "\n")

    if args.plot:
        sweep = [scaling_shape.with_prototypes(m) for m in scaling_m]
        if args.scaling_repeats is not None:
            scaling_config.repeats = args.scaling_repeats
        env["scaling"] = {"shape": scaling_shape.name, "num_prototypes": scaling_m,
                          "pass": args.scaling_pass, "dtype": scaling_config.dtypes[0],
                          "repeats": scaling_config.repeats,
                          "contenders": [c.name for c in scaling_config.selected_contenders()]}
        title = (f"{scaling_shape.name} family: B={scaling_shape.batch} D={scaling_shape.dim} "
                 f"{scaling_shape.height}x{scaling_shape.width}, {scaling_config.dtypes[0]}, "
                 f"{args.scaling_pass}, {env['device_name']}")

        def save_sweep(partial: list[dict]) -> None:
            # JSON and plot after every size, so a run cut short still leaves both
            save(partial_scaling=partial)
            # a case leaves its quiet and (with --load) its loaded record together
            cases = len(partial) // (2 if scaling_config.load else 1)
            size_done = cases % len(scaling_config.selected_contenders()) == 0
            if size_done and len({r["num_prototypes"] for r in partial}) > 1:
                scaling_plot(partial, args.plot, scaling_config.memory_cap_bytes, title)

        scaling = run_cases(scaling_config, shapes=sweep, passes=[args.scaling_pass],
                            dtypes=scaling_config.dtypes[:1], description="M sweep",
                            checkpoint=save_sweep)
        scaling_plot(scaling, args.plot, scaling_config.memory_cap_bytes, title)
        print(f"\nscaling plot: {args.plot}")
    if args.json:
        env["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        save()
        print(f"results: {args.json}")
    errors = [r for r in results + scaling if r["status"] == "error"]
    for r in errors:
        print(f"ERROR {r['shape']} {r['dtype']} {r['pass']} {r['contender']}: {r['reason']}")
    return 1 if errors else 0
