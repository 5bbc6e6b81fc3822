"""`protokern bench` end to end: what it prints and writes (JSON, Markdown, the scaling plot)
is the measurement of every contender on every pass, and a bad device is a clear error.

Speed is never asserted here (DESIGN §5).
"""

import json
import math
import os
import subprocess
import sys

import matplotlib.image
import pytest
import torch

from protokern import cli
from protokern.backends import cpu as cpu_backend
from protokern.bench.contenders import PASSES, all_contenders


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_command_end_to_end(tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "scaling.png"
    command = [sys.executable, "-m", "protokern.cli", "bench", "--device", "cpu",
               "--shapes", "tiny_patch", "--repeats", "2", "--warmup", "1",
               "--threads", "1", "--json", str(out_json), "--plot", str(out_png),
               "--scaling-shape", "tiny", "--scaling-m", "20,60", "--scaling-repeats", "1",
               # two contenders in the sweep: each CPU case starts two processes (timing and
               # memory), and the sweep of every contender doubled this test's time
               "--scaling-contenders", "protokern:reference,naive_cdist",
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
    # (plus protokern:cpu+blas / +packed where this CPU runs the cpu backend's packed GEMM)
    gemms = ["protokern:cpu+blas", "protokern:cpu+packed"] if "cpu" in backends and \
        cpu_backend.packed_gemm_supported() else []
    contenders = [f"protokern:{b}" for b in backends] + gemms + [
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
    assert {r["contender"] for r in scaling} == {"protokern:reference", "naive_cdist"}
    assert env["scaling"]["contenders"] == ["protokern:reference", "naive_cdist"]
    assert all(r["status"] == "ok" and _finite_positive(r["median_s"]) for r in scaling)

    image = matplotlib.image.imread(out_png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something is drawn


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_bench_on_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert cli.main(["bench", "--device", "cuda", "--shapes", "tiny"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().out


def test_an_unknown_sweep_contender_is_a_clear_error_before_any_case(capsys):
    assert cli.main(["bench", "--device", "cpu", "--shapes", "tiny",
                     "--scaling-contenders", "protokern:reference,no_such_contender"]) == 2
    assert capsys.readouterr().out.startswith(
        "protokern bench: --scaling-contenders: contender 'no_such_contender' is not available")
