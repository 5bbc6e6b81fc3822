"""The backend registry of DESIGN.md §3: listing, choosing by what each backend supports,
overriding, clear errors, recording which backend ran, backward only what is needed."""

import threading

import pytest
import torch

import protokern as pk
from protokern import backends
from protokern.backends import reference, registry

REFERENCE_KERNELS = {
    "min_distance": reference.min_distance,
    "min_distance_backward": reference.min_distance_backward,
    "distance_map": reference.distance_map,
    "distance_map_backward": reference.distance_map_backward,
}


def _counting_backend(name, calls, rules=None, **kwargs):
    """The reference's kernels under another name, appending each kernel's name to ``calls``
    (backward kernels with the gradients asked for)."""
    def count(kernel, impl):
        def run(*args):
            calls.append(kernel if not kernel.endswith("backward") else (kernel, *args[-2:]))
            return impl(*args)
        return run

    return backends.Backend(name, {k: count(k, f) for k, f in REFERENCE_KERNELS.items()},
                            rules=rules or {}, **kwargs)


@pytest.fixture
def registry_(monkeypatch):
    """A scratch registry holding only the reference (whatever kernels this install built),
    and a clean selection for the test."""
    monkeypatch.setattr(registry, "_registry",
                        {"reference": backends.registered_backend("reference")})
    monkeypatch.setattr(registry, "_process_choice", None)
    monkeypatch.delenv("PROTOKERN_BACKEND", raising=False)
    return registry._registry


def _run_all_ops():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    values, _ = pk.min_distance(x, torch.randn(5, 3))
    values.sum().backward()
    pk.distance_map(x, torch.randn(5, 3))


def _names(calls):
    return [c if isinstance(c, str) else c[0] for c in calls]


def test_backend_is_exported_and_says_what_it_supports():
    assert pk.Backend is backends.Backend
    ref = backends.registered_backend("reference")
    x, p = torch.randn(2, 3, 4, 4), torch.randn(5, 3, 1, 1)
    assert ref.supports("min_distance", x, p, metric="cosine") is None
    assert ref.supports("nearest_neighbours", x, p) == "it has no nearest_neighbours kernel"


def test_supports_reports_device_availability_and_rules(registry_):
    gpu = _counting_backend("gpu", [], device_types=frozenset({"cuda"}))
    x, p = torch.randn(2, 3, 4, 4), torch.randn(5, 3, 1, 1)
    assert gpu.supports("min_distance", x, p) == ("it runs on cuda tensors, but the inputs are "
                                                  "on cpu")
    broken = _counting_backend("broken", [], unavailable_reason=lambda: "not built")
    assert broken.supports("min_distance", x, p) == ("it is not available in this install: "
                                                     "not built")
    picky = _counting_backend("picky", [], rules={
        "min_distance": lambda x, p, metric: "no cosine" if metric == "cosine" else None})
    assert picky.supports("min_distance", x, p, metric="cosine") == "no cosine"
    assert picky.supports("min_distance", x, p, metric="sqeuclidean") is None
    assert picky.supports("distance_map", x, p, metric="cosine") is None  # rules are per op


def test_reference_is_always_available():
    assert "reference" in pk.available_backends()
    assert "reference" in pk.available_backends("cpu")
    assert "reference" in pk.available_backends(torch.device("meta"))


def test_default_is_the_highest_priority_backend_for_the_device(registry_):
    calls = []
    registry_["fast"] = _counting_backend("fast", calls, device_types=frozenset({"cpu"}),
                                          priority=10)
    registry_["gpu"] = _counting_backend("gpu", [], device_types=frozenset({"cuda"}),
                                         priority=20)
    assert pk.available_backends("cpu") == ["fast", "reference"]
    assert pk.available_backends("cuda") == ["gpu", "reference"]
    assert pk.available_backends()[0] == "gpu"
    _run_all_ops()
    assert _names(calls) == ["min_distance", "min_distance_backward", "distance_map"]


def test_the_default_walks_the_priority_list_to_the_first_backend_that_supports_the_call(
        registry_):
    """A backend that cannot run a call is passed over by the automatic choice (and only by
    it), which takes the next one: here windows go to 'second', 1x1 prototypes to 'first'."""
    first, second = [], []
    registry_["first"] = _counting_backend("first", first, priority=30, rules={
        "min_distance": lambda x, p, **_: None if p.shape[-2:] == (1, 1) else "1x1 only"})
    registry_["second"] = _counting_backend("second", second, priority=20)
    x = torch.randn(2, 3, 4, 4)
    with pk.recording() as calls:
        pk.min_distance(x, torch.randn(5, 3, 2, 2))
        pk.min_distance(x, torch.randn(5, 3))
    assert calls == [("min_distance", "second"), ("min_distance", "first")]
    assert first == ["min_distance"] and second == ["min_distance"]


def test_an_explicit_choice_that_cannot_run_the_call_is_a_value_error_never_a_hand_off(
        registry_, monkeypatch):
    calls = []
    registry_["picky"] = _counting_backend("picky", calls, priority=30, rules={
        "min_distance": lambda x, p, **_: None if p.shape[-2:] == (1, 1) else
        f"the picky kernels take 1x1 prototypes, not {p.shape[-2]}x{p.shape[-1]}"})
    x, windows = torch.randn(2, 3, 4, 4), torch.randn(5, 3, 2, 2)
    message = (r"protokern.min_distance: the chosen backend 'picky' cannot run this call "
               r"\(x \(2, 3, 4, 4\) float32 on cpu, prototypes \(5, 3, 2, 2\)\): the picky "
               r"kernels take 1x1 prototypes, not 2x2")
    with pk.recording() as ran:
        with pk.use_backend("picky"), pytest.raises(ValueError, match=message):
            pk.min_distance(x, windows)
        pk.set_backend("picky")
        try:
            with pytest.raises(ValueError, match=message):
                pk.min_distance(x, windows)
        finally:
            pk.set_backend(None)
        monkeypatch.setenv("PROTOKERN_BACKEND", "picky")
        with pytest.raises(ValueError, match=message):
            pk.min_distance(x, windows)
    assert calls == [] and ran == []  # no kernel of any backend ran


def test_unavailable_backends_are_not_listed_and_not_chosen(registry_):
    registry_["broken"] = _counting_backend("broken", [], priority=99,
                                            unavailable_reason=lambda: "the extension is not "
                                                                       "built")
    assert "broken" not in pk.available_backends()
    with pk.recording() as calls:
        _run_all_ops()
    assert {name for _, name in calls} == {"reference"}
    with pytest.raises(RuntimeError, match="'broken' is not available: the extension is not built"):
        pk.set_backend("broken")


def test_unknown_backend_is_a_clear_error(registry_):
    with pytest.raises(ValueError, match="unknown protokern backend 'nope'; known backends: "
                                         "reference"):
        pk.set_backend("nope")
    with pytest.raises(ValueError, match="unknown protokern backend"):
        with pk.use_backend("nope"):
            pass
    assert pk.get_backend() is None


def test_set_and_use_backend(registry_):
    calls = []
    registry_["other"] = _counting_backend("other", calls)
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


def test_environment_variable_chooses_unless_overridden(registry_, monkeypatch):
    calls = []
    registry_["other"] = _counting_backend("other", calls)
    monkeypatch.setenv("PROTOKERN_BACKEND", "other")
    _run_all_ops()
    assert len(calls) == 3
    with pk.use_backend("reference"):
        _run_all_ops()
    assert len(calls) == 3
    monkeypatch.setenv("PROTOKERN_BACKEND", "typo")
    with pytest.raises(ValueError, match="unknown protokern backend 'typo'"):
        _run_all_ops()


def test_backend_for_another_device_is_a_clear_error(registry_):
    registry_["gpu"] = _counting_backend("gpu", [], device_types=frozenset({"cuda"}))
    with pk.use_backend("gpu"), pytest.raises(
        ValueError, match=r"the chosen backend 'gpu' cannot run this call .*: it runs on cuda "
                          r"tensors, but the inputs are on cpu"
    ):
        _run_all_ops()


def test_the_backward_runs_on_the_forward_backend(registry_):
    calls = []
    registry_["other"] = _counting_backend("other", calls)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with pk.use_backend("other"):
        values, _ = pk.min_distance(x, torch.randn(5, 3))
        dmap = pk.distance_map(x, torch.randn(5, 3))
    with pk.recording() as ran:
        (values.sum() + dmap.sum()).backward()  # outside the block
    # autograd picks the order of the two backward ops; all four ran on "other"
    assert sorted(_names(calls)) == ["distance_map", "distance_map_backward", "min_distance",
                                     "min_distance_backward"]
    assert sorted(ran) == [("distance_map_backward", "other"), ("min_distance_backward", "other")]


@pytest.mark.parametrize("op", ["min_distance", "distance_map"])
def test_backward_computes_only_the_gradients_autograd_needs(registry_, op):
    calls = []
    registry_["other"] = _counting_backend("other", calls)
    function = getattr(pk, op)
    with pk.use_backend("other"):
        for needs_x, needs_p in [(True, True), (True, False), (False, True)]:
            x = torch.randn(2, 3, 4, 4, requires_grad=needs_x)
            p = torch.randn(5, 3, requires_grad=needs_p)
            out = function(x, p)
            out = out[0] if isinstance(out, tuple) else out
            out.sum().backward()
            assert (x.grad is not None) == needs_x and (p.grad is not None) == needs_p
            assert calls[-1] == (f"{op}_backward", needs_x, needs_p)
            grads = [t.grad for t in (x, p) if t.requires_grad]
            x.grad = p.grad = None
            with pk.use_backend("reference"):  # the reference asked for both
                x2, p2 = x.detach().requires_grad_(), p.detach().requires_grad_()
                out2 = function(x2, p2)
                (out2[0] if isinstance(out2, tuple) else out2).sum().backward()
            want = [t.grad for t, needed in ((x2, needs_x), (p2, needs_p)) if needed]
            for got, expected in zip(grads, want, strict=True):
                assert torch.equal(got, expected)


def test_recording_sees_every_thread(registry_):
    x = torch.randn(2, 3, 4, 4)
    with pk.recording() as calls:
        thread = threading.Thread(target=lambda: pk.min_distance(x, torch.randn(5, 3)))
        thread.start()
        thread.join()
    assert calls == [("min_distance", "reference")]
    pk.min_distance(x, torch.randn(5, 3))  # outside the block: not recorded
    assert len(calls) == 1


def test_use_backend_blocks_in_two_threads_do_not_interfere(registry_):
    registry_["other"] = _counting_backend("other", [])
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


def test_set_backend_applies_to_other_threads(registry_):
    registry_["other"] = _counting_backend("other", [])
    pk.set_backend("other")
    seen = []
    thread = threading.Thread(target=lambda: seen.append(pk.get_backend()))
    thread.start()
    thread.join()
    assert seen == ["other"]


def test_threads_started_in_a_use_backend_block_get_the_process_choice(registry_):
    """What `torch.nn.DataParallel`'s replica threads (`parallel_apply`) get, as the README
    says: not the enclosing use_backend block, but set_backend's choice, else the automatic."""
    registry_["other"] = _counting_backend("other", [], priority=-5)
    registry_["third"] = _counting_backend("third", [], priority=-6)
    x = torch.randn(2, 3, 4, 4)

    def replicas():
        with pk.recording() as calls:
            workers = [threading.Thread(target=lambda: pk.min_distance(x, torch.randn(5, 3)))
                       for _ in range(2)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        return {name for _, name in calls}

    with pk.use_backend("other"):
        assert replicas() == {"reference"}  # automatic: the highest priority
    pk.set_backend("third")
    try:
        with pk.use_backend("other"):
            assert replicas() == {"third"}
    finally:
        pk.set_backend(None)


def test_a_compiled_function_keeps_its_explicit_choice_for_both_passes(registry_):
    """Under torch.compile the explicit choice is a compile-time constant, for forward and
    backward."""
    torch._dynamo.reset()
    calls = []
    registry_["other"] = _counting_backend("other", calls)
    prototypes = torch.randn(5, 3)
    compiled = torch.compile(lambda x: pk.min_distance(x, prototypes).values.sum(),
                             backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with pk.use_backend("other"):
        compiled(x).backward()
    compiled(x).backward()  # the automatic choice would be reference
    assert _names(calls) == ["min_distance", "min_distance_backward"] * 2
    torch._dynamo.reset()


def test_a_compiled_function_asks_each_calls_inputs_under_the_automatic_choice(registry_):
    """With no explicit choice the backend is resolved from each call's inputs, so a graph
    compiled for one call never runs a later call on a backend that refuses it."""
    torch._dynamo.reset()
    picky = []
    registry_["picky"] = _counting_backend("picky", picky, priority=30, rules={
        "min_distance": lambda x, p, **_: None if x.shape[0] < 3 else "B < 3 only"})
    prototypes = torch.randn(5, 3)
    compiled = torch.compile(lambda x: pk.min_distance(x, prototypes).values,
                             backend="aot_eager", fullgraph=True, dynamic=True)
    with pk.recording() as calls:
        compiled(torch.randn(2, 3, 4, 4))
        compiled(torch.randn(4, 3, 4, 4))
    assert calls == [("min_distance", "picky"), ("min_distance", "reference")]
    torch._dynamo.reset()


def test_nested_recordings_each_keep_their_own_calls():
    """An inner recording, empty like the outer one when it starts, must not take out the outer
    one's list when it ends (list.remove would: it compares by value)."""
    x, p = torch.randn(1, 3, 4, 4), torch.randn(2, 3)
    with pk.use_backend("reference"), pk.recording() as outer:
        with pk.recording() as inner:
            pass
        assert inner == []
        pk.min_distance(x, p)
    assert outer and all(backend == "reference" for _, backend in outer)
