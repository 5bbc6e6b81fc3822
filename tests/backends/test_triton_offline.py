"""The Triton forward compiled for a GPU with no GPU here (`protokern.backends.triton.offline`):
on sm_90 (the lent GPUs' target) in bfloat16, no configuration `_choose_kernel` may run with on
the benchmark shapes (L = 49, 196, 1) spills registers, and the GEMM compiles to wgmma with
cp.async loads; `topk_distance`'s default configuration spills nothing at k = 16 on cub in
bfloat16 on sm_90 and in TF32 on sm_80. (Every `_choose_kernel` configuration spilled before the
channels-contiguous, transposed tile.)

What this does not guard, and the committed report (benchmarks/results/triton-compile-report.md:
every shape, dtype, metric, both targets) shows: float32 without TF32 (FMAs, no tensor cores)
spills in every configuration, TF32 in some (up to 56 bytes on sm_90, 512 on sm_80), cosine and
sm_80 in a few. A subset, to stay near a minute; in a subprocess without TRITON_INTERPRET
(which the test session sets without a GPU). Skips where triton or its bundled
ptxas/cuobjdump are missing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protokern.backends.triton import offline

ROOT = Path(__file__).resolve().parents[2]

COMPILE = '''
import json, sys
from protokern.backends.triton import offline
shapes = [s for s in offline.SHAPES if s.name in ("cub", "large_bank", "cil_vectors")]
specs = {s[0]: s for s in offline.SPECIALIZATIONS}
rows = offline.reports(["sm_90"], shapes, [specs["bfloat16"]], ("sqeuclidean",), exact=False)
from protokern.backends.triton import topk_distance
topk = [offline.topk_kernel_report(shape, specs[spec], "sqeuclidean", topk_distance.CONFIGS[0],
                                   16, target)
        for shape in shapes[:1] for spec, target in (("bfloat16", "sm_90"), ("tf32", "sm_80"))]
json.dump({"min": [r.__dict__ for r in rows], "topk": [r.__dict__ for r in topk]}, sys.stdout)
'''


@pytest.fixture(scope="module")
def compiled() -> dict[str, list[dict]]:
    missing = offline.tool_missing()
    if missing:
        pytest.skip(f"cannot compile for a GPU here: {missing}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", COMPILE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_default_config_compiles_without_spills(compiled):
    from protokern.backends.triton import min_distance

    per_specialization = sum(len(min_distance.configs_for(length)) for length in (49, 196, 1))
    assert len(compiled["min"]) == per_specialization
    spilling = [(r["specialization"], r["config"], r["spill_bytes"]) for r in compiled["min"]
                if r["spill_bytes"]]
    assert not spilling, f"default configs that spill (stack bytes) on sm_90: {spilling}"


def test_the_gemm_runs_on_tensor_cores_with_asynchronous_loads(compiled):
    assert all(r["wgmma"] for r in compiled["min"])
    assert all(r["cp_async"] for r in compiled["min"]), [
        (r["specialization"], r["config"]) for r in compiled["min"] if not r["cp_async"]]


def test_topk_default_config_compiles_without_spills(compiled):
    """`topk_distance._topk_kernel`'s first configuration (the deterministic runs') at k = 16,
    the largest, on cub: no spill in bfloat16 on sm_90 nor in TF32 on sm_80 (nor, float32 aside,
    anywhere in the grid `topk_distance.CONFIGS` names), tensor cores
    (``mma.sync``: 32 prototypes per tile is below wgmma's 64) and ``cp.async`` loads."""
    spilling = [(r["specialization"], r["target"], r["spill_bytes"]) for r in compiled["topk"]
                if r["spill_bytes"]]
    assert len(compiled["topk"]) == 2 and not spilling, spilling
    assert all(r["mma_sync"] and r["cp_async"] for r in compiled["topk"])
