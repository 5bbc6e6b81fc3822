// What the forward CPU kernels share (min_distance_, topk_distance_ and
// nearest_prototypes_forward_kernel.cpp): GEMM tiles of packed rows against a block of
// prototypes and what the bounds need about each row (its squared norm, whether the expansion
// can be trusted there). Raw pointers; the GEMM is protokern's packed one or PyTorch's BLAS
// through ATen (RowsGemm below).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/cpu_utils.h"
#include "cpu/exact_distance.h"
#include "cpu/packed_gemm.h"
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

// The expansion's rounding bounds, as reference.expanded_distance's (g relative to the norms, tau
// absolute, for subnormal products), plus a few eps for the rearranged arithmetic of the kernels'
// passes (reciprocals, (1 +- g) factors). `input_rounding` is the relative rounding the GEMM may
// apply to its float32 inputs (TF32/bf16 settings).
struct ExpansionBounds {
  double g, tau;
};

template <typename acc_t>
inline ExpansionBounds expansion_bounds(int64_t size, Metric metric, double input_rounding) {
  const double eps = std::numeric_limits<acc_t>::epsilon();
  const double tiny = std::numeric_limits<acc_t>::min();
  const double g = metric == Metric::kCosine ? (2 * size + 12) * eps + 4 * input_rounding
                                             : (size + 12) * eps + 2 * input_rounding;
  return {g, 4 * (size + 1) * tiny};
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

// Per prototype, what the forward kernels over positions (min_distance, topk_distance) need for
// their bounds and exact recompute: squared norm, 1/norm, whether the expansion can be trusted
// there, and for cosine |p|^2 in double.
template <typename acc_t>
struct PrototypeNorms {
  std::vector<acc_t> squared, inverse;
  std::vector<uint8_t> finite;
  std::vector<double> squared_exact;
};

template <typename acc_t>
inline PrototypeNorms<acc_t> prototype_norms(const acc_t* prototypes, int64_t count, int64_t size,
                                             Metric metric) {
  PrototypeNorms<acc_t> norms{std::vector<acc_t>(count), std::vector<acc_t>(count),
                              std::vector<uint8_t>(count), std::vector<double>(count, 0.0)};
  // One pass over the bank: on the calling thread unless the bank is large (kMinParallelElements).
  parallel_chunks(0, count, parallel_grain(64, size), [&](int64_t begin, int64_t end) {
    squared_norms(prototypes + begin * size, end - begin, size, norms.squared.data() + begin);
    describe_rows(norms.squared.data() + begin, end - begin, norms.inverse.data() + begin,
                  norms.finite.data() + begin);
    if (metric == Metric::kCosine)
      for (int64_t m = begin; m < end; ++m)
        exact_dot(prototypes + m * size, prototypes + m * size, size, &norms.squared_exact[m]);
  });
  return norms;
}

// A task's rows as the left side of its GEMM tiles: load() them once (after pack_rows), then
// multiply() them with block after block of prototypes. float32 goes through the packed GEMM
// where this host prefers it (packed_gemm.h, which repacks the rows once per load), otherwise,
// and always for float64, through at::mm_out on borrowed memory, i.e. PyTorch's BLAS (why ATen
// in a kernel: see min_distance_kernels.h). Either runs on the calling thread only.
template <typename acc_t>
class RowsGemm {
 public:
  void load(const acc_t* rows, int64_t count, int64_t size) {
    rows_ = rows;
    count_ = count;
    size_ = size;
    if constexpr (std::is_same_v<acc_t, float>) {
      packed_ = use_packed_gemm();
      if (packed_) {
        panels_.resize(packed_panels_size(count, size));
        pack_row_panels(rows, count, size, panels_.data());
      }
    }
  }

  // tile (count x columns, row-major, rows `ld` apart: by default packed) = rows . prototypes
  // (columns x size, row-major)^T.
  void multiply(const acc_t* prototypes, int64_t columns, acc_t* tile, int64_t ld = 0) const {
    if (ld == 0) ld = columns;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (packed_) {
        packed_gemm(panels_.data(), count_, prototypes, columns, size_, tile, ld);
        return;
      }
    }
    const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor lhs = at::from_blob(const_cast<acc_t*>(rows_), {count_, size_}, options);
    at::Tensor rhs = at::from_blob(const_cast<acc_t*>(prototypes), {columns, size_}, options);
    at::Tensor out = at::from_blob(tile, {count_, columns}, {ld, 1}, options);
    at::mm_out(out, lhs, rhs.t());
  }

 private:
  const acc_t* rows_ = nullptr;
  int64_t count_ = 0, size_ = 0;
  bool packed_ = false;
  std::vector<float> panels_;
};

}  // namespace protokern::cpu
