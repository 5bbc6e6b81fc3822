// Device helpers shared by protokern's CUDA kernels (no PyTorch header; see
// min_distance_kernels.h). Conversions are explicit because PyTorch builds CUDA code with
// __CUDA_NO_HALF_CONVERSIONS__ and __CUDA_NO_BFLOAT16_CONVERSIONS__.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/min_distance_kernels.h"
#include "metric.h"

namespace protokern::cuda {

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

// The sums the exact distance of a (row, prototype) pair needs. For cosine, the row and the
// prototype are first scaled by powers of two (exact) that bring their largest entry near 1, so
// that |v|^2 cannot overflow (cosine is scale-free: x = 1e20 * randn must not give 1).
struct PairSums {
  float squared_difference;  // sum (x - p)^2, unscaled
  float dot;                 // sum (x / row_scale) (p / proto_scale)
  float row_squared;         // sum (x / row_scale)^2
  float proto_squared;       // sum (p / proto_scale)^2
  float row_scale;           // powers of two
  float proto_scale;
};

// A power of two near the largest magnitude `largest` (1 for 0, inf or NaN: nothing to scale,
// and NaN/inf entries must propagate unchanged).
__device__ __forceinline__ float power_of_two_scale(float largest) {
  if (!(largest > 0.f) || !isfinite(largest)) {
    return 1.f;
  }
  return ldexpf(1.f, max(-126, min(127, ilogbf(largest))));
}

// |v| / max(|v|, eps) / scale, the factor that turns a scaled dot product into a cosine, for
// |v| = scale * sqrt(scaled_squared) (inf when it overflows: then |v| >= eps).
__device__ __forceinline__ float cosine_factor(float scaled_squared, float scale) {
  const float scaled_norm = sqrtf(scaled_squared);
  return scale * scaled_norm >= kNormFloorFloat ? 1.f / scaled_norm : scale / kNormFloorFloat;
}

// The unscaled dot product and norms of a pair (they overflow where float32 does).
__device__ __forceinline__ float true_dot(const PairSums& s) {
  return s.dot * s.row_scale * s.proto_scale;
}
__device__ __forceinline__ float true_row_norm(const PairSums& s) {
  return s.row_scale * sqrtf(s.row_squared);
}
__device__ __forceinline__ float true_proto_norm(const PairSums& s) {
  return s.proto_scale * sqrtf(s.proto_squared);
}

__device__ __forceinline__ float distance_from_sums(Metric metric, const PairSums& s) {
  if (metric == Metric::kSqEuclidean) {
    return clamp_sqeuclidean(s.squared_difference);
  }
  if (true_row_norm(s) >= kNormFloorFloat && true_proto_norm(s) >= kNormFloorFloat) {
    // Both norms above the floor (the usual case): dot / sqrt(|x|^2 |p|^2) in the scaled units
    // (no overflow: the largest scaled entries are below 2). At a copy (x == p: the same scale
    // and one sum three times) that is exactly 1, since sqrt(fl(v * v)) == v, so a pushed patch
    // is at distance 0; dot / |x| / |p| was an ulp off in about a quarter of random vectors.
    return clamp_cosine(1.f - __fdiv_rn(s.dot, __fsqrt_rn(s.row_squared * s.proto_squared)));
  }
  const float cosine = s.dot * cosine_factor(s.row_squared, s.row_scale) *
                       cosine_factor(s.proto_squared, s.proto_scale);
  return clamp_cosine(1.f - cosine);
}

template <typename T>
__device__ __forceinline__ void accumulate_pair(PairSums& s, T x, T p, float row_inverse,
                                                float proto_inverse) {
  const float xv = to_float(x);
  const float pv = to_float(p);
  const float diff = xv - pv;
  const float xs = xv * row_inverse;
  const float ps = pv * proto_inverse;
  s.squared_difference = fmaf(diff, diff, s.squared_difference);
  s.dot = fmaf(xs, ps, s.dot);
  s.row_squared = fmaf(xs, xs, s.row_squared);
  s.proto_squared = fmaf(ps, ps, s.proto_squared);
}

// The sums of one pair by one warp: lane j takes k = j, j + 32, ..., then warp_sum. Every lane
// returns the same sums.
template <typename T>
__device__ __forceinline__ PairSums warp_pair_sums(const T* row, const T* proto, int64_t dim,
                                                   int lane) {
  float row_largest = 0.f;
  float proto_largest = 0.f;
  for (int64_t k = lane; k < dim; k += kWarpSize) {
    row_largest = fmaxf(row_largest, fabsf(to_float(row[k])));
    proto_largest = fmaxf(proto_largest, fabsf(to_float(proto[k])));
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    row_largest = fmaxf(row_largest, __shfl_xor_sync(kFullMask, row_largest, offset));
    proto_largest = fmaxf(proto_largest, __shfl_xor_sync(kFullMask, proto_largest, offset));
  }
  PairSums s{0.f, 0.f, 0.f, 0.f, power_of_two_scale(row_largest),
             power_of_two_scale(proto_largest)};
  const float row_inverse = 1.f / s.row_scale;  // exact: a power of two
  const float proto_inverse = 1.f / s.proto_scale;
  for (int64_t k = lane; k < dim; k += kWarpSize) {
    accumulate_pair(s, row[k], proto[k], row_inverse, proto_inverse);
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
  float row_largest = 0.f;
  float proto_largest = 0.f;
  for (int64_t k = 0; k < dim; ++k) {
    row_largest = fmaxf(row_largest, fabsf(to_float(row[k])));
    proto_largest = fmaxf(proto_largest, fabsf(to_float(proto[k])));
  }
  PairSums s{0.f, 0.f, 0.f, 0.f, power_of_two_scale(row_largest),
             power_of_two_scale(proto_largest)};
  const float row_inverse = 1.f / s.row_scale;
  const float proto_inverse = 1.f / s.proto_scale;
  for (int64_t k = 0; k < dim; ++k) {
    accumulate_pair(s, row[k], proto[k], row_inverse, proto_inverse);
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

// The distance of a packed candidate (NaN for the NaN key).
__device__ __forceinline__ float unpack_distance(unsigned long long candidate) {
  const unsigned key = static_cast<unsigned>(candidate >> 32);
  return key == 0u ? __uint_as_float(0x7fc00000u) : __uint_as_float(key - 1u);
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

}  // namespace protokern::cuda
