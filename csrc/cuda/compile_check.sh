#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with bare nvcc, warnings as errors, for each architecture given
# (default: 80 90), with the flags PyTorch's CUDAExtension adds (so a kernel that builds here
# builds in setup.py too). Needs no GPU and no CUDA PyTorch: the kernels include no torch header.
# Object files go to a temporary folder that is removed afterwards.
#   usage: csrc/cuda/compile_check.sh [ARCH ...]      e.g. csrc/cuda/compile_check.sh 90
set -euo pipefail
cd "$(dirname "$0")"

archs=("$@")
if [ ${#archs[@]} -eq 0 ]; then
    archs=(80 90)
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# The files compile in parallel (nvcc is slow), at most `jobs` at a time.
jobs=${PROTOKERN_NVCC_JOBS:-$(nproc)}
pids=()
names=()
status=0
for arch in "${archs[@]}"; do
    for source in *.cu; do
        nvcc -std=c++20 -O3 -c -arch="sm_${arch}" \
            -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
            -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
            -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
            --expt-relaxed-constexpr \
            -o "$out/${source%.cu}.sm_${arch}.o" "$source" &
        pids+=($!)
        names+=("$source for sm_${arch}")
        if [ ${#pids[@]} -ge "$jobs" ]; then
            wait "${pids[0]}" || { echo "FAILED: nvcc ${names[0]}" >&2; status=1; }
            pids=("${pids[@]:1}")
            names=("${names[@]:1}")
        fi
    done
done
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "FAILED: nvcc ${names[$i]}" >&2; status=1; }
done
if [ "$status" -eq 0 ]; then
    printf -v targets 'sm_%s ' "${archs[@]}"
    echo "csrc/cuda: every .cu compiles with nvcc for ${targets% } (warnings as errors)"
fi
exit "$status"
