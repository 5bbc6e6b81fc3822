"""The `protokern` command.

Only the dispatcher: command ``protokern NAME`` lives in ``protokern/commands/NAME.py``, which
provides ``add_arguments(parser)`` and ``run(args) -> int`` (the exit
status). A command's module is imported only when it runs, so ``protokern --help`` stays fast
and a command's optional dependencies load only for it. Every ``--help`` shows the defaults.
"""

import argparse
import importlib
import sys
from collections.abc import Iterable

import protokern

COMMANDS: dict[str, str] = {
    "demo": "train a ProtoPNet on generated planted-parts images (CPU, minutes): accuracy, "
            "motif hits, fused vs naive time, PNG explanations",
    "train": "train a ProtoPNet on a local image folder",
    "explain": "explain a trained ProtoPNet's decision on images",
    "selfcheck": "check every backend against the float64 reference",
    "bench": "time and memory of every backend vs naive PyTorch",
    "cil": "class-incremental scenario: every CIL head, metrics table",
    "anomaly": "PatchCore-style anomaly detection on generated images with planted defects "
               "(CPU, minutes): image and pixel AUROC, heatmap PNGs, vs anomalib's cdist",
    "export": "a trained ProtoPNet checkpoint as an ONNX file, checked in onnxruntime against "
              "eager",
}
"""Command -> one-line help; the command's code is ``protokern.commands.<command>``."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every argument's help ends with its default, except where the default is None: there it
    means "not given", and the help says what happens then (``--repeats``: 5 on CPU, 20 on CUDA),
    which "(default: None)" would only contradict."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parsers(with_arguments: Iterable[str] = ()
                  ) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``protokern`` parser and each command's, by name. Only the commands named in
    ``with_arguments`` get their arguments (importing their modules); the rest stay bare, so
    ``protokern --help`` and each command's run import only what they need."""
    with_arguments = set(with_arguments)
    parser = argparse.ArgumentParser(prog="protokern", description=protokern.__doc__.split(
        "\n")[0])
    parser.add_argument("--version", action="version", version=protokern.__version__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}
    for name, help_text in COMMANDS.items():
        module = f"protokern.commands.{name}"
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  formatter_class=HelpFormatter)
        sub.set_defaults(module=module)
        if name in with_arguments:
            importlib.import_module(module).add_arguments(sub)
        parsers[name] = sub
    return parser, parsers


def main(argv: list[str] | None = None) -> int:
    """``protokern COMMAND ...``: parse ``argv`` (default ``sys.argv[1:]``) and run the command;
    returns its exit status."""
    argv = sys.argv[1:] if argv is None else argv
    # Only the chosen command's module is imported (for its arguments, then to run it).
    parser, _ = build_parsers(argv[:1])
    args = parser.parse_args(argv)
    return importlib.import_module(args.module).run(args)


if __name__ == "__main__":
    sys.exit(main())
