// What the forward CPU kernels share (min_distance_forward_kernel.cpp,
// nearest_prototypes_forward_kernel.cpp): GEMM tiles of packed rows against a block of
// prototypes and what the bounds need about each row (its squared norm, whether the expansion
// can be trusted there). Raw pointers; the GEMM is PyTorch's BLAS through ATen (why: see
// min_distance_kernels.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "metric.h"

namespace protokern::cpu {

inline constexpr int64_t kTargetRows = 384;      // rows per GEMM tile: several images when L is small
inline constexpr int64_t kPrototypeBlock = 256;  // columns per GEMM tile: the tile stays in L2

template <typename T>
inline T infinity() {
  return std::numeric_limits<T>::infinity();
}

// Above this a squared norm could overflow once added to another or doubled: such rows and
// prototypes skip the expansion and are always recomputed exactly.
template <typename acc_t>
inline acc_t huge_norm() {
  return std::numeric_limits<acc_t>::max() / 8;
}

// Sum of squares of each of `count` rows of length `size` (gemm_tiles.cpp, vectorised per ISA).
template <typename acc_t>
void squared_norms(const acc_t* rows, int64_t count, int64_t size, acc_t* out);

template <typename acc_t>
inline void describe_rows(const acc_t* squared, int64_t count, acc_t* inverse, uint8_t* finite) {
  for (int64_t r = 0; r < count; ++r) {
    finite[r] = squared[r] <= huge_norm<acc_t>();  // false for NaN and inf
    inverse[r] = static_cast<acc_t>(
        1.0 / std::max(std::sqrt(static_cast<double>(squared[r])), kNormFloor));
  }
}

// tile (row_count x columns, row-major) = rows (row_count x K) . prototypes (columns x K)^T.
// Through at::mm_out on borrowed memory, i.e. PyTorch's BLAS (why ATen in a kernel: see
// min_distance_kernels.h); inside at::parallel_for it runs on the calling thread only.
template <typename acc_t>
inline void gemm_rows_by_prototypes(acc_t* rows, int64_t row_count, const acc_t* prototypes,
                             int64_t columns, int64_t size, acc_t* tile) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor lhs = at::from_blob(rows, {row_count, size}, options);
  at::Tensor rhs = at::from_blob(const_cast<acc_t*>(prototypes), {columns, size}, options);
  at::Tensor out = at::from_blob(tile, {row_count, columns}, options);
  at::mm_out(out, lhs, rhs.t());
}

}  // namespace protokern::cpu
