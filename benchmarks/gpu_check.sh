#!/usr/bin/env bash
# The device check of a lent GPU, in one call of at most 9 minutes on a bare machine (an H200:
# Python 3.12, torch 2.11+cu130, Triton 3.6). Writes into OUT:
#   gpu_check.log           everything printed, step by step, with each step's exit and time
#   versions.txt            python, torch, CUDA, triton, nvcc, the GPU
#   smoke.json              both GPU backends against the float64 reference, and cuda's
#                             nearest_prototypes (gpu_smoke.py)
#   junit.xml               the GPU test suite (-m cuda), every result, no -x
#   bench-bfloat16.json     protokern bench: cub, imagenet, large_bank, cil_vectors, forward
#   bench-tf32.json           and forward+backward, every contender but the reference and the
#                             per-image loop (rewritten after each case)
#   profile.json            torch.profiler's top kernels per contender (gpu_profile.py)
# Usage: benchmarks/gpu_check.sh OUT
#
# Each step has its own limit (SIGINT at the limit, SIGKILL 5 s later), so a slow or hung step leaves
# the others their time and their results; a failed step is reported and the next runs.
# Exit status 1 if any step failed. Budget, worst case (every step killed at its limit):
#   versions 25 + build 140 + smoke 90 + tests 125 + bench 45 + 45 + profile 25 = 495 s,
#   + 5 s kill-after for each of the 7 steps + 10 s for the backends probe = 540 s (9 min).
# Triton's on-disk cache carries the smoke check's compilations into the later steps.
# The build is for sm_90 only, with every core; the tests run with autotuning narrowed to each
# kernel's first configuration and without the reference's CUDA-tensor cases (gpu_test_run.py),
# the kernels' own files first, and print a summary of every failure (SIGINT at the limit:
# pytest still writes the summary and the XML of what ran).
#
# Dry run without a GPU (what CI-less offline checks can do): GPU_CHECK_DEVICE=cpu runs the
# same steps on CPU tensors with Triton interpreted: no build (the tree's build is used),
# the tests only collected, the tiny shapes benchmarked and profiled.
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUT}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

if [ "$DEVICE" = cuda ]; then
    SHAPES=cub,imagenet,large_bank,cil_vectors
    # the reference (the tests' oracle) and the per-image loop are the slowest contenders:
    # left out so that the four shapes fit the steps' limits
    BENCH_REPEATS=(--repeats 5 --warmup 2 --exclude protokern:reference,naive_loop)
    BENCH_SHAPES=$SHAPES
else
    export TRITON_INTERPRET=1
    SHAPES=tiny,tiny_vectors
    # the dry run checks the steps' machinery, not speed: one shape and three contenders, since
    # every case measures its memory in a fresh process (~4 s here) and the steps keep their
    # GPU limits
    BENCH_REPEATS=(--repeats 2 --warmup 1 --contenders protokern:triton,protokern:cpu,floor_mm)
    BENCH_SHAPES=tiny
fi

failed=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, report, go on
    local name=$1 limit=$2
    shift 2
    echo "=== $(date -u +%H:%M:%S) $name (limit ${limit}s): $*"
    local start=$SECONDS
    # SIGINT first: pytest then still prints its failure summary and writes the junit XML
    timeout --signal=INT --kill-after=5 "$limit" "$@"
    local status=$?
    echo "=== $name: exit $status after $((SECONDS - start))s"
    [ "$status" -eq 0 ] || failed=1
}

echo "=== gpu_check.sh at $(date -u +%FT%TZ), commit $(git rev-parse HEAD 2>/dev/null || echo unknown), device $DEVICE"
step versions 25 bash -c '
    python3 -c "import sys, torch; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__,
\"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else \"\")"
    python3 -c "import triton; print(\"triton\", triton.__version__)" || echo "triton: not importable"
    nvcc --version | tail -n 2 || echo "nvcc: not on PATH"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
' | tee "$OUT/versions.txt"

if [ "$DEVICE" = cuda ]; then
    # in place (no pip: the machine may have no network); PROTOKERN_REQUIRE_EXT: a failed build
    # of the extension is an error, not the pure-Python fallback
    step build 140 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" PROTOKERN_REQUIRE_EXT=1 \
        python3 setup.py build_ext --inplace -q
fi
timeout 10 python3 -c "import protokern as pk; print('backends for $DEVICE tensors:', pk.available_backends('$DEVICE'))"

step smoke 90 python3 benchmarks/gpu_smoke.py --device "$DEVICE" --json "$OUT/smoke.json"

# the kernels' own test files first: a run cut at its limit has covered them
TESTS=(tests/backends/test_cuda.py tests/backends/test_triton.py tests)
if [ "$DEVICE" = cuda ]; then
    step "tests -m cuda" 125 python3 -m pytest -m cuda -p gpu_test_run -p no:cacheprovider \
        -q -rfE --tb=short --junitxml "$OUT/junit.xml" "${TESTS[@]}"
else  # what a GPU host would select, collected on a stand-in (gpu_host_collect.py)
    step "tests -m cuda (collected only)" 125 env -u TRITON_INTERPRET python3 -m pytest -m cuda -p gpu_host_collect \
        -p gpu_test_run -p no:cacheprovider -q --collect-only "${TESTS[@]}"
fi

step "bench bfloat16" 45 python3 -m protokern bench --device "$DEVICE" --shapes "$BENCH_SHAPES" \
    --dtypes bfloat16 "${BENCH_REPEATS[@]}" --json "$OUT/bench-bfloat16.json"
step "bench float32 with TF32" 45 python3 -m protokern bench --device "$DEVICE" \
    --shapes "$BENCH_SHAPES" --dtypes float32 --tf32 "${BENCH_REPEATS[@]}" \
    --json "$OUT/bench-tf32.json"
if [ "$DEVICE" = cuda ]; then
    PROFILE_DTYPES=bfloat16,tf32
else
    PROFILE_DTYPES=float32
fi
step profile 25 python3 benchmarks/gpu_profile.py --device "$DEVICE" --shapes "$SHAPES" \
    --dtypes "$PROFILE_DTYPES" --json "$OUT/profile.json"

echo "=== done at $(date -u +%H:%M:%S); outputs in $OUT:"
ls -l "$OUT"
exit "$failed"
