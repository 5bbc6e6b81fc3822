"""The benchmark's contenders: the naive baselines compute what protokern computes (values,
indices up to near-ties, both gradients, against float64), every available backend is one,
and KeOps is a kind of its own, never the naive baseline the speed-ups are measured against.
"""

import dataclasses

import pytest
import torch

import protokern as pk
from protokern import backends
from protokern.backends import reference, registry
from protokern.bench import contenders as bench_contenders
from protokern.bench.contenders import Contender, all_contenders, select_contenders
from protokern.bench.measure import make_inputs
from protokern.bench.report import format_markdown, format_table
from protokern.bench.runner import BenchConfig, add_comparisons, run_cases
from protokern.bench.shapes import SHAPES, parse_shapes
from protokern.testing import TOLERANCE, near_tie_ok, relative_error

# protokern's own backends are checked by the contract tests (tests/test_ops.py)
NAIVE = [c for c in all_contenders("cpu") if c.kind == "naive"]


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


NEAREST = all_contenders("cpu", "nearest_prototypes", k=3)


@pytest.mark.parametrize("contender", [c for c in NEAREST if c.kind != "floor"],
                         ids=lambda c: c.name)
def test_nearest_prototypes_contenders_agree_with_reference(contender):
    """The contenders of the reduction over prototypes (every backend, cdist + topk whole and
    by blocks, faiss where installed): values, indices up to near-ties and both gradients."""
    shape = SHAPES["tiny_nearest"]
    x, prototypes, grad = make_inputs(shape, torch.float32, "cpu", seed=3)
    values, indices, grad_x, grad_p = contender.evaluate(x, prototypes, grad)
    x64 = x.double().requires_grad_()
    p64 = prototypes.double().requires_grad_()
    with pk.use_backend("reference"):
        ref_values, _ = pk.nearest_prototypes(x64, p64, shape.k)
    ref_values = ref_values.flatten(1, -2)
    ref_grad_x, ref_grad_p = torch.autograd.grad(ref_values, (x64, p64), grad.double())
    d = reference.distance_map(x64.detach(), p64.detach(), "sqeuclidean").flatten(2)
    tol = TOLERANCE[torch.float32]
    assert values.shape == indices.shape == ref_values.shape == shape.output_shape
    assert relative_error(values, ref_values) <= tol
    chosen = d.transpose(1, 2).gather(-1, indices)  # the true distance at each returned index
    assert relative_error(chosen, ref_values) <= tol
    assert relative_error(grad_x, ref_grad_x) <= tol
    assert relative_error(grad_p, ref_grad_p) <= tol


def test_faiss_is_benchmarked_where_installed():
    names = [c.name for c in NEAREST]
    assert ("faiss" in names) == bench_contenders.faiss_available()
    if not bench_contenders.faiss_available():
        pytest.skip("faiss-cpu is not installed (pip install faiss-cpu); its contender is "
                    "checked where it is")
    assert next(c for c in NEAREST if c.name == "faiss").kind == "faiss"


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
