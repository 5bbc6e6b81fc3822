"""The ``backend`` fixture of tests/conftest.py, which every contract test runs through: a call
its backend refuses by one of its rules skips the test with the reason, and nothing else does;
a kernel of another backend fails the test; and on a GPU host (a stand-in: CUDA said to be
present, the cuda backend said to be built) every backend for CUDA tensors gets the contract.

Each runs pytest in a subprocess (a few seconds), on the real conftest.
"""

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import protokern as pk

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CONTRACT = ["test_ops.py", "test_fuzz.py", "test_determinism.py", "test_limits.py",
            "test_compile.py", "nn/test_prototype_layers.py", "test_soak.py",
            "test_nearest_prototypes.py", "test_fuzz_nearest.py", "test_autocast.py"]


def _python_path() -> str:
    """tests/ (cases.py and the other shared helpers) and this checkout, for the subprocess."""
    return os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])


REFUSALS = '''
import dataclasses

import pytest
import torch

import protokern as pk
from protokern.backends import cuda, registry

# the reference's kernels under the cuda backend's rules (no windows, no float64), on CPU
registry.register_backend(dataclasses.replace(
    registry.registered_backend("reference"), name="refusing",
    rules={"min_distance": cuda.unsupported_reason}, device_types=frozenset({"cpu"}),
    priority=-20))
# and a backend for CUDA tensors only, chosen for CPU tensors
registry.register_backend(dataclasses.replace(
    registry.registered_backend("reference"), name="gpu_only", device_types=frozenset({"cuda"}),
    priority=-21))
REFUSING = pytest.mark.parametrize("backend", [("refusing", "cpu")], indirect=True)


@REFUSING
def test_a_refused_call(backend):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    pk.min_distance(x, torch.randn(5, 3, dtype=torch.float64))


@REFUSING
def test_a_refused_call_inside_another_error(backend):
    x = torch.randn(2, 3, 4, 4)
    try:
        pk.min_distance(x, torch.randn(5, 3, 2, 2))
    except ValueError as error:
        raise RuntimeError("wrapped") from error


@REFUSING
def test_a_supported_call(backend):
    assert pk.min_distance(torch.randn(2, 3, 4, 4), torch.randn(5, 3)).values.shape == (2, 5)


@REFUSING
def test_a_value_error_naming_a_reason_without_a_refusal(backend):
    raise ValueError("protokern.min_distance: the chosen backend 'refusing' cannot run this "
                     "call (...): the CUDA kernels take float32, float16 and bfloat16, not "
                     "float64")


@REFUSING
def test_another_failure_after_a_refusal(backend):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError):
        pk.min_distance(x, torch.randn(5, 3, dtype=torch.float64))
    assert False, "a failure of its own"


@pytest.mark.parametrize("backend", [("gpu_only", "cpu")], indirect=True)
def test_a_refusal_for_the_device_is_no_rule(backend):
    pk.min_distance(torch.randn(2, 3, 4, 4), torch.randn(5, 3))


@REFUSING
def test_a_kernel_of_another_backend(backend):
    with pk.use_backend("cpu" if "cpu" in pk.available_backends("cpu") else "triton"):
        pk.min_distance(torch.randn(2, 3, 4, 4), torch.randn(5, 3))
'''


def test_only_a_refusal_by_the_backends_rules_skips(pytester, monkeypatch):
    if len(pk.available_backends("cpu")) < 2:
        pytest.skip("needs a second backend for CPU tensors besides the reference")
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile(test_refusals=REFUSALS)
    monkeypatch.setenv("PYTHONPATH", _python_path())
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rsfE")
    # the supported call and the other backend's kernel pass; the latter errors at teardown
    result.assert_outcomes(passed=2, skipped=2, failed=3, errors=1)
    result.stdout.fnmatch_lines_random([
        "SKIPPED*the backend refuses this call (Backend.supports): the CUDA kernels take "
        "float32, float16 and bfloat16, not float64",
        "SKIPPED*the backend refuses this call (Backend.supports): the CUDA kernels take 1x1 "
        "prototypes, not a 2x2 window",
        "FAILED*test_a_value_error_naming_a_reason_without_a_refusal*",
        "FAILED*test_another_failure_after_a_refusal*",
        "FAILED*test_a_refusal_for_the_device_is_no_rule*",
        "E   *it runs on cuda tensors, but the inputs are on cpu*",
        "ERROR*test_a_kernel_of_another_backend*",
        "E *AssertionError: chose 'refusing', but {*} ran kernels",
    ])


GPU_HOST = '''
import dataclasses
import json
import os

import torch

os.environ.pop("TRITON_INTERPRET", None)  # conftest leaves it unset where CUDA is present
torch.cuda.is_available = lambda: True
from protokern.backends import registry  # noqa: E402

registry.register_backend(dataclasses.replace(registry.registered_backend("cuda"),
                                              unavailable_reason=lambda: None))
KEYS = ("backend", "backend_on_device")


def pytest_collection_finish(session):
    tests = []
    for item in session.items:
        params = dict(getattr(item, "callspec", None) and item.callspec.params or {})
        pair = next((params.pop(key) for key in KEYS if key in params), None)
        if pair is not None:
            tests.append({"backend": pair[0], "device": pair[1],
                          "test": item.nodeid.split("[")[0],
                          "params": sorted((k, repr(v)) for k, v in params.items()),
                          "cuda_marker": item.get_closest_marker("cuda") is not None})
    with open(os.environ["GPU_HOST_TESTS"], "w") as out:
        json.dump(tests, out)
'''


def test_a_gpu_host_runs_the_contract_on_every_backend_for_cuda_tensors(tmp_path):
    """The fixture's pairs as a GPU host with triton and the cuda kernels would collect them
    (their counts are in the printed output): the reference gets on CUDA tensors what it gets
    on CPU tensors; cuda and triton get that and the tests of fused backends alone."""
    pytest.importorskip("triton")
    if "cpu" not in pk.available_backends("cpu"):
        pytest.skip("the cpu backend tells the fused backends' tests apart: it is not built")
    (tmp_path / "gpu_host.py").write_text(GPU_HOST)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), _python_path()]),
           "GPU_HOST_TESTS": str(tmp_path / "tests.json")}
    env.pop("TRITON_INTERPRET")
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "-p", "gpu_host",
                           *[str(TESTS / name) for name in CONTRACT]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = defaultdict(set)
    for test in json.loads((tmp_path / "tests.json").read_text()):
        assert test["cuda_marker"] == (test["device"] == "cuda"), test
        collected[test["backend"], test["device"]].add((test["test"], str(test["params"])))
    print({f"{name}@{device}": len(tests) for (name, device), tests in collected.items()})
    assert set(collected) == {("cpu", "cpu"), ("reference", "cpu"), ("cuda", "cuda"),
                              ("triton", "cuda"), ("reference", "cuda")}
    assert collected["reference", "cuda"] == collected["reference", "cpu"]
    fused_only = collected["cpu", "cpu"] - collected["reference", "cpu"]
    assert fused_only  # e.g. the limit of 2^31 positions, which the reference does not have
    for fused in ("cuda", "triton"):
        assert collected[fused, "cuda"] == collected["reference", "cuda"] | fused_only
