// Device helpers shared by protokern's CUDA kernels (no PyTorch header; see
// min_distance_kernels.h). Conversions are explicit because PyTorch builds CUDA code with
// __CUDA_NO_HALF_CONVERSIONS__ and __CUDA_NO_BFLOAT16_CONVERSIONS__.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "min_distance_kernels.h"

namespace protokern_cuda {

// Lower bound of a norm in the cosine metric: max(|v|, kNormEps).
constexpr float kNormEps = 1e-8f;
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ const T* row_pointer(const RowsView& rows, int64_t image, int64_t row) {
  return static_cast<const T*>(rows.data) + image * rows.image_stride + row * rows.row_stride;
}

// max(v, lo) that keeps NaN (fmaxf would drop it).
__device__ __forceinline__ float clamp_min_keep_nan(float v, float lo) { return v < lo ? lo : v; }

// Distances are clamped to their true range, keeping NaN and turning -0 into +0, so that the
// bit pattern of every non-NaN distance orders like its value (see pack_candidate).
__device__ __forceinline__ float clamp_sqeuclidean(float d) {
  return d < 0.f || d == 0.f ? 0.f : d;
}
__device__ __forceinline__ float clamp_cosine(float d) {
  return d > 2.f ? 2.f : clamp_sqeuclidean(d);
}

// Sum over the 32 lanes of a warp, the same value in every lane. The butterfly order is fixed
// and a + b == b + a exactly, so the result depends on the inputs only (deterministic).
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// The sums the exact distance of a (row, prototype) pair needs.
struct PairSums {
  float squared_difference;
  float dot;
  float row_squared;
  float proto_squared;
};

__device__ __forceinline__ float distance_from_sums(Metric metric, const PairSums& s) {
  if (metric == Metric::kSqEuclidean) {
    return clamp_sqeuclidean(s.squared_difference);
  }
  const float row_norm = clamp_min_keep_nan(sqrtf(s.row_squared), kNormEps);
  const float proto_norm = clamp_min_keep_nan(sqrtf(s.proto_squared), kNormEps);
  return clamp_cosine(1.f - s.dot / (row_norm * proto_norm));
}

// The sums of one pair by one warp: lane j takes k = j, j + 32, ..., then warp_sum. Every lane
// returns the same sums.
template <typename T>
__device__ __forceinline__ PairSums warp_pair_sums(const T* row, const T* proto, int64_t dim,
                                                   int lane) {
  PairSums s{0.f, 0.f, 0.f, 0.f};
  for (int64_t k = lane; k < dim; k += kWarpSize) {
    const float xv = to_float(row[k]);
    const float pv = to_float(proto[k]);
    const float diff = xv - pv;
    s.squared_difference = fmaf(diff, diff, s.squared_difference);
    s.dot = fmaf(xv, pv, s.dot);
    s.row_squared = fmaf(xv, xv, s.row_squared);
    s.proto_squared = fmaf(pv, pv, s.proto_squared);
  }
  s.squared_difference = warp_sum(s.squared_difference);
  s.dot = warp_sum(s.dot);
  s.row_squared = warp_sum(s.row_squared);
  s.proto_squared = warp_sum(s.proto_squared);
  return s;
}

// The same distance computed directly by one thread (for pairs the GEMM expansion cannot
// handle: an inf or NaN entry, or an overflow).
template <typename T>
__device__ float direct_distance(Metric metric, const T* row, const T* proto, int64_t dim) {
  PairSums s{0.f, 0.f, 0.f, 0.f};
  for (int64_t k = 0; k < dim; ++k) {
    const float xv = to_float(row[k]);
    const float pv = to_float(proto[k]);
    const float diff = xv - pv;
    s.squared_difference = fmaf(diff, diff, s.squared_difference);
    s.dot = fmaf(xv, pv, s.dot);
    s.row_squared = fmaf(xv, xv, s.row_squared);
    s.proto_squared = fmaf(pv, pv, s.proto_squared);
  }
  return distance_from_sums(metric, s);
}

// A candidate (distance, position) as one integer whose unsigned order is: NaN first, then by
// distance, then by position. The minimum over candidates (atomicMin, order-independent, so
// deterministic) is then the first NaN position, else the lowest position of the smallest
// distance. `distance` must be NaN or >= +0 (see clamp_sqeuclidean): non-negative floats order
// like their bit patterns. Positions are < 2^32 (the glue checks).
__device__ __forceinline__ unsigned long long pack_candidate(float distance, int64_t position) {
  const unsigned key = isnan(distance) ? 0u : __float_as_uint(distance) + 1u;
  return (static_cast<unsigned long long>(key) << 32) |
         static_cast<unsigned long long>(static_cast<uint32_t>(position));
}

__device__ __forceinline__ int64_t unpack_position(unsigned long long candidate) {
  return static_cast<int64_t>(candidate & 0xffffffffull);
}

// The number of blocks of a 1-d grid, or 0 when it does not fit a grid (glue: an error).
inline int64_t blocks_for(int64_t work_items, int64_t items_per_block) {
  const int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
  return blocks <= 0x7fffffffLL ? blocks : 0;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with the storage type T of `kind`.
template <typename Fn>
cudaError_t dispatch_scalar_kind(ScalarKind kind, Fn&& fn) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return fn(TypeTag<float>{});
    case ScalarKind::kFloat16:
      return fn(TypeTag<__half>{});
    case ScalarKind::kBFloat16:
      return fn(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace protokern_cuda
