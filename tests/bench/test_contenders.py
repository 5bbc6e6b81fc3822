"""The benchmark suite: `protokern bench` end to end, the baselines' correctness, the memory probe.

Speed is never asserted here; what is checked is that the numbers the bench reports are
numbers of the right computation, measured by a probe that sees real allocations.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import matplotlib.image
import pytest
import torch

import protokern as pk
from protokern import backends, cli
from protokern.backends import reference, registry
from protokern.bench import contenders as bench_contenders
from protokern.bench.contenders import PASSES, Contender, all_contenders, select_contenders
from protokern.bench.measure import CaseSpec, IsolatedRunner, make_inputs
from protokern.bench.report import format_markdown, format_table, write_json
from protokern.bench.runner import BenchConfig, add_comparisons, run_cases
from protokern.bench.shapes import SHAPES, NamedShape, parse_shapes
from protokern.testing import TOLERANCE, near_tie_ok, relative_error

# protokern's own backends are checked by the contract tests (tests/test_ops.py)
NAIVE = [c for c in all_contenders("cpu") if c.kind == "naive"]


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_command_end_to_end(tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "scaling.png"
    command = [sys.executable, "-m", "protokern.cli", "bench", "--device", "cpu",
               "--shapes", "tiny_patch", "--repeats", "2", "--warmup", "1",
               "--threads", "1", "--json", str(out_json), "--plot", str(out_png),
               "--scaling-shape", "tiny", "--scaling-m", "20,60", "--scaling-repeats", "1",
               "--markdown", str(tmp_path / "table.md")]
    # As a user runs it: without the Triton interpreter tests/conftest.py turns on here
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(out_json.read_text())
    env = document["environment"]

    # every backend the bench process could run is a contender, and so is every baseline
    backends = env["protokern_backends"]
    assert "reference" in backends
    contenders = [f"protokern:{b}" for b in backends] + [
        c.name for c in all_contenders("cpu") if c.kind != "protokern"]
    for header in ("median ms", "min-max ms", "vs naive", "/ GEMM", "TFLOP/s", "peak MiB"):
        assert header in done.stdout
    assert all(name in done.stdout for name in contenders)
    markdown = (tmp_path / "table.md").read_text().splitlines()
    assert len(markdown) == 2 + len(contenders) * len(PASSES)

    for key in ("device_name", "torch", "triton", "cuda", "git_commit", "date_utc"):
        assert key in env
    assert env["device"] == "cpu" and env["threads"] == 1 and env["torch"] == torch.__version__
    assert "bench" in env["command"] and "--shapes tiny_patch" in env["command"]

    results = document["results"]
    planned = {(s, p, c) for s in ("tiny_patch",) for p in PASSES for c in contenders}
    assert {(r["shape"], r["pass"], r["contender"]) for r in results} == planned
    for r in results:
        assert r["status"] == "ok", r
        assert len(r["times_s"]) == 2 and all(_finite_positive(t) for t in r["times_s"])
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        for key in ("median_s", "tflops", "ratio_to_floor", "speedup_vs_best_naive",
                    "peak_bytes", "gemm_flops"):
            assert _finite_positive(r[key]), (key, r)
        assert r["threads"] == 1
    floors = [r for r in results if r["kind"] == "floor"]
    assert all(r["ratio_to_floor"] == 1.0 for r in floors)

    scaling = document["scaling"]
    assert sorted({r["num_prototypes"] for r in scaling}) == [20, 60]
    assert all(r["status"] == "ok" and _finite_positive(r["median_s"]) for r in scaling)

    image = matplotlib.image.imread(out_png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something is drawn


@pytest.mark.parametrize("contender", NAIVE, ids=lambda c: c.name)
@pytest.mark.parametrize("shape", ["tiny", "tiny_patch", "tiny_vectors"])
def test_contenders_agree_with_reference(contender, shape):
    """Values, indices (up to near-ties) and both gradients of each contender vs float64."""
    x, prototypes, grad = make_inputs(SHAPES[shape], torch.float32, "cpu", seed=3)
    values, indices, grad_x, grad_p = contender.evaluate(x, prototypes, grad)

    x64 = x.double().requires_grad_()
    p64 = prototypes.double().requires_grad_()
    with pk.use_backend("reference"):
        ref_values, _ = pk.min_distance(x64, p64)
    ref_grad_x, ref_grad_p = torch.autograd.grad(ref_values, (x64, p64), grad.double())
    distances = reference.distance_map(x64.detach(), p64.detach(), "sqeuclidean").flatten(2)

    tol = TOLERANCE[torch.float32]
    assert values.shape == indices.shape == ref_values.shape
    assert indices.dtype == torch.int64
    assert relative_error(values, ref_values) <= tol
    assert near_tie_ok(indices, distances, tol).all()
    assert relative_error(grad_x, ref_grad_x) <= tol
    assert relative_error(grad_p, ref_grad_p) <= tol


def test_memory_probe_sees_an_allocation():
    """The bare GEMM of a (50, 4) x (4, 1e6) problem writes a 200 MB output."""
    big = NamedShape("alloc_200mb", 50, 4, 1, 1, 1_000_000)
    small = NamedShape("alloc_small", 4, 4, 1, 1, 1000)
    runner = IsolatedRunner()
    big_result = runner.run(CaseSpec(big, "float32", "cpu", "floor_mm", "forward", 1, 0, 1))
    small_result = runner.run(CaseSpec(small, "float32", "cpu", "floor_mm", "forward", 1, 0, 1))
    assert big_result["status"] == small_result["status"] == "ok"
    assert 150e6 <= big_result["peak_bytes"] <= 400e6, big_result
    assert small_result["peak_bytes"] < 50e6, small_result


def test_cases_over_the_memory_cap_are_skipped_with_the_reason():
    config = BenchConfig(shapes=parse_shapes("large_bank"), passes=["forward"],
                         contenders=["naive_conv"], memory_cap_bytes=1 << 30)
    (result,) = run_cases(config)
    assert result["status"] == "skipped" and "memory cap" in result["reason"]
    assert result["estimated_bytes"] > 1 << 30


def test_a_backend_registered_later_is_a_contender(monkeypatch):
    late = dataclasses.replace(backends.registered_backend("reference"), name="bench_test_late",
                               device_types=frozenset({"cpu"}))
    monkeypatch.setitem(registry._registry, late.name, late)
    names = [c.name for c in all_contenders("cpu")]
    assert "protokern:bench_test_late" in names
    contender = next(c for c in all_contenders("cpu") if c.name == "protokern:bench_test_late")
    x, prototypes, grad = make_inputs(SHAPES["tiny"], torch.float32, "cpu")
    values, _, _, _ = contender.evaluate(x, prototypes, grad)
    assert relative_error(values, reference.min_distance(x, prototypes, "sqeuclidean")[0]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_bench_on_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert cli.main(["bench", "--device", "cuda", "--shapes", "tiny"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().out


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown shape"):
        parse_shapes("cub,nope")
    with pytest.raises(ValueError, match="passes"):
        BenchConfig(shapes=parse_shapes("tiny"), passes=["sideways"])
    with pytest.raises(ValueError, match="not available"):
        BenchConfig(shapes=parse_shapes("tiny"), contenders=["nope"]).selected_contenders()


def _fake_keops(monkeypatch, available: bool = True) -> Contender:
    """Register a stand-in contender of kind ``keops`` (pykeops is not installed here)."""
    fake = Contender("keops", "keops", "stand-in for pykeops (test)", bench_contenders.cdist_min,
                     bench_contenders._keops_estimate)
    monkeypatch.setattr(bench_contenders, "KEOPS", fake)
    monkeypatch.setattr(bench_contenders, "keops_available", lambda: available)
    return fake


def test_keops_is_its_own_kind_never_the_best_naive(monkeypatch):
    assert bench_contenders.KEOPS.kind == "keops"  # the real registration, not "naive"
    fake = _fake_keops(monkeypatch)
    naive_names = {c.name for c in NAIVE}
    assert "keops" in [c.name for c in all_contenders("cpu")]
    assert select_contenders("cpu", "keops") == [fake]  # by kind (and by name)
    kept = BenchConfig(shapes=parse_shapes("tiny"), exclude=["keops"]).selected_contenders()
    assert "keops" not in [c.name for c in kept] and naive_names <= {c.name for c in kept}

    config = BenchConfig(shapes=parse_shapes("tiny"), passes=["forward"],
                         contenders=["naive", "keops", "floor"], repeats=2, warmup=1,
                         threads=1, isolate=False)
    results = run_cases(config)
    assert {r["contender"] for r in results} == naive_names | {"keops", "floor_mm"}
    assert all(r["status"] == "ok" for r in results), results
    # KeOps faster than every naive PyTorch contender: it must still not become the baseline
    keops = next(r for r in results if r["kind"] == "keops")
    keops["median_s"] = min(r["median_s"] for r in results) / 10
    add_comparisons(results)
    best = min((r for r in results if r["kind"] == "naive"), key=lambda r: r["median_s"])
    for r in results:
        assert r["best_naive"] == best["contender"] != "keops", r
        assert r["speedup_vs_best_naive"] == best["median_s"] / r["median_s"]
        assert r["speedup_vs_keops"] == keops["median_s"] / r["median_s"]
    assert keops["speedup_vs_keops"] == 1.0 and keops["speedup_vs_best_naive"] > 1

    table = format_table(results)
    assert "vs KeOps" in table and "\nkeops " in table
    markdown = format_markdown(results).splitlines()
    assert "vs KeOps" in markdown[0] and len(markdown) == 2 + len(results)
    assert all(line.count("|") == markdown[0].count("|") for line in markdown)


def test_speedup_vs_keops_only_where_keops_ran(monkeypatch):
    _fake_keops(monkeypatch, available=False)
    # without pykeops, --exclude keops (a kind) is fine; --contenders keops names nothing
    kept = BenchConfig(shapes=parse_shapes("tiny"), exclude=["keops"]).selected_contenders()
    assert [c.name for c in kept] == [c.name for c in all_contenders("cpu")]
    with pytest.raises(ValueError, match="not available"):
        BenchConfig(shapes=parse_shapes("tiny"), contenders=["keops"]).selected_contenders()
    with pytest.raises(ValueError, match="not available"):
        BenchConfig(shapes=parse_shapes("tiny"), exclude=["naive_cnov"]).selected_contenders()

    config = BenchConfig(shapes=parse_shapes("tiny"), passes=["forward"],
                         contenders=["naive_loop", "floor"], repeats=1, warmup=0, threads=1,
                         isolate=False)
    results = run_cases(config)
    assert all(r["status"] == "ok" and "speedup_vs_keops" not in r for r in results), results
    assert "vs KeOps" not in format_table(results) + format_markdown(results)


def test_write_json_turns_non_finite_floats_into_null(tmp_path):
    inf, nan = float("inf"), float("nan")
    results = [{"shape": "tiny", "contender": "naive_loop", "status": "ok", "median_s": 0.5,
                "speedup_vs_best_naive": inf, "ratio_to_floor": nan,
                "times_s": [0.5, -inf, nan], "nested": {"quartiles": (nan, 1.5)}}]
    path = tmp_path / "out" / "bench.json"
    write_json(path, {"load_average": [nan, 1.0]}, results, scaling=[{"median_s": inf}])

    def reject(constant: str):
        raise AssertionError(f"non-standard JSON constant {constant}")

    document = json.loads(path.read_text(), parse_constant=reject)
    (r,) = document["results"]
    assert r["median_s"] == 0.5
    assert r["speedup_vs_best_naive"] is None and r["ratio_to_floor"] is None
    assert r["times_s"] == [0.5, None, None]
    assert r["nested"] == {"quartiles": [None, 1.5]}
    assert document["environment"] == {"load_average": [None, 1.0]}
    assert document["scaling"] == [{"median_s": None}]
    assert "tiny" in document["shapes"]
    assert math.isinf(results[0]["speedup_vs_best_naive"])  # the caller's results untouched
