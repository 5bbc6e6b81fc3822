// The CPU forward of min_distance with one position per image (tokens L = 1, or a window as
// large as the map): the only position is the answer, so every (image, prototype) pair's distance
// is returned (the indices are all 0: the caller's zeros_untouched, huge_pages.h), and the op is
// one GEMM of the rows A (B, K) with the prototypes P (M, K) plus a pass over its (B, M) result.
//
// The GEMM writes its inner products straight into the values output, block by block (a task is
// a block of rows x a block of prototypes: no tile, no copy), and the task then turns its block
// into distances in place while the block is still in cache: a value is kept where the
// expansion's rounding bound is at most twice the direct float32 sum's own (g times the
// distance), i.e. it cancelled at most one bit, the certificate of the Triton kernel
// (protokern/backends/triton/min_distance.py). The rest (a prototype on or near its vector,
// untrusted norms, NaN, inf) is recomputed directly (exact_distance.h), as min_distance_forward
// recomputes a chosen position. Cosine's bound is absolute (g), so the same rule keeps
// distances of at least about 1/2; dot's (g |x||p| + tau) keeps products within about 1/2 of
// |x||p| (cos >= 1/2 in size).
//
// Why blocks this large, and why not one BLAS call for the whole product: on the Intel Xeon
// (MKL, cil_vectors: 1024 x 768 x 10000) one thread ran the product at 169 GFLOP/s in
// min_distance_forward's 384 x 256 tiles and at 204 in 1024 x 1024 blocks, and two threads ran
// it as one call at 391, i.e. 195 each; the whole forward took 50-55 ms in 1024 x 1024 blocks,
// 55-58 in 1024 x 512, 53-55 in 512 x 512 or 512 x 1024, 56 in 384 x 256 (benchmarks/NOTES.md,
// "The one-position forward as one product"). Blocks keep the task pool's claim-as-you-go
// scheduling, which is what holds up when another process competes for the cores
// (task_pool.h), at a per-thread rate no lower than the one large call's.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/cpu_utils.h"
#include "cpu/exact_distance.h"
#include "cpu/gemm_tiles.h"
#include "cpu/min_distance_kernels.h"
#include "metric.h"

namespace protokern::cpu {
namespace {

// Rows x prototypes per task with PyTorch's BLAS (measured: see the top of the file).
inline constexpr int64_t kBlasBlockRows = 1024;
inline constexpr int64_t kBlasBlockColumns = 1024;

// Whether x's images already are the rows: (channel, window row, window column) adjacent.
inline bool images_are_rows(const FeatureMap& map) {
  const bool w_ok = map.width == 1 || map.stride_w == 1;
  const bool h_ok = map.height == 1 || map.stride_h == map.width;
  const bool c_ok = map.channels == 1 || map.stride_c == map.height * map.width;
  return w_ok && h_ok && c_ok;
}

// values (count x columns, rows `ld` apart) hold the inner products of `rows` (count x size)
// with `prototypes` (columns x size) on entry and their distances on exit.
template <typename acc_t>
PK_VECTOR_CLONES void certify_distances(acc_t* values, int64_t ld, int64_t count, int64_t columns,
                                        const acc_t* rows, int64_t size,
                                        const acc_t* row_squared, const acc_t* row_inverse,
                                        const uint8_t* row_finite, const acc_t* prototypes,
                                        const PrototypeNorms<acc_t>& norms, int64_t c0,
                                        Metric metric, acc_t g, acc_t tau) {
  const bool squared_metric = metric == Metric::kSqEuclidean;
  const bool dot_metric = metric == Metric::kDot;
  const acc_t* col_squared = norms.squared.data() + c0;
  const acc_t* col_inverse = norms.inverse.data() + c0;
  const uint8_t* col_finite = norms.finite.data() + c0;
  const double* col_squared_exact = norms.squared_exact.data() + c0;
  for (int64_t r = 0; r < count; ++r) {
    acc_t* out = values + r * ld;
    const acc_t squared = row_squared[r], inverse = row_inverse[r];
    const acc_t norm = std::sqrt(squared);
    // A branch-free pass over the row (vectorised); a NaN value marks a pair to recompute.
    for (int64_t c = 0; c < columns; ++c) {
      const acc_t dot = out[c];
      acc_t value, bound;
      if (squared_metric) {
        const acc_t magnitude = squared + col_squared[c];
        value = magnitude - 2 * dot;
        bound = g * magnitude + tau;
      } else if (dot_metric) {
        value = -dot;
        bound = g * (norm * std::sqrt(col_squared[c])) + tau;
      } else {
        value = 1 - dot * (inverse * col_inverse[c]);
        bound = g;
      }
      // |value|: dot's may be negative (the others are >= 0 up to their bound, where this fails)
      const bool kept = bound <= 2 * g * (std::abs(value) - bound);  // false for NaN
      out[c] = kept ? value : std::numeric_limits<acc_t>::quiet_NaN();
    }
    const bool row_trusted = row_finite[r] != 0;
    for (int64_t c = 0; c < columns; ++c)
      if (!(row_trusted && col_finite[c]) || std::isnan(out[c]))
        out[c] = static_cast<acc_t>(exact_distance(rows + r * size, prototypes + c * size, size,
                                                   metric, col_squared_exact[c],
                                                   row_trusted && col_finite[c]));
  }
}

}  // namespace

template <typename in_t, typename acc_t>
void single_position_forward(const in_t* x, const FeatureMap& map, const acc_t* prototypes,
                             int64_t num, Metric metric, double input_rounding, acc_t* values) {
  const int64_t batch = map.batch, size = map.row_size();
  if (batch == 0 || num == 0) return;
  const PrototypeNorms<acc_t> norms = prototype_norms(prototypes, num, size, metric);
  const ExpansionBounds bounds = expansion_bounds<acc_t>(size, metric, input_rounding);
  const acc_t g = static_cast<acc_t>(bounds.g), tau = static_cast<acc_t>(bounds.tau);

  // The rows: x itself where its images already are rows of the working type, else a packed copy
  // (B x K: as large as x).
  std::vector<acc_t> packed;
  const acc_t* rows = nullptr;
  if constexpr (std::is_same_v<in_t, acc_t>) {
    if (images_are_rows(map) && (map.stride_b == size || batch == 1)) rows = x;
  }
  if (rows == nullptr) {
    packed.resize(batch * size);
    parallel_chunks(0, batch, parallel_grain(16, size), [&](int64_t begin, int64_t end) {
      pack_rows(x, map, begin, end - begin, packed.data() + begin * size);
    });
    rows = packed.data();
  }
  std::vector<acc_t> row_squared(batch), row_inverse(batch);
  std::vector<uint8_t> row_finite(batch);
  parallel_chunks(0, batch, parallel_grain(64, size), [&](int64_t begin, int64_t end) {
    squared_norms(rows + begin * size, end - begin, size, row_squared.data() + begin);
    describe_rows(row_squared.data() + begin, end - begin, row_inverse.data() + begin,
                  row_finite.data() + begin);
  });

  // The packed GEMM keeps min_distance_forward's tiles (its panels of 384 rows stay in L2).
  const bool packed_gemm = std::is_same_v<acc_t, float> && use_packed_gemm();
  const int64_t block_rows = std::min(batch, packed_gemm ? kTargetRows : kBlasBlockRows);
  const int64_t block_columns = packed_gemm ? kPrototypeBlock : kBlasBlockColumns;
  const int64_t row_blocks = (batch + block_rows - 1) / block_rows;
  const int64_t column_blocks = (num + block_columns - 1) / block_columns;
  parallel_tasks(row_blocks * column_blocks, [&](auto&& take) {
    RowsGemm<acc_t> gemm;
    int64_t loaded = -1;  // the row block the GEMM holds: tasks run row block by row block
    for (int64_t task; take(task);) {
      const int64_t row_block = task / column_blocks;
      const int64_t r0 = row_block * block_rows, count = std::min(block_rows, batch - r0);
      const int64_t c0 = (task % column_blocks) * block_columns;
      const int64_t columns = std::min(block_columns, num - c0);
      if (row_block != loaded) gemm.load(rows + r0 * size, count, size), loaded = row_block;
      acc_t* out = values + r0 * num + c0;
      gemm.multiply(prototypes + c0 * size, columns, out, num);
      certify_distances(out, num, count, columns, rows + r0 * size, size,
                        row_squared.data() + r0, row_inverse.data() + r0,
                        row_finite.data() + r0, prototypes + c0 * size, norms, c0, metric, g,
                        tau);
    }
  });
}

#define PK_INSTANTIATE(in_t, acc_t)                                                           \
  template void single_position_forward<in_t, acc_t>(const in_t*, const FeatureMap&,          \
                                                     const acc_t*, int64_t, Metric, double,   \
                                                     acc_t*);

PK_INSTANTIATE(float, float)
PK_INSTANTIATE(double, double)
PK_INSTANTIATE(c10::Half, float)
PK_INSTANTIATE(c10::BFloat16, float)

}  // namespace protokern::cpu
