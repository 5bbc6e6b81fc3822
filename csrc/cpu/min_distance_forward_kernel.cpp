// The CPU forward kernel of min_distance: per task, a block of images x a group of prototypes.
//
// Per task, the windows of a few images are packed as rows (rows x K, several images per block so
// that small maps such as 7x7 still give BLAS a tall matrix), then for each block of prototypes
// one GEMM gives the inner products of a (rows x block) tile, and two passes over the tile reduce
// it: pass 1 finds, per prototype and image, the smallest upper bound of the expanded distance
// |x|^2 - 2 x.p + |p|^2 (resp. the cosine expansion) over positions; pass 2 shortlists every
// position whose lower bound is below it. The shortlisted positions (usually one) are recomputed
// directly (exact_distance.h), in position order, and the first exact minimum wins. So the result
// does not depend on how the GEMM rounds: ties go to the lowest position and tiny distances next
// to large norms survive, as in protokern/backends/reference.py, whose bounds these are.
// Positions or prototypes with a non-finite or huge squared norm (NaN, inf, overflow) are always
// shortlisted, which gives NaN propagation and true values for inf inputs.
//
// Only a tile of distances ever exists, and only the indices are needed by the backward. One
// position per image, where there is nothing to reduce, is single_position_forward.cpp's
// (min_distance_cpu.cpp calls it).
#include "cpu/min_distance_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "cpu/cpu_utils.h"
#include "cpu/exact_distance.h"
#include "cpu/gemm_tiles.h"

namespace protokern::cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Tile reduction

// What the reduction of one image's (positions x block) tile needs about its rows and columns.
template <typename acc_t>
struct TileSide {
  const acc_t* squared;   // |v|^2
  const acc_t* inverse;   // cosine: 1 / max(|v|, floor)
  const uint8_t* finite;  // 0: the expansion cannot be trusted here, always shortlist
};

// The running result of one column: the first exact minimum over the shortlisted positions,
// or the first NaN (as torch.min).
struct Best {
  double value;
  int64_t index;

  void offer(double candidate, int64_t position) {
    if (std::isnan(value)) return;
    if (index < 0 || std::isnan(candidate) || candidate < value) {
      value = candidate;
      index = position;
    }
  }
};

// Shortlisted (position, column) pairs of one image awaiting their exact distance.
struct Shortlist {
  static constexpr int64_t kCapacity = 4096;
  int32_t row[kCapacity], column[kCapacity];
  double distance[kCapacity];
};

// Everything one task needs, allocated once per task.
template <typename acc_t>
struct Workspace {
  std::vector<acc_t> rows, tile, squared, inverse;
  std::vector<uint8_t> finite;
  std::vector<Best> best;
  std::unique_ptr<Shortlist> shortlist = std::make_unique<Shortlist>();

  // 64 bytes of padding (two of the reduction's 256-bit vectors): its last vector of a row may
  // read past the row's end.
  static constexpr int64_t kPadding = 64 / sizeof(acc_t);

  Workspace(int64_t row_count, int64_t size, int64_t block)
      : rows(row_count * size), tile(row_count * block + kPadding), squared(row_count),
        inverse(row_count), finite(row_count), best(block) {}
};

// One image against one block of prototypes: `tile` holds the inner products C (positions x
// columns, row stride = columns), `rows` the image's packed windows. Leaves in best[c] the first
// exact minimum over the positions the expansion cannot rule out.
//
// Every position's expanded distance is within a bound of the truth (the reference's bounds:
// sqeuclidean |x|^2 + |p|^2 - 2C within g (|x|^2 + |p|^2) + tau, cosine 1 - C / (|x||p|) within
// g, dot -C within g |x||p| + tau), so a position is shortlisted when its lower bound is at most
// the smallest upper bound. In "score" units that are cheap per element:
//   sqeuclidean: score = (1-g)|x|^2 - 2C, shortlisted iff score <= min_r((1+g)|x|^2 - 2C)
//                + 2g|p|^2 + 2tau;
//   cosine:      score = -C / max(|x|, floor), shortlisted iff score <= min_r(score)
//                + 2g max(|p|, floor);
//   dot:         score = -C, shortlisted iff score <= min_r(score) + 2(g X|p| + tau), X the
//                image's largest |x| (so every position's bound g|x||p| + tau is below it).
// One pass over the tile keeps, per column and in registers, the smallest score, its first
// position and the second smallest score: when the second smallest is above the threshold, the
// first position is the only candidate (the usual case). Otherwise (ties, near-ties, untrusted
// rows or columns) the column is scanned again for all its candidates.
template <typename acc_t>
PK_VECTOR_CLONES void reduce_image(const acc_t* tile, int64_t columns, int64_t positions,
                                   const acc_t* rows, int64_t size, TileSide<acc_t> row_side,
                                   TileSide<acc_t> col_side, const acc_t* prototypes,
                                   const double* proto_squared_exact, Metric metric, acc_t g,
                                   acc_t tau, Best* best, Shortlist& shortlist) {
  const bool squared_metric = metric == Metric::kSqEuclidean;
  const bool dot_metric = metric == Metric::kDot;
  bool all_rows_trusted = true;
  acc_t largest_squared = 0;  // over the trusted rows: dot's bound
  for (int64_t r = 0; r < positions; ++r) {
    all_rows_trusted &= row_side.finite[r] != 0;
    if (row_side.finite[r]) largest_squared = std::max(largest_squared, row_side.squared[r]);
  }
  const acc_t largest_norm = std::sqrt(largest_squared);

  // Candidates are collected, then recomputed in a loop without data-dependent branches (so the
  // CPU overlaps their latencies), then offered in collection order: position order per column.
  // The lambdas are force-inlined: one left out of line is compiled for baseline x86-64 only.
  int64_t count = 0;
  auto flush = [&]() PK_LAMBDA_INLINE {
    for (int64_t i = 0; i < count; ++i) {
      const int64_t r = shortlist.row[i], c = shortlist.column[i];
      shortlist.distance[i] =
          exact_distance(rows + r * size, prototypes + c * size, size, metric,
                         proto_squared_exact[c], row_side.finite[r] && col_side.finite[c]);
    }
    for (int64_t i = 0; i < count; ++i)
      best[shortlist.column[i]].offer(shortlist.distance[i], shortlist.row[i]);
    count = 0;
  };
  auto push = [&](int64_t r, int64_t c) PK_LAMBDA_INLINE {
    if (count == Shortlist::kCapacity) flush();
    shortlist.row[count] = static_cast<int32_t>(r);
    shortlist.column[count] = static_cast<int32_t>(c);
    ++count;
  };
  auto score = [&](int64_t r, int64_t c) PK_LAMBDA_INLINE -> acc_t {
    const acc_t dot = tile[r * columns + c];
    return squared_metric ? (1 - g) * row_side.squared[r] - 2 * dot
           : dot_metric   ? -dot
                          : -dot * row_side.inverse[r];
  };

  // Two 256-bit vectors of columns at a time, their running minima kept in registers (GCC vector
  // extensions: lowered to AVX-512, AVX2 or SSE registers by each clone). Two, not one: each
  // vector's minima form a compare-and-blend chain from one position to the next, so one vector
  // alone waits on that latency (perf at cub on AVX-512: vblendvps the hottest instruction);
  // two independent chains overlap. Not more: AVX2 has 16 vector registers.
  using Index = typename VectorOf<acc_t>::Index;
  using Vec = typename VectorOf<acc_t>::Values;
  using IndexVec = typename VectorOf<acc_t>::Indices;
  constexpr int64_t kLanes = sizeof(Vec) / sizeof(acc_t);  // columns per vector
  constexpr int kGroup = 2;
  constexpr int64_t kSpan = kGroup * kLanes;  // columns per pass: the tile's padding covers it

  for (int64_t c = 0; c < columns; ++c) best[c] = Best{0.0, -1};
  for (int64_t c0 = 0; c0 < columns; c0 += kSpan) {
    Vec first[kGroup], second[kGroup], upper[kGroup];
    IndexVec first_at[kGroup];
    for (int v = 0; v < kGroup; ++v) {
      first[v] = second[v] = upper[v] = Vec{} + infinity<acc_t>();
      first_at[v] = IndexVec{} - 1;
    }
    for (int64_t r = 0; r < positions; ++r) {
      if (!row_side.finite[r]) continue;
      // Every metric in one shape: score = base - scale * C, upper = score + spread.
      const acc_t base = squared_metric ? (1 - g) * row_side.squared[r] : acc_t(0);
      const acc_t scale = squared_metric ? acc_t(2) : dot_metric ? acc_t(1) : row_side.inverse[r];
      const acc_t spread = squared_metric ? 2 * g * row_side.squared[r] : acc_t(0);
      const IndexVec position = IndexVec{} + static_cast<Index>(r);
#pragma GCC unroll 2
      for (int v = 0; v < kGroup; ++v) {
        Vec dots;
        std::memcpy(&dots, tile + r * columns + c0 + v * kLanes, sizeof dots);
        const Vec score_now = base - scale * dots;
        const Vec upper_now = score_now + spread;
        upper[v] = upper_now < upper[v] ? upper_now : upper[v];
        const IndexVec better = score_now < first[v];
        const Vec displaced = better ? first[v] : score_now;  // max(first, score)
        second[v] = displaced < second[v] ? displaced : second[v];
        first_at[v] = better ? position : first_at[v];
        first[v] = better ? score_now : first[v];
      }
    }
    const int64_t chunk_columns = std::min(kSpan, columns - c0);
    for (int64_t j = 0; j < chunk_columns; ++j) {
      const int64_t c = c0 + j, v = j / kLanes, lane = j % kLanes;
      const acc_t threshold =
          squared_metric ? upper[v][lane] + 2 * g * col_side.squared[c] + 2 * tau
          : dot_metric   ? first[v][lane] +
                             2 * (g * largest_norm * std::sqrt(col_side.squared[c]) + tau)
                         : first[v][lane] + 2 * g * (acc_t(1) / col_side.inverse[c]);
      if (all_rows_trusted && col_side.finite[c] && first_at[v][lane] >= 0 &&
          second[v][lane] > threshold) {
        push(first_at[v][lane], c);
        continue;
      }
      for (int64_t r = 0; r < positions; ++r)
        if (!row_side.finite[r] || !col_side.finite[c] || score(r, c) <= threshold) push(r, c);
    }
  }
  flush();
  // The bounds guarantee a shortlisted position; if rounding ever defeated them, recompute
  // every position rather than return nothing.
  for (int64_t c = 0; c < columns; ++c)
    if (best[c].index < 0)
      for (int64_t r = 0; r < positions; ++r)
        best[c].offer(exact_distance(rows + r * size, prototypes + c * size, size, metric,
                                     proto_squared_exact[c], false),
                      r);
}

}  // namespace

template <typename in_t, typename acc_t>
void min_distance_forward(const in_t* x, const FeatureMap& map, const acc_t* prototypes,
                          int64_t num_prototypes, Metric metric, double input_rounding,
                          acc_t* values, int64_t* indices) {
  const int64_t batch = map.batch, positions = map.positions(), size = map.row_size();
  if (batch == 0 || num_prototypes == 0) return;
  TORCH_CHECK(positions > 1, "min_distance_forward: one position is single_position_forward's");

  const PrototypeNorms<acc_t> norms = prototype_norms(prototypes, num_prototypes, size, metric);
  const ExpansionBounds bounds = expansion_bounds<acc_t>(size, metric, input_rounding);
  const acc_t g = static_cast<acc_t>(bounds.g), tau = static_cast<acc_t>(bounds.tau);

  const int64_t images_per_block =
      std::clamp<int64_t>((kTargetRows + positions - 1) / positions, 1, batch);
  const int64_t image_blocks = (batch + images_per_block - 1) / images_per_block;
  const int64_t proto_blocks = (num_prototypes + kPrototypeBlock - 1) / kPrototypeBlock;
  // Enough tasks to keep every thread busy; each repacks its images, which costs 1/M of a GEMM.
  const int64_t wanted = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t groups =
      std::clamp<int64_t>((wanted + image_blocks - 1) / image_blocks, 1, proto_blocks);
  const int64_t blocks_per_group = (proto_blocks + groups - 1) / groups;

  parallel_tasks(image_blocks * groups, [&](auto&& take) {
    Workspace<acc_t> work(images_per_block * positions, size, kPrototypeBlock);
    RowsGemm<acc_t> gemm;
    for (int64_t task; take(task);) {
      const int64_t first_image = (task / groups) * images_per_block;
      const int64_t images = std::min(images_per_block, batch - first_image);
      const int64_t row_count = images * positions;
      pack_rows(x, map, first_image, images, work.rows.data());
      squared_norms(work.rows.data(), row_count, size, work.squared.data());
      describe_rows(work.squared.data(), row_count, work.inverse.data(), work.finite.data());
      gemm.load(work.rows.data(), row_count, size);

      const int64_t first_block = (task % groups) * blocks_per_group;
      const int64_t last_block = std::min(first_block + blocks_per_group, proto_blocks);
      for (int64_t block = first_block; block < last_block; ++block) {
        const int64_t c0 = block * kPrototypeBlock;
        const int64_t columns = std::min(kPrototypeBlock, num_prototypes - c0);
        const TileSide<acc_t> col_side{norms.squared.data() + c0, norms.inverse.data() + c0,
                                       norms.finite.data() + c0};
        gemm.multiply(prototypes + c0 * size, columns, work.tile.data());
        for (int64_t image = 0; image < images; ++image) {
          const int64_t r0 = image * positions;
          const acc_t* tile = work.tile.data() + r0 * columns;
          const TileSide<acc_t> row_side{work.squared.data() + r0, work.inverse.data() + r0,
                                         work.finite.data() + r0};
          reduce_image(tile, columns, positions, work.rows.data() + r0 * size, size, row_side,
                       col_side, prototypes + c0 * size, norms.squared_exact.data() + c0, metric,
                       g, tau, work.best.data(), *work.shortlist);
          const int64_t out = (first_image + image) * num_prototypes + c0;
          for (int64_t c = 0; c < columns; ++c) {
            values[out + c] = static_cast<acc_t>(work.best[c].value);
            indices[out + c] = work.best[c].index;
          }
        }
      }
    }
  });
}

#define PK_INSTANTIATE(in_t, acc_t)                                                        \
  template void min_distance_forward<in_t, acc_t>(const in_t*, const FeatureMap&,          \
                                                  const acc_t*, int64_t, Metric, double,   \
                                                  acc_t*, int64_t*);

PK_INSTANTIATE(float, float)
PK_INSTANTIATE(double, double)
PK_INSTANTIATE(c10::Half, float)
PK_INSTANTIATE(c10::BFloat16, float)

}  // namespace protokern::cpu
