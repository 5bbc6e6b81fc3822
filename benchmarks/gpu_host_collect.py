"""What the device check's test step (``pytest -m cuda tests``) would collect on a GPU host,
counted here without one: a pytest plugin that makes this process look like a GPU host with
the cuda kernels built and triton compiling for the GPU (CUDA said to be present, the cuda
backend said to be available, TRITON_INTERPRET unset), then prints, after collection, the
selected tests per backend id (``name@cuda``), per file, and in all.

    env -u TRITON_INTERPRET PYTHONPATH=.:benchmarks python -m pytest -p gpu_host_collect \\
        -p no:cacheprovider --collect-only -q -m cuda tests  # everything -m cuda selects
    env -u TRITON_INTERPRET PYTHONPATH=.:benchmarks python -m pytest -p gpu_host_collect \\
        -p gpu_test_run -p no:cacheprovider --collect-only -q -m cuda tests  # gpu_check.sh

Nothing runs: it sizes the device script's test step (benchmarks/gpu_check.sh), and shows
that the contract tests reach both GPU backends there (tests/test_backend_fixture.py asserts
the same for the contract files).
"""

import collections
import dataclasses

import torch

torch.cuda.is_available = lambda: True

from gpu_test_run import backend_pair  # noqa: E402

from protokern import env  # noqa: E402
from protokern.backends import registry  # noqa: E402

# protokern read TRITON_INTERPRET when it was imported just now; a GPU host has it unset
# (tests/conftest.py sets it only where CUDA is absent), so a set one would count other tests
if env.flag("TRITON_INTERPRET"):
    raise RuntimeError("gpu_host_collect: run it with TRITON_INTERPRET unset "
                       "(env -u TRITON_INTERPRET python -m pytest -p gpu_host_collect ...)")

registry.register_backend(dataclasses.replace(registry.registered_backend("cuda"),
                                              unavailable_reason=lambda: None))


def pytest_collection_finish(session) -> None:
    by_backend = collections.Counter()
    by_file = collections.Counter()
    for item in session.items:
        pair = backend_pair(item)
        by_backend["(no backend fixture)" if pair is None else f"{pair[0]}@{pair[1]}"] += 1
        by_file[item.nodeid.split("::")[0]] += 1
    print(f"\n{len(session.items)} tests selected on a GPU host stand-in")
    print("per backend id:", dict(sorted(by_backend.items())))
    print("per file:", dict(sorted(by_file.items())))
