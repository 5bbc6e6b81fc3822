import os
import sys

# Inductor's on-disk caches do not notice edits to a custom op's Python autograd formula and
# can replay a stale backward graph; compile from scratch in tests.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter; triton reads
# protokern reads it on import (as does triton when it compiles), so set it before either.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import protokern as pk  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # brute_force.py and helpers.py

CPU_BACKENDS = pk.available_backends("cpu")


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Runs the test once per backend this install can run on CPU tensors, and checks that
    every protokern kernel the test ran inside the choice ran on that backend."""
    with pk.recording() as calls, pk.use_backend(request.param):
        yield request.param
    ran_elsewhere = {name for _, name in calls} - {request.param, "reference"}
    assert not ran_elsewhere, f"chose {request.param!r}, but {ran_elsewhere} ran kernels"


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
