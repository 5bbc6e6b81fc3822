#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with bare nvcc, warnings as errors, for each architecture given
# (default: 80 90), with the flags PyTorch's CUDAExtension adds and setup.py's include path csrc/
# (so a kernel that builds here builds in setup.py too). Needs no GPU and no CUDA PyTorch: the
# kernels include no torch header.
# Then each glue file (*_cuda.cpp) is compiled against the installed torch's headers and the
# CUDA toolkit's, and every protokern::cuda symbol it calls must be defined by the kernels'
# objects: a signature that drifts between a glue file and a kernel fails here, not on a GPU.
# Object files go to a temporary folder that is removed afterwards.
# With PROTOKERN_CUDA_REPORT=FILE, ptxas also reports every kernel's registers, spills and
# shared memory, the PTX is kept, and resource_report.py writes them as a Markdown table to FILE
# (with whether each kernel's PTX has cp.async, mma or wgmma instructions).
#   usage: csrc/cuda/compile_check.sh [ARCH ...]      e.g. csrc/cuda/compile_check.sh 90
set -euo pipefail
if [ -n "${PROTOKERN_CUDA_REPORT:-}" ]; then
    PROTOKERN_CUDA_REPORT=$(realpath -m "$PROTOKERN_CUDA_REPORT")
fi
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
reap() {  # reap PID NAME: wait for one nvcc; on failure print its log
    wait "$1" || { cat "$out/$2.log" >&2; echo "FAILED: nvcc $2" >&2; status=1; }
}
for arch in "${archs[@]}"; do
    for source in *.cu; do
        report=()
        if [ -n "${PROTOKERN_CUDA_REPORT:-}" ]; then
            keep="$out/keep/${source%.cu}.sm_${arch}"
            mkdir -p "$keep"
            report=(-Xptxas -v --keep --keep-dir "$keep")
        fi
        nvcc -std=c++20 -O3 -c -arch="sm_${arch}" -I.. \
            -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
            -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
            -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
            --expt-relaxed-constexpr "${report[@]}" \
            -o "$out/${source%.cu}.sm_${arch}.o" "$source" 2> "$out/${source%.cu}.sm_${arch}.log" &
        pids+=($!)
        names+=("${source%.cu}.sm_${arch}")
        if [ ${#pids[@]} -ge "$jobs" ]; then
            reap "${pids[0]}" "${names[0]}"
            pids=("${pids[@]:1}")
            names=("${names[@]:1}")
        fi
    done
done
for i in "${!pids[@]}"; do
    reap "${pids[$i]}" "${names[$i]}"
done
if [ "$status" -ne 0 ]; then
    exit "$status"
fi
printf -v targets 'sm_%s ' "${archs[@]}"
echo "csrc/cuda: every .cu compiles with nvcc for ${targets% } (warnings as errors)"
if [ -n "${PROTOKERN_CUDA_REPORT:-}" ]; then
    python3 resource_report.py "$out" > "$PROTOKERN_CUDA_REPORT"
    echo "csrc/cuda: kernel resources written to $PROTOKERN_CUDA_REPORT"
fi

torch_dir=$(python -c "import os, torch; print(os.path.dirname(torch.__file__))" 2>/dev/null) \
    || { echo "torch not importable: skipping the glue check of the *_cuda.cpp files"; exit 0; }
cuda_include=""
for candidate in "${CUDA_HOME:-}/include" /usr/local/cuda/include \
        "$(dirname "$(readlink -f "$(command -v nvcc)")")/../include"; do
    if [ -f "$candidate/cuda_runtime.h" ]; then
        cuda_include=$candidate
        break
    fi
done
if [ -z "$cuda_include" ]; then
    echo "FAILED: no cuda_runtime.h under \$CUDA_HOME/include or /usr/local/cuda/include" >&2
    exit 1
fi
# A CPU build of torch ships the c10/cuda headers but not the one CMake generates for CUDA builds.
mkdir -p "$out/stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
defined=$(nm -C --defined-only "$out"/*.sm_"${archs[0]}".o | grep -o 'protokern::cuda::.*' | sort -u)
glues=(*_cuda.cpp)
pids=()
for glue in "${glues[@]}"; do  # in parallel too, at most `jobs` at a time
    g++ -std=c++20 -c -DWITH_CUDA -I.. -isystem "$out/stub" -isystem "$torch_dir/include" \
        -isystem "$torch_dir/include/torch/csrc/api/include" -isystem "$cuda_include" \
        -Wall -Wextra -Werror -o "$out/${glue%.cpp}.glue.o" "$glue" \
        > "$out/${glue%.cpp}.glue.log" 2>&1 &
    pids+=($!)
    if [ ${#pids[@]} -ge "$jobs" ]; then
        wait "${pids[0]}" || true  # a failure shows in its log, checked below
        pids=("${pids[@]:1}")
    fi
done
for pid in "${pids[@]}"; do
    wait "$pid" || true
done
for glue in "${glues[@]}"; do
    if [ ! -s "$out/${glue%.cpp}.glue.o" ] || [ -s "$out/${glue%.cpp}.glue.log" ]; then
        cat "$out/${glue%.cpp}.glue.log" >&2
        echo "FAILED: g++ $glue against torch and CUDA headers" >&2
        exit 1
    fi
    needed=$(nm -C --undefined-only "$out/${glue%.cpp}.glue.o" | grep -o 'protokern::cuda::.*' \
        | sort -u)
    if [ -z "$needed" ]; then
        echo "FAILED: found no protokern::cuda call in $glue's object (a renamed namespace?)" >&2
        exit 1
    fi
    missing=$(comm -23 <(echo "$needed") <(echo "$defined"))
    if [ -n "$missing" ]; then
        echo "FAILED: $glue calls kernels no .cu file defines (signature drift?):" >&2
        echo "$missing" >&2
        exit 1
    fi
done
echo "csrc/cuda: the glue files ($(echo *_cuda.cpp)) compile against torch's headers and link" \
    "to the kernels by name"
