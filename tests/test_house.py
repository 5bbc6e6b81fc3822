"""House rules that no feature test would notice breaking: every ``--help`` shows every default,
``protokern train`` picks learning rates that fit its backbone, every environment variable goes
through `protokern.env`, and ``protokern bench`` says which backend ran each timed call."""

import argparse
import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import protokern as pk
from protokern import cli, env
from protokern.bench import contenders as bench_contenders
from protokern.bench.contenders import PASSES
from protokern.bench.measure import CaseSpec, run_case
from protokern.bench.report import format_markdown, format_table
from protokern.bench.runner import BenchConfig, run_cases
from protokern.bench.shapes import SHAPES
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


# ----------------------------------------------------------------------------------------------
# Every environment variable through protokern.env

OURS = re.compile(r"^(PROTOKERN_\w+|TRITON_INTERPRET)$")
HELPERS = {"flag", "integer", "number", "text"}


def _python_files(*roots: str) -> list[Path]:
    files = []
    for root in roots:
        path = ROOT / root
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts]


def _is_environ(node: ast.AST) -> bool:
    """``os.environ`` or a bare ``environ``."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ")


def _environment_reads(tree: ast.AST) -> list[tuple[int, str | None]]:
    """``(line, name)`` of every read of an environment variable in ``tree``: ``environ[...]``,
    ``environ.get/pop(...)``, ``getenv(...)``, ``... in environ``; ``name`` is None where the
    key is not a string literal."""
    reads = []

    def key(node: ast.AST | None) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value,
                                                                            str) else None

    for node in ast.walk(tree):
        if (isinstance(node, ast.Subscript) and _is_environ(node.value)
                and isinstance(node.ctx, ast.Load)):
            reads.append((node.lineno, key(node.slice)))
        elif isinstance(node, ast.Call):
            func = node.func
            getenv = (isinstance(func, ast.Attribute) and func.attr == "getenv") or (
                isinstance(func, ast.Name) and func.id == "getenv")
            environ_get = (isinstance(func, ast.Attribute) and func.attr in ("get", "pop")
                           and _is_environ(func.value))
            if getenv or environ_get:
                reads.append((node.lineno, key(node.args[0]) if node.args else None))
        elif isinstance(node, ast.Compare) and any(_is_environ(c) for c in node.comparators):
            reads.append((node.lineno, key(node.left)))
    return reads


def _helper_reads(tree: ast.AST) -> set[str]:
    """Names read through a `protokern.env` helper: ``env.flag("NAME")`` (or, inside env.py,
    ``text("NAME")``)."""
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        first = node.args[0]
        if called in HELPERS and isinstance(first, ast.Constant) and isinstance(first.value, str):
            names.add(first.value)
    return names


def test_environment_reads_are_found():
    """The scanner itself: it must see each way of reading a variable."""
    source = ("import os\nfrom os import environ, getenv\n"
              "a = os.environ['PROTOKERN_A']\nb = os.environ.get('PROTOKERN_B')\n"
              "c = getenv('TRITON_INTERPRET')\nd = 'PROTOKERN_D' in os.environ\n"
              "e = environ.pop(name)\nos.environ['PROTOKERN_SET'] = '1'\n"
              "f = env.flag('PROTOKERN_F')\n")
    tree = ast.parse(source)
    assert sorted(_environment_reads(tree), key=lambda read: read[0]) == [
        (3, "PROTOKERN_A"), (4, "PROTOKERN_B"), (5, "TRITON_INTERPRET"), (6, "PROTOKERN_D"),
        (7, None)]
    assert _helper_reads(tree) == {"PROTOKERN_F"}


def test_only_protokern_env_reads_our_variables():
    offenders = []
    for path in _python_files("protokern", "benchmarks", "setup.py"):
        if path == ROOT / "protokern" / "env.py":
            continue
        source = path.read_text()
        where = path.relative_to(ROOT)
        for line, name in _environment_reads(ast.parse(source, str(path))):
            if name is None or OURS.match(name):
                offenders.append(f"{where}:{line} reads {name or 'a computed name'}")
        # and the plain text, for a read the syntax tree would miss (a name built elsewhere)
        for number, text in enumerate(source.splitlines(), 1):
            if re.search(r"\benviron\b|\bgetenv\b", text) and re.search(
                    r"PROTOKERN_\w+|TRITON_INTERPRET", text):
                offenders.append(f"{where}:{number}: {text.strip()}")
    for script in sorted((ROOT / "benchmarks").rglob("*.sh")):
        for number, text in enumerate(script.read_text().splitlines(), 1):
            if re.search(r"\$\{?(PROTOKERN_\w+|TRITON_INTERPRET)", text):
                offenders.append(f"{script.relative_to(ROOT)}:{number}: {text.strip()}")
    assert not offenders, "read these through protokern.env:\n" + "\n".join(offenders)


def test_every_documented_variable_is_read_and_every_read_one_is_documented():
    read = set()
    for path in _python_files("protokern", "benchmarks", "setup.py", "tests"):
        if path == Path(__file__):
            continue
        tree = ast.parse(path.read_text(), str(path))
        read |= _helper_reads(tree)
        if "tests" in path.relative_to(ROOT).parts:
            # the tests are not bound to protokern.env (yet): their own reads count here
            read |= {name for _, name in _environment_reads(tree) if name and OURS.match(name)}
    ours = {name for name in read if OURS.match(name)}
    assert ours == set(env.VARIABLES), (
        f"documented but never read: {sorted(set(env.VARIABLES) - ours)}; read but not in "
        f"protokern.env.VARIABLES: {sorted(ours - set(env.VARIABLES))}")


def test_setup_py_parses_its_flags_with_protokern_env_and_never_imports_torch():
    """setup.py runs before torch is installed: with ``torch`` unimportable it still reads
    PROTOKERN_NO_EXT, and a value that is no flag is the helper's error, naming the variable."""
    script = ("import runpy, sys\n"
              "sys.modules['torch'] = None  # import torch now fails\n"
              "sys.argv = ['setup.py', '--name']\n"
              "runpy.run_path('setup.py', run_name='__main__')\n")

    def run_setup(value: str) -> subprocess.CompletedProcess:
        environment = {k: v for k, v in os.environ.items() if k != "PROTOKERN_NO_EXT"}
        return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, check=False,
                              env={**environment, "PROTOKERN_NO_EXT": value})

    done = run_setup("yes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "protokern"
    assert "PROTOKERN_NO_EXT is set" in done.stderr
    refused = run_setup("maybe")
    assert refused.returncode != 0
    assert "PROTOKERN_NO_EXT='maybe' is not a flag" in refused.stderr


# ----------------------------------------------------------------------------------------------
# protokern bench: which backend ran each measured call


def test_each_case_records_the_backends_that_ran_it_in_its_worker_process():
    """Isolated cases (a forked worker times, a new interpreter measures memory) record where
    the calls run: the results name the backend while this process, around them, saw none."""
    names = [f"protokern:{b}" for b in ("reference", "cpu") if b in pk.available_backends("cpu")]
    config = BenchConfig(shapes=[SHAPES["tiny"]], passes=["forward+backward"],
                         contenders=names, repeats=1, warmup=0, threads=1, isolate=True)
    with pk.recording() as here:
        results = run_cases(config)
    assert here == []
    assert [r["contender"] for r in results] == names
    for r in results:
        assert r["status"] == "ok", r
        assert r["ran_on"] == [r["contender"].removeprefix("protokern:")]
        assert r["median_s"] > 0 and r["peak_bytes"] >= 0
    table = format_table(results).splitlines()
    assert table[1].endswith(" ran on")
    assert [line.rsplit(" ", 1)[1] for line in table[3:]] == [r["ran_on"][0] for r in results]
    document = json.loads(json.dumps(results))  # what --json writes, key for key
    assert [r["ran_on"] for r in document] == [r["ran_on"] for r in results]


def test_a_baseline_records_no_backend():
    config = BenchConfig(shapes=[SHAPES["tiny"]], passes=["forward"], contenders=["naive_loop"],
                         repeats=1, warmup=0, threads=1, isolate=False)
    (result,) = run_cases(config)
    assert result["status"] == "ok" and result["ran_on"] == []
    assert format_table([result]).splitlines()[-1].endswith(" -")


def _impostors(monkeypatch) -> None:
    """Two contenders whose calls run elsewhere than their names say: ``protokern:house_liar``
    runs the reference backend, ``naive_house`` (a baseline) runs protokern's op."""
    liar = dataclasses.replace(bench_contenders.protokern_contender("reference"),
                               name="protokern:house_liar", backend="house_liar")
    fake_baseline = bench_contenders.Contender(
        "naive_house", "naive", "a 'baseline' calling protokern (test)",
        lambda x, p: tuple(pk.min_distance(x, p)), bench_contenders._protokern_estimate)
    real = bench_contenders.all_contenders
    monkeypatch.setattr(bench_contenders, "all_contenders",
                        lambda device, op="min_distance", k=1: [*real(device, op, k), liar,
                                                                fake_baseline])


def test_a_protokern_row_that_ran_another_backend_is_an_error_not_a_time(monkeypatch):
    _impostors(monkeypatch)
    config = BenchConfig(shapes=[SHAPES["tiny"]], passes=list(PASSES),
                         contenders=["protokern:house_liar", "naive_house", "naive_loop"],
                         repeats=2, warmup=1, threads=1, isolate=False)
    results = run_cases(config)
    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["contender"], []).append(r)
    for r in by_name["protokern:house_liar"]:
        assert r["status"] == "error" and r["ran_on"] == ["reference"]
        assert "ran on reference, not (only) on house_liar" in r["reason"]
        assert not {"times_s", "median_s", "peak_bytes", "speedup_vs_best_naive"} & set(r)
    for r in by_name["naive_house"]:
        assert r["status"] == "error" and "ran protokern kernels" in r["reason"], r
    assert all(r["status"] == "ok" for r in by_name["naive_loop"])
    rows = [line.split(None, 1) for line in format_table(results).splitlines()
            if line.startswith("protokern:house_liar ")]
    assert len(rows) == len(PASSES)
    assert all(rest.startswith("error: protokern:house_liar ran on reference") for _, rest in rows)
    markdown = format_markdown(results).splitlines()
    assert all(line.count("|") == markdown[0].count("|") for line in markdown)
    assert any(line.endswith("| reference |") and "house_liar" in line for line in markdown)


def test_run_case_checks_the_backend_itself(monkeypatch):
    _impostors(monkeypatch)
    spec = CaseSpec(SHAPES["tiny"], "float32", "cpu", "protokern:house_liar", "forward", 1, 0, 1)
    result = run_case(spec, "memory")
    assert result["status"] == "error" and result["ran_on"] == ["reference"]
    honest = run_case(dataclasses.replace(spec, contender="protokern:reference"), "time")
    assert honest["status"] == "ok" and honest["ran_on"] == ["reference"]
