#!/usr/bin/env bash
# On a GPU machine, in one go (under 10 minutes): build the extension, run the tests marked
# `cuda`, then benchmark every contender on the GPU named shapes, float32 with TF32 allowed and
# bfloat16, forward and forward+backward, plus the M sweep. Writes into OUT_DIR:
#   run_gpu.log                       everything printed (environment, build, tests, tables)
#   bench-cuda-float32-tf32.json      results + environment (rewritten after every case, so a
#   bench-cuda-bfloat16.json          step cut short by its time limit still leaves its data)
#   scaling-cuda-float32-tf32.png     time and memory vs M
# Usage: benchmarks/run_gpu.sh OUT_DIR
# Each step has a time limit so the script ends before the lent GPU's 600 s per command even if
# every step hangs; a failed step is reported and the next runs. Exit status: 1 if any failed.
# Worst case: steps 160 + 80 + 145 + 75 = 460 s, + 10 s of --kill-after for each of the 4 = 500;
# + 3 probes (nvidia-smi, two python -c) at 10 s + 2 s kill-after = 36 -> 536 s in the script;
# + ~20 s for the tool to start it = 556 s < 560 s, leaving 44 s spare under 600.
# For a smoke test without a GPU: RUN_GPU_DEVICE=cpu RUN_GPU_SHAPES=tiny RUN_GPU_SKIP_BUILD=1.
set -uo pipefail

OUT_DIR=${1:?usage: benchmarks/run_gpu.sh OUT_DIR}
DEVICE=${RUN_GPU_DEVICE:-cuda}
SHAPES=${RUN_GPU_SHAPES:-cub,imagenet,large_bank,cil_vectors}
SCALING_SHAPE=${RUN_GPU_SCALING_SHAPE:-large_bank}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.."
exec > >(tee -a "$OUT_DIR/run_gpu.log") 2>&1

failed=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, report, go on
    local name=$1 limit=$2
    shift 2
    echo "=== $(date -u +%H:%M:%S) $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local status=$?
    echo "=== $name: exit $status after $((SECONDS - start))s"
    [ "$status" -eq 0 ] || failed=1
}
probe() {  # probe COMMAND...: informational, bounded (10 s + 2 s kill-after), never fails
    timeout --kill-after=2 10 "$@" || echo "=== probe exit $?: $*"
}

echo "=== run_gpu.sh at $(date -u +%FT%TZ), commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
probe nvidia-smi
probe python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available())"

if [ -z "${RUN_GPU_SKIP_BUILD:-}" ]; then
    # --no-deps: the machine may have no network; torch and friends are already installed
    step build 160 env PROTOKERN_REQUIRE_EXT=1 \
        python -m pip install --no-build-isolation --no-deps -e .
fi
probe python -c "import protokern as pk; print('backends on $DEVICE:', pk.available_backends('$DEVICE'))"
if [ "$DEVICE" = cuda ]; then
    step "tests -m cuda" 80 python -m pytest -m cuda -q -x tests
fi

step "bench float32 (TF32 allowed)" 145 protokern bench --device "$DEVICE" \
    --shapes "$SHAPES" --dtypes float32 --tf32 --repeats 10 --warmup 3 \
    --json "$OUT_DIR/bench-$DEVICE-float32-tf32.json" \
    --plot "$OUT_DIR/scaling-$DEVICE-float32-tf32.png" --scaling-shape "$SCALING_SHAPE" \
    --scaling-m 1000,2000,5000,10000,20000,50000,100000 --scaling-repeats 5
# the reference backend (plain PyTorch, the test oracle) is timed in float32 only
step "bench bfloat16" 75 protokern bench --device "$DEVICE" --shapes "$SHAPES" \
    --dtypes bfloat16 --exclude protokern:reference --repeats 10 --warmup 3 \
    --json "$OUT_DIR/bench-$DEVICE-bfloat16.json"

echo "=== done at $(date -u +%H:%M:%S); outputs in $OUT_DIR:"
ls -l "$OUT_DIR"
exit "$failed"
