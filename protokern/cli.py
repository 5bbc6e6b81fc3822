"""The `protokern` command.

Only the dispatcher: command ``protokern NAME`` lives in ``protokern/commands/NAME.py``, which
provides ``add_arguments(parser)`` and ``run(args) -> int`` (the exit
status). A command's module is imported only when it runs, so ``protokern --help`` stays fast
and a command's optional dependencies load only for it. Every ``--help`` shows the defaults.
"""

import argparse
import importlib
import sys

import protokern

COMMANDS: dict[str, str] = {
    "demo": "train a ProtoPNet on generated planted-parts images (CPU, minutes): accuracy, "
            "motif hits, fused vs naive time, PNG explanations",
    "train": "train a ProtoPNet on a local image folder",
    "explain": "explain a trained ProtoPNet's decision on images",
    "selfcheck": "check every backend against the float64 reference",
    "bench": "time and memory of every backend vs naive PyTorch",
    "cil": "class-incremental scenario: every CIL head, metrics table",
}
"""Command -> one-line help; the command's code is ``protokern.commands.<command>``."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="protokern", description=protokern.__doc__.split(
        "\n")[0])
    parser.add_argument("--version", action="version", version=protokern.__version__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = f"protokern.commands.{name}"
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.set_defaults(module=module)
        # Only the chosen command's module is imported (its arguments are added below).
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(sub)
    args = parser.parse_args(argv)
    return importlib.import_module(args.module).run(args)


if __name__ == "__main__":
    sys.exit(main())
