"""The backend registry of DESIGN.md §3: listing, choosing, overriding, clear errors."""

import threading

import pytest
import torch

import protokern as pk
from protokern import backends, reference


def _counting_backend(name, calls, **kwargs):
    def count(op, impl):
        def run(*args):
            calls.append(op)
            return impl(*args)
        return run

    return backends.Backend(
        name,
        count("min_distance", reference.min_distance),
        count("min_distance_backward", reference.min_distance_backward),
        count("distance_map", reference.distance_map),
        count("distance_map_backward", reference.distance_map_backward),
        **kwargs,
    )


@pytest.fixture
def registry(monkeypatch):
    """A scratch registry holding only the reference (whatever kernels this install built),
    and a clean selection for the test."""
    monkeypatch.setattr(backends, "_registry", {"reference": backends._registry["reference"]})
    monkeypatch.setattr(backends, "_process_choice", None)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    return backends._registry


def _run_all_ops():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    values, _ = pk.min_distance(x, torch.randn(5, 3))
    values.sum().backward()
    pk.distance_map(x, torch.randn(5, 3))


def test_reference_is_always_available():
    assert "reference" in pk.available_backends()
    assert "reference" in pk.available_backends("cpu")
    assert "reference" in pk.available_backends(torch.device("meta"))


def test_default_is_the_highest_priority_backend_for_the_device(registry):
    calls = []
    registry["fast"] = _counting_backend("fast", calls, device_types=frozenset({"cpu"}),
                                         priority=10)
    registry["gpu"] = _counting_backend("gpu", [], device_types=frozenset({"cuda"}),
                                        priority=20)
    assert pk.available_backends("cpu") == ["fast", "reference"]
    assert pk.available_backends("cuda") == ["gpu", "reference"]
    assert pk.available_backends()[0] == "gpu"
    _run_all_ops()
    assert calls == ["min_distance", "min_distance_backward", "distance_map"]


def test_unavailable_backends_are_not_listed_and_not_chosen(registry):
    registry["broken"] = _counting_backend("broken", [], priority=99,
                                           unavailable_reason=lambda: "the extension is not built")
    assert "broken" not in pk.available_backends()
    _run_all_ops()  # falls back to reference
    with pytest.raises(RuntimeError, match="'broken' is not available: the extension is not built"):
        pk.set_backend("broken")


def test_unknown_backend_is_a_clear_error(registry):
    with pytest.raises(ValueError, match="unknown protokern backend 'nope'; known backends: "
                                         "reference"):
        pk.set_backend("nope")
    with pytest.raises(ValueError, match="unknown protokern backend"):
        with pk.use_backend("nope"):
            pass
    assert pk.get_backend() is None


def test_set_and_use_backend(registry):
    calls = []
    registry["other"] = _counting_backend("other", calls)
    pk.set_backend("other")
    assert pk.get_backend() == "other"
    with pk.use_backend("reference"):
        assert pk.get_backend() == "reference"
        _run_all_ops()
    assert calls == [] and pk.get_backend() == "other"
    with pytest.raises(KeyError), pk.use_backend(None):
        assert pk.get_backend() is None
        raise KeyError("restored even on error")
    assert pk.get_backend() == "other"
    _run_all_ops()
    assert len(calls) == 3
    pk.set_backend(None)
    assert pk.get_backend() is None


def test_environment_variable_chooses_unless_overridden(registry, monkeypatch):
    calls = []
    registry["other"] = _counting_backend("other", calls)
    monkeypatch.setenv(backends.ENV_VAR, "other")
    _run_all_ops()
    assert len(calls) == 3
    with pk.use_backend("reference"):
        _run_all_ops()
    assert len(calls) == 3
    monkeypatch.setenv(backends.ENV_VAR, "typo")
    with pytest.raises(ValueError, match="PROTOKERN_BACKEND=typo: unknown protokern backend"):
        _run_all_ops()


def test_backend_for_another_device_is_a_clear_error(registry):
    registry["gpu"] = _counting_backend("gpu", [], device_types=frozenset({"cuda"}))
    with pk.use_backend("gpu"), pytest.raises(
        RuntimeError, match=r"backend 'gpu' chosen by use_backend/set_backend: backend 'gpu' runs "
                            r"on cuda tensors, but the inputs are on cpu"
    ):
        _run_all_ops()


def test_the_backward_runs_on_the_forward_backend(registry):
    calls = []
    registry["other"] = _counting_backend("other", calls)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with pk.use_backend("other"):
        values, _ = pk.min_distance(x, torch.randn(5, 3))
        dmap = pk.distance_map(x, torch.randn(5, 3))
    (values.sum() + dmap.sum()).backward()  # outside the block
    # autograd picks the order of the two backward ops; all four ran on "other"
    assert sorted(calls) == ["distance_map", "distance_map_backward", "min_distance",
                             "min_distance_backward"]


def test_use_backend_blocks_in_two_threads_do_not_interfere(registry):
    registry["other"] = _counting_backend("other", [])
    a_entered, b_entered, a_left = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with pk.use_backend("reference"):
            a_entered.set()
            b_entered.wait()
            seen["a"] = pk.get_backend()
        a_left.set()

    def second():
        a_entered.wait()
        with pk.use_backend("other"):
            b_entered.set()
            a_left.wait()
            seen["b"] = pk.get_backend()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": "reference", "b": "other"}
    assert pk.get_backend() is None


def test_set_backend_applies_to_other_threads(registry):
    registry["other"] = _counting_backend("other", [])
    pk.set_backend("other")
    seen = []
    thread = threading.Thread(target=lambda: seen.append(pk.get_backend()))
    thread.start()
    thread.join()
    assert seen == ["other"]


def test_a_compiled_function_keeps_its_backend_for_both_passes(registry):
    """Under torch.compile the choice is a compile-time constant, for forward and backward."""
    torch._dynamo.reset()
    calls = []
    registry["other"] = _counting_backend("other", calls)
    prototypes = torch.randn(5, 3)
    compiled = torch.compile(lambda x: pk.min_distance(x, prototypes).values.sum(),
                             backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with pk.use_backend("other"):
        compiled(x).backward()
    compiled(x).backward()  # the automatic choice would be reference
    assert calls == ["min_distance", "min_distance_backward"] * 2
    torch._dynamo.reset()
