"""The `protokern` command.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int`` (the exit status). Modules are imported only when their command runs, so
``protokern --help`` stays fast and a command's optional dependencies load only for it.
"""

import argparse
import importlib
import sys

import protokern

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("protokern.demo", "train a ProtoPNet on generated planted-parts images (CPU, "
             "minutes): accuracy, motif hits, fused vs naive time, PNG explanations"),
    "train": ("protokern.train_command", "train a ProtoPNet on a local image folder"),
    "explain": ("protokern.explain_command", "explain a trained ProtoPNet's decision on images"),
    "selfcheck": ("protokern.selfcheck", "check every backend against the float64 reference"),
    "bench": ("protokern.bench.cli", "time and memory of every backend vs naive PyTorch"),
    "cil": ("protokern.heads.cli", "class-incremental scenario: every CIL head, metrics table"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="protokern", description=protokern.__doc__.split(
        "\n")[0])
    parser.add_argument("--version", action="version", version=protokern.__version__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module)
        # Only the chosen command's module is imported (its arguments are added below).
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(sub)
    args = parser.parse_args(argv)
    return importlib.import_module(args.module).run(args)


if __name__ == "__main__":
    sys.exit(main())
