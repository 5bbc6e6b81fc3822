"""House rules that no feature test would notice breaking: every ``--help`` shows every default,
``protokern train`` picks learning rates that fit its backbone, every environment variable goes
through `protokern.env`, and ``protokern bench`` says which backend ran each timed call."""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from protokern import cli, env
from protokern.commands.train import FROM_SCRATCH_LR, PAPER_LR, training_config
from protokern.models.training import TrainingConfig

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Every --help shows every default


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_argument_has_help_and_every_default_shows(name, monkeypatch):
    # A wide terminal: argparse wraps at hyphens too, which would split a default in two.
    monkeypatch.setenv("COLUMNS", "1000")
    _, parsers = cli.build_parsers([name])
    parser = parsers[name]
    full_help = " ".join(parser.format_help().split())
    checked = 0
    for action in parser._actions:  # argparse has no public list of a parser's arguments
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), (
            f"protokern {name} {'/'.join(action.option_strings) or action.dest}: no help string")
        # The formatter `protokern --help` uses, on this argument alone: its line in the help.
        formatter = parser.formatter_class(prog=parser.prog, width=1000)
        formatter.add_argument(action)
        rendered = " ".join(formatter.format_help().split())
        assert rendered in full_help
        if not action.option_strings or action.default in (None, argparse.SUPPRESS):
            continue
        assert f"(default: {action.default})" in rendered, (
            f"protokern {name}: {rendered!r} does not show its default {action.default!r}")
        checked += 1
    assert checked >= 2, f"protokern {name}: found too few arguments with defaults to check"


def test_a_none_default_is_not_shown_as_none(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    _, parsers = cli.build_parsers(["bench"])
    help_text = parsers["bench"].format_help()
    assert "(default: None)" not in help_text
    assert "timed calls per case (default 5 cpu, 20 cuda)" in help_text


# ----------------------------------------------------------------------------------------------
# protokern train: learning rates for the backbone it has


def _train_arguments(*extra: str) -> argparse.Namespace:
    parser, _ = cli.build_parsers(["train"])
    return parser.parse_args(["train", "--data", "planted-parts", *extra])


def test_the_two_rate_sets():
    assert PAPER_LR == TrainingConfig().joint_lr
    assert PAPER_LR == {"features": 1e-4, "add_on_layers": 3e-3, "prototype_vectors": 3e-3}
    assert FROM_SCRATCH_LR == {"features": 3e-3, "add_on_layers": 3e-3,
                               "prototype_vectors": 3e-3}


def test_train_without_weights_learns_from_scratch_rates():
    config, line = training_config(_train_arguments())
    assert config.joint_lr == FROM_SCRATCH_LR
    assert config.warm_lr == {"add_on_layers": 3e-3, "prototype_vectors": 3e-3}
    assert line.startswith("learning rates: backbone 0.003, add-on 0.003, prototypes 0.003")
    assert "from scratch" in line and "no --weights" in line


def test_train_with_weights_uses_the_papers_rates():
    config, line = training_config(_train_arguments("--weights", "resnet34-imagenet.pth"))
    assert config.joint_lr == PAPER_LR
    assert config.warm_lr == {"add_on_layers": 3e-3, "prototype_vectors": 3e-3}
    assert "backbone 0.0001" in line and "the paper's" in line and "--weights" in line


@pytest.mark.parametrize("weights", [(), ("--weights", "w.pth")], ids=["scratch", "weights"])
def test_a_rate_given_on_the_command_line_always_wins(weights):
    config, line = training_config(_train_arguments(*weights, "--features-lr", "5e-4",
                                                    "--prototypes-lr", "0.01"))
    base = PAPER_LR if weights else FROM_SCRATCH_LR
    assert config.joint_lr == {"features": 5e-4, "add_on_layers": base["add_on_layers"],
                               "prototype_vectors": 0.01}
    assert config.warm_lr == {"add_on_layers": base["add_on_layers"],
                              "prototype_vectors": 0.01}
    assert "--features-lr, --prototypes-lr as given" in line
    config, line = training_config(_train_arguments(
        *weights, "--features-lr", "1", "--add-on-lr", "2", "--prototypes-lr", "3"))
    assert config.joint_lr == {"features": 1.0, "add_on_layers": 2.0, "prototype_vectors": 3.0}
    assert line.endswith("(as given)")


def test_train_prints_the_rates_line_once(tmp_path, capsys):
    # --epochs 0: builds the data and the model and prints, trains nothing
    assert cli.main(["train", "--data", "planted-parts", "--planted-classes", "2",
                     "--planted-per-class", "2", "1", "--image-size", "32", "--epochs", "0",
                     "--prototypes-per-class", "1", "--prototype-dim", "8",
                     "--output", str(tmp_path), "--no-progress", "--device", "cpu"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("learning rates:")]
    assert lines == [training_config(_train_arguments())[1]]
