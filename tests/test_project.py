"""The README's promises: its Quickstart is what CI runs, its usage example runs, the CLI works."""

import re
import subprocess
import sys
from pathlib import Path

import protokern
from protokern import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(heading: str, language: str) -> str:
    section = README.split(heading, 1)[1]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def test_quickstart_is_two_commands_and_ci_runs_the_second_verbatim():
    commands = [line for line in _block_after("## Quickstart", "bash").splitlines() if line]
    assert len(commands) == 2
    assert commands[0].endswith("protokern demo")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines


def test_readme_usage_example_runs():
    exec(compile(_block_after("## Usage", "python"), "README.md", "exec"), {})


def test_selfcheck_checks_every_backend(capsys):
    # Triton's interpreter (tests set TRITON_INTERPRET) would take minutes at the self-check's
    # sizes; tests/backends/test_triton.py and the contract tests cover it.
    names = [b for b in protokern.available_backends("cpu") if b != "triton"]
    assert cli.main(["selfcheck", "--device", "cpu", "--backends", *names]) == 0
    out = capsys.readouterr().out
    for backend in names:
        assert f" {backend} " in out
    assert "FAILED" not in out and ", 0 failed" in out


def test_console_script_and_version():
    result = subprocess.run([sys.executable, "-m", "protokern.cli", "--version"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == protokern.__version__
