import contextlib
import dataclasses
import os
import sys

# Inductor's on-disk caches do not notice edits to a custom op's Python autograd formula and
# can replay a stale backward graph; compile from scratch in tests.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if torch.cuda.is_available():
    # cuBLAS runs under torch.use_deterministic_algorithms(True) (test_determinism.py) only with
    # a fixed workspace; read when CUDA initialises, so set before anything touches it.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
else:
    # Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter; protokern
    # reads it on import (as does triton when it compiles), so set it before either.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import protokern as pk  # noqa: E402
from protokern.backends import registry  # noqa: E402

# the shared helper modules (cases.py, brute_force.py, helpers.py), for the tests in every
# sub-folder and for the processes they spawn
sys.path.insert(0, os.path.dirname(__file__))

import cases  # noqa: E402

_REFUSED = pytest.StashKey[list]()
"""The reasons the chosen backend's rules (`Backend.supports`) gave during a test."""


@contextlib.contextmanager
def _noting_refusals(name: str, refusals: list):
    """Backend ``name`` with each of its rules appending the reason it refuses a call, if any,
    to ``refusals``."""
    backend = registry.registered_backend(name)
    if not backend.rules:
        yield
        return

    def noting(rule):
        def check(*args, **kwargs):
            reason = rule(*args, **kwargs)
            if reason is not None:
                refusals.append(reason)
            return reason
        return check

    noted = dataclasses.replace(backend, rules={op: noting(rule)
                                                for op, rule in backend.rules.items()})
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry._registry, name, noted)
        yield


def _on_backend(request):
    """Run the test on backend ``name`` with tensors made on ``device`` (``request.param``), and
    check that every protokern kernel the test ran inside the choice ran on that backend."""
    name, device = request.param
    refusals = request.node.stash[_REFUSED] = []
    with (_noting_refusals(name, refusals), cases.default_device(device),
          pk.recording() as calls, pk.use_backend(name)):
        yield name
    ran_elsewhere = {ran for _, ran in calls} - {name, "reference"}
    assert not ran_elsewhere, f"chose {name!r}, but {ran_elsewhere} ran kernels"


@pytest.fixture(params=cases.backend_params())
def backend(request):
    """The contract's backends: the test runs once per backend this install runs on CPU
    tensors and, where CUDA is present, once more per backend it runs on CUDA tensors, with
    `torch.set_default_device("cuda")` so that the test's tensors are made there (``cuda``
    marker, ids ``name@cuda``). A call the backend refuses by one of its rules (DESIGN §3: the
    ``cuda`` kernels take no windows and no float64) skips the rest of the test with the
    reason; the test fails on any other error."""
    yield from _on_backend(request)


@pytest.fixture(params=cases.backend_params(devices=("cpu",)))
def cpu_backend(request):
    """As ``backend``, for CPU tensors only: for tests of the models and heads built on the ops,
    whose data comes from CPU generators."""
    yield from _on_backend(request)


def _refusal(item: pytest.Item, error: BaseException) -> str | None:
    """The reason, when ``error`` is (or was raised from) the ValueError of an explicit choice
    whose backend refused the call by one of its rules during the test ``item``."""
    refusals = item.stash.get(_REFUSED, [])
    while error is not None and refusals:
        if isinstance(error, ValueError) and "cannot run this call" in str(error):
            for reason in refusals:
                if reason in str(error):
                    return reason
        error = error.__cause__ or error.__context__
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except Exception as error:
        reason = _refusal(item, error)
        if reason is None:
            raise
        pytest.skip(f"the backend refuses this call (Backend.supports): {reason}")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
