"""The `protokern` command."""

import argparse
import sys

import torch

import protokern
from protokern.selfcheck import format_table, run_selfcheck


def _demo(args: argparse.Namespace) -> int:
    print(f"protokern {protokern.__version__}, torch {torch.__version__}, device {args.device}, "
          f"backends: {', '.join(protokern.available_backends(args.device))}")
    print("Checking min_distance (forward + backward) of every backend against the float64 "
          "reference:\n")
    results = run_selfcheck(args.device, args.seed)
    print(format_table(results))
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="protokern", description=protokern.__doc__.split(
        "\n")[0])
    parser.add_argument("--version", action="version", version=protokern.__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="check every backend against the reference")
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
