// The CPU forward kernel of topk_distance: the k smallest distances over positions of every
// (image, prototype), min_distance's tile reduction with k survivors instead of one.
//
// As min_distance_forward_kernel.cpp: per task a block of images, their windows packed as rows;
// per block of prototypes one GEMM gives a (rows x block) tile of inner products. Per image and
// column, every position's expanded distance is bounded (the reference's bounds, widened for the
// rearranged arithmetic: protokern/backends/reference.py expanded_distance), the k-th smallest
// upper bound found (nth_element over the positions), and every position whose lower bound is
// at most it is recomputed directly (exact_distance.h); the k smallest exact distances win,
// ascending, a NaN first, ties to the lowest position. At least k positions are shortlisted (the
// k smallest upper bounds' own lower bounds are below the k-th), so the result does not depend on
// how the GEMM rounds. Untrusted rows or prototypes (NaN, inf, huge norms) are always shortlisted.
// Only a tile of distances and one image's candidates ever exist.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/cpu_utils.h"
#include "cpu/exact_distance.h"
#include "cpu/gemm_tiles.h"
#include "cpu/min_distance_kernels.h"

namespace protokern::cpu {
namespace {

// (exact distance, position) ordered as torch.min orders them: NaN first, then ascending, ties
// to the lowest position.
bool comes_first(const std::pair<double, int64_t>& a, const std::pair<double, int64_t>& b) {
  const bool a_nan = std::isnan(a.first), b_nan = std::isnan(b.first);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a.first != b.first) return a.first < b.first;
  return a.second < b.second;
}

// Scratch of one task, allocated once.
struct Candidates {
  std::vector<double> lower, upper, kth;
  std::vector<std::pair<double, int64_t>> exact;
  explicit Candidates(int64_t positions) : lower(positions), upper(positions), kth(positions) {
    exact.reserve(positions);
  }
};

// One image (its `positions` packed rows, their squared norms, trust flags) against `columns`
// prototypes: the k smallest exact distances of each column into values/indices. Vector clones,
// as min_distance's reduce_image: exact_distance's sums then run in the same vector width, so
// k = 1 returns min_distance's values bit for bit.
template <typename acc_t>
PK_VECTOR_CLONES void reduce_image_topk(const acc_t* tile, int64_t columns, int64_t positions, const acc_t* rows,
                       const acc_t* row_squared, const uint8_t* row_finite, int64_t size,
                       const acc_t* prototypes, const acc_t* proto_squared,
                       const uint8_t* proto_finite, const double* proto_squared_exact,
                       Metric metric, double g, double tau, int64_t k, Candidates& work,
                       acc_t* values, int64_t* indices) {
  const bool squared_metric = metric == Metric::kSqEuclidean;
  for (int64_t c = 0; c < columns; ++c) {
    const bool column_trusted = proto_finite[c] != 0;
    const double p_squared = proto_squared[c];
    const double p_inverse = 1.0 / std::max(std::sqrt(p_squared), kNormFloor);
    int64_t trusted = 0;
    for (int64_t r = 0; r < positions; ++r) {
      if (!(column_trusted && row_finite[r])) {
        work.lower[r] = -infinity<double>();  // always shortlisted
        continue;
      }
      const double dot = tile[r * columns + c];
      double distance, bound;
      if (squared_metric) {
        const double magnitude = static_cast<double>(row_squared[r]) + p_squared;
        distance = std::max(magnitude - 2 * dot, 0.0);
        bound = g * magnitude + tau;
      } else if (metric == Metric::kDot) {
        distance = -dot;
        bound = g * std::sqrt(static_cast<double>(row_squared[r]) * p_squared) + tau;
      } else {
        const double x_inverse =
            1.0 / std::max(std::sqrt(static_cast<double>(row_squared[r])), kNormFloor);
        distance = std::min(std::max(1.0 - dot * x_inverse * p_inverse, 0.0), 2.0);
        bound = g;
      }
      work.lower[r] = distance - bound;
      work.upper[r] = distance + bound;
      work.kth[trusted++] = distance + bound;
    }
    double threshold = infinity<double>();
    if (trusted >= k) {
      std::nth_element(work.kth.begin(), work.kth.begin() + (k - 1), work.kth.begin() + trusted);
      threshold = work.kth[k - 1];
    }
    work.exact.clear();
    for (int64_t r = 0; r < positions; ++r)
      if (work.lower[r] <= threshold)
        work.exact.emplace_back(
            exact_distance(rows + r * size, prototypes + c * size, size, metric,
                           proto_squared_exact[c], column_trusted && row_finite[r]),
            r);
    // The bounds guarantee k candidates; if rounding ever defeated them, take every position.
    if (static_cast<int64_t>(work.exact.size()) < k) {
      work.exact.clear();
      for (int64_t r = 0; r < positions; ++r)
        work.exact.emplace_back(exact_distance(rows + r * size, prototypes + c * size, size,
                                               metric, proto_squared_exact[c], false),
                                r);
    }
    std::partial_sort(work.exact.begin(), work.exact.begin() + k, work.exact.end(),
                      comes_first);
    for (int64_t j = 0; j < k; ++j) {
      values[c * k + j] = static_cast<acc_t>(work.exact[j].first);
      indices[c * k + j] = work.exact[j].second;
    }
  }
}

// The expanded distance of a (position, column) pair and its rounding bound, in the working type
// (the bounds' g carries a few eps for this arithmetic, as min_distance's reduce_image).
template <typename acc_t>
struct Expanded {
  acc_t distance, bound;
};

template <typename acc_t>
PK_INLINE Expanded<acc_t> expanded(acc_t dot, acc_t row_squared, acc_t row_inverse,
                                   acc_t col_squared, acc_t col_inverse, Metric metric, acc_t g,
                                   acc_t tau) {
  if (metric == Metric::kSqEuclidean) {
    const acc_t magnitude = row_squared + col_squared;
    return {std::max(magnitude - 2 * dot, acc_t(0)), g * magnitude + tau};
  }
  if (metric == Metric::kDot)  // (the norms' product, not the squares': it cannot overflow)
    return {-dot, g * (std::sqrt(row_squared) * std::sqrt(col_squared)) + tau};
  return {std::min(std::max(1 - dot * (row_inverse * col_inverse), acc_t(0)), acc_t(2)), g};
}

// k <= kVectorK: the same shortlist as reduce_image_topk, found row by row across all columns
// at once (vectorised) instead of column by column: pass 1 keeps, per column, its k smallest
// upper bounds sorted in `smallest` (k x columns, an insertion network of 2k min/max per
// element); pass 2 pushes every (position, column) whose lower bound is at most the column's
// k-th, untrusted rows and columns always. The shortlist is then recomputed exactly and sorted
// per column, as before. (Column by column, with a double nth_element per column, the reduction
// was 7x min_distance's forward at cub-like shapes and made Deformable ProtoPNet's top-4
// recipe slower than its original.)
inline constexpr int64_t kVectorK = 16;

template <typename acc_t>
PK_VECTOR_CLONES void reduce_image_topk_rows(
    const acc_t* tile, int64_t columns, int64_t positions, const acc_t* rows,
    const acc_t* row_squared, const acc_t* row_inverse, const uint8_t* row_finite, int64_t size,
    const acc_t* prototypes, const acc_t* proto_squared, const acc_t* proto_inverse,
    const uint8_t* proto_finite, const double* proto_squared_exact, Metric metric, acc_t g,
    acc_t tau, int64_t k, std::vector<acc_t>& smallest,
    std::vector<std::pair<int32_t, int32_t>>& found, std::vector<int64_t>& starts,
    std::vector<int32_t>& shortlist, std::vector<std::pair<double, int64_t>>& exact,
    acc_t* values, int64_t* indices) {
  smallest.assign((k + 1) * columns, infinity<acc_t>());
  acc_t* s = smallest.data();
  acc_t* carried = s + k * columns;  // the row's bound on its way down the k sorted slots
  for (int64_t r = 0; r < positions; ++r) {
    if (!row_finite[r]) continue;
    const acc_t* dots = tile + r * columns;
    for (int64_t c = 0; c < columns; ++c) {  // NaN only where the column is untrusted
      const Expanded<acc_t> e = expanded(dots[c], row_squared[r], row_inverse[r],
                                         proto_squared[c], proto_inverse[c], metric, g, tau);
      carried[c] = e.distance + e.bound;
    }
    for (int64_t j = 0; j < k; ++j) {
      acc_t* slot = s + j * columns;
      for (int64_t c = 0; c < columns; ++c) {
        const acc_t held = slot[c];
        slot[c] = std::min(held, carried[c]);
        carried[c] = std::max(held, carried[c]);
      }
    }
  }
  const acc_t* threshold = s + (k - 1) * columns;
  found.clear();
  // Per row, which columns shortlist it, as flags in one vectorised pass, then the flags scanned
  // eight at a time (for_each_flagged).
  uint8_t* keep = reinterpret_cast<uint8_t*>(carried);  // pass 1 is done with the carried row
  for (int64_t r = 0; r < positions; ++r) {
    const acc_t* dots = tile + r * columns;
    const bool row_ok = row_finite[r] != 0;
    for (int64_t c = 0; c < columns; ++c) {
      const Expanded<acc_t> e = expanded(dots[c], row_squared[r], row_inverse[r],
                                         proto_squared[c], proto_inverse[c], metric, g, tau);
      keep[c] = static_cast<uint8_t>(!(row_ok && proto_finite[c]) |
                                     (e.distance - e.bound <= threshold[c]));
    }
    for_each_flagged(keep, columns, [&](int64_t c) PK_LAMBDA_INLINE {
      found.emplace_back(static_cast<int32_t>(c), static_cast<int32_t>(r));
    });
  }
  // grouped by column by a counting sort (stable: positions stay ascending); a comparison
  // sort of the pairs cost as much as the rest of the reduction
  starts.assign(columns + 1, 0);
  for (const auto& pair : found) ++starts[pair.first + 1];
  for (int64_t c = 0; c < columns; ++c) starts[c + 1] += starts[c];
  shortlist.resize(found.size());
  for (const auto& pair : found) shortlist[starts[pair.first]++] = pair.second;
  // starts[c] now ends column c's run
  int64_t at = 0;
  for (int64_t c = 0; c < columns; ++c) {
    exact.clear();
    for (; at < starts[c]; ++at) {
      const int64_t r = shortlist[at];
      exact.emplace_back(exact_distance(rows + r * size, prototypes + c * size, size, metric,
                                        proto_squared_exact[c], proto_finite[c] && row_finite[r]),
                         r);
    }
    // The bounds guarantee k candidates; if rounding ever defeated them, take every position.
    if (static_cast<int64_t>(exact.size()) < k) {
      exact.clear();
      for (int64_t r = 0; r < positions; ++r)
        exact.emplace_back(exact_distance(rows + r * size, prototypes + c * size, size, metric,
                                          proto_squared_exact[c], false),
                           r);
    }
    std::partial_sort(exact.begin(), exact.begin() + k, exact.end(), comes_first);
    for (int64_t j = 0; j < k; ++j) {
      values[c * k + j] = static_cast<acc_t>(exact[j].first);
      indices[c * k + j] = exact[j].second;
    }
  }
}

}  // namespace

template <typename in_t, typename acc_t>
void topk_distance_forward(const in_t* x, const FeatureMap& map, const acc_t* prototypes,
                           int64_t num_prototypes, Metric metric, double input_rounding,
                           int64_t k, acc_t* values, int64_t* indices) {
  const int64_t batch = map.batch, positions = map.positions(), size = map.row_size();
  if (batch == 0 || num_prototypes == 0) return;

  const PrototypeNorms<acc_t> norms = prototype_norms(prototypes, num_prototypes, size, metric);

  const ExpansionBounds bounds = expansion_bounds<acc_t>(size, metric, input_rounding);
  const double g = bounds.g, tau = bounds.tau;

  const int64_t images_per_block =
      std::clamp<int64_t>((kTargetRows + positions - 1) / positions, 1, batch);
  const int64_t image_blocks = (batch + images_per_block - 1) / images_per_block;
  parallel_tasks(image_blocks, [&](auto&& take) {
    const int64_t row_capacity = images_per_block * positions;
    std::vector<acc_t> rows(row_capacity * size), squared(row_capacity), inverse(row_capacity);
    std::vector<acc_t> tile(row_capacity * kPrototypeBlock);
    std::vector<uint8_t> finite(row_capacity);
    Candidates work(positions);
    std::vector<acc_t> smallest;
    std::vector<std::pair<int32_t, int32_t>> found;  // (column, position)
    std::vector<int64_t> starts;
    std::vector<int32_t> shortlist;
    RowsGemm<acc_t> gemm;
    for (int64_t task; take(task);) {
      const int64_t first_image = task * images_per_block;
      const int64_t images = std::min(images_per_block, batch - first_image);
      const int64_t row_count = images * positions;
      pack_rows(x, map, first_image, images, rows.data());
      squared_norms(rows.data(), row_count, size, squared.data());
      describe_rows(squared.data(), row_count, inverse.data(), finite.data());
      gemm.load(rows.data(), row_count, size);
      for (int64_t c0 = 0; c0 < num_prototypes; c0 += kPrototypeBlock) {
        const int64_t columns = std::min(kPrototypeBlock, num_prototypes - c0);
        gemm.multiply(prototypes + c0 * size, columns, tile.data());
        for (int64_t image = 0; image < images; ++image) {
          const int64_t r0 = image * positions;
          const int64_t out = ((first_image + image) * num_prototypes + c0) * k;
          if (k <= kVectorK) {
            reduce_image_topk_rows(
                tile.data() + r0 * columns, columns, positions, rows.data() + r0 * size,
                squared.data() + r0, inverse.data() + r0, finite.data() + r0, size,
                prototypes + c0 * size, norms.squared.data() + c0, norms.inverse.data() + c0,
                norms.finite.data() + c0, norms.squared_exact.data() + c0, metric,
                static_cast<acc_t>(g), static_cast<acc_t>(tau), k, smallest, found, starts,
                shortlist, work.exact, values + out, indices + out);
            continue;
          }
          reduce_image_topk(tile.data() + r0 * columns, columns, positions,
                            rows.data() + r0 * size, squared.data() + r0, finite.data() + r0,
                            size, prototypes + c0 * size, norms.squared.data() + c0,
                            norms.finite.data() + c0, norms.squared_exact.data() + c0, metric, g,
                            tau, k, work, values + out, indices + out);
        }
      }
    }
  });
}

#define PK_INSTANTIATE(in_t, acc_t)                                                         \
  template void topk_distance_forward<in_t, acc_t>(const in_t*, const FeatureMap&,          \
                                                   const acc_t*, int64_t, Metric, double,   \
                                                   int64_t, acc_t*, int64_t*);

PK_INSTANTIATE(float, float)
PK_INSTANTIATE(double, double)
PK_INSTANTIATE(c10::Half, float)
PK_INSTANTIATE(c10::BFloat16, float)

}  // namespace protokern::cpu
