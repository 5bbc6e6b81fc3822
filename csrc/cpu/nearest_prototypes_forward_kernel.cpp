// The CPU forward kernel of nearest_prototypes: per task, the windows of a block of images as
// rows, against every prototype, one GEMM tile at a time.
//
// Per tile (rows x a block of prototypes) and per row, a vectorised pass turns the inner
// products into upper bounds of the true distances, in "score" units that drop the row's own
// constant (sqeuclidean: u = (1 + g)|p|^2 - 2 x.p, the row adding (1 + g)|x|^2 + tau; cosine:
// u = (1 + g) - x.p / (|x| |p|), norms floored; dot: u = g|p| - x.p / |x|, i.e. the bound
// -x.p + g|x||p| divided by the row's |x| (floored: s = 1/max(|x|, floor), s|x| <= 1), the row
// adding s tau), keeps the k smallest of them over all tiles so far (their largest is T) and
// appends to the row's shortlist every prototype whose lower bound (u - d, d = 2g|p|^2, 2g resp.
// 2g|p|) is at most T plus the row's own gap (2g|x|^2 + 2 tau, 0 resp. 2 s tau).
// These are the reference's bounds (protokern/backends/reference.py, nearest_candidates): every
// prototype that can be among the k nearest is on the shortlist, usually about k of them. At the
// end the shortlist is cut to T's final value, recomputed directly (exact_distance.h) and the
// first k by (exact distance, index) win: ties go to the lowest index, a NaN distance comes first,
// and a prototype equal to a patch is found at distance 0 whatever the GEMM's rounding.
// Prototypes with a non-finite or huge squared norm are always shortlisted; such rows are
// compared with every prototype directly.
//
// Memory: a tile, the rows of one task, and the shortlists.
#include "cpu/nearest_prototypes_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cpu_utils.h"
#include "cpu/exact_distance.h"
#include "cpu/gemm_tiles.h"

namespace protokern::cpu {
namespace {

// A shortlisted prototype of a row: its lower bound (score units) and its index.
template <typename acc_t>
struct Shortlisted {
  acc_t lower;
  int64_t index;
};

// What one row keeps across the tiles.
template <typename acc_t>
struct RowState {
  std::vector<acc_t> uppers;  // the k smallest upper scores so far, ascending
  std::vector<Shortlisted<acc_t>> shortlist;

  acc_t threshold() const { return uppers.back(); }
};

// What the bounds need about each prototype of the bank (all of it, once per call).
template <typename acc_t>
struct Columns {
  std::vector<acc_t> upper_base;  // (1 + g)|p|^2, 1 + g, g|p| (sqeuclidean, cosine, dot); inf
                                  // where untrusted
  std::vector<acc_t> scale;       // sqeuclidean 2; cosine 1 / max(|p|, floor); dot 1
  std::vector<acc_t> spread;      // d: upper - lower, 2g|p|^2, 2g resp. 2g|p|
  std::vector<double> squared_exact;  // |p|^2 in double (cosine's exact distance)
  std::vector<uint8_t> trusted;
  std::vector<int64_t> untrusted;  // their indices: on every row's shortlist
};

// Offers one row of a tile (inner products `dots`, columns c0 .. c0 + columns) to its state.
// One vectorised pass turns the products into upper scores u = upper_base - row_scale * scale *
// dot (kept in `scores`, their minimum taken on the way) and flags the columns whose lower bound
// u - spread is within the row's limit (T + gap) as it stood before this tile. Only flagged
// columns reach the scalar code (for_each_flagged): first the running k smallest
// (k = 1: the minimum), then the shortlist push against the limit of the lowered T. Every column
// that can lower T is flagged (u < T implies u - spread <= T + gap: spread and gap are >= 0),
// and T only falls, so this is the shortlist the scalar loops built. (They compared and pushed
// every column, k > 1 twice: 5% of the patchcore forward at D = 1024 in perf, more at D = 128.)
template <typename acc_t>
PK_VECTOR_CLONES void offer_row(const acc_t* dots, int64_t columns, int64_t c0,
                                const acc_t* upper_base, const acc_t* scale, const acc_t* spread,
                                acc_t row_scale, acc_t gap, int64_t k, acc_t* scores,
                                uint8_t* flags, RowState<acc_t>& state) {
  const acc_t before = state.threshold() + gap;
  acc_t least = std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(min : least)
  for (int64_t c = 0; c < columns; ++c) {
    acc_t u = upper_base[c] - row_scale * scale[c] * dots[c];
    u = u == u ? u : std::numeric_limits<acc_t>::infinity();  // untrusted: NaN from inf
    scores[c] = u;
    least = std::min(least, u);
    flags[c] = static_cast<uint8_t>(u - spread[c] <= before);
  }
  acc_t* uppers = state.uppers.data();
  if (!(least < uppers[k - 1])) {
    // T stays: the flags are the shortlist
  } else if (k == 1) {
    uppers[0] = least;
  } else {
    for_each_flagged(flags, columns, [&](int64_t c) PK_LAMBDA_INLINE {
      const acc_t u = scores[c];
      if (!(u < uppers[k - 1])) return;
      int64_t at = k - 1;
      for (; at > 0 && uppers[at - 1] > u; --at) uppers[at] = uppers[at - 1];
      uppers[at] = u;
    });
  }
  const acc_t limit = state.threshold() + gap;
  for_each_flagged(flags, columns, [&](int64_t c) PK_LAMBDA_INLINE {
    const acc_t lower = scores[c] - spread[c];
    if (lower <= limit) state.shortlist.push_back({lower, c0 + c});
  });
  // shortlisted earlier under a larger T: drop what the current T rules out, now and then
  if (state.shortlist.size() > static_cast<size_t>(4 * k + 64)) {
    std::erase_if(state.shortlist, [&](const Shortlisted<acc_t>& s) { return s.lower > limit; });
  }
}

// The first k of `found` by (exact distance, index), NaN first, written to values / indices.
template <typename acc_t>
void write_first_k(std::vector<std::pair<double, int64_t>>& found, int64_t k, acc_t* values,
                   int64_t* indices) {
  auto before = [](const std::pair<double, int64_t>& a, const std::pair<double, int64_t>& b) {
    const bool a_nan = std::isnan(a.first), b_nan = std::isnan(b.first);
    if (a_nan || b_nan) return a_nan && (!b_nan || a.second < b.second);
    return a.first < b.first || (a.first == b.first && a.second < b.second);
  };
  std::partial_sort(found.begin(), found.begin() + k, found.end(), before);
  for (int64_t j = 0; j < k; ++j) {
    values[j] = static_cast<acc_t>(found[j].first);
    indices[j] = found[j].second;
  }
}

template <typename acc_t>
Columns<acc_t> describe_columns(const acc_t* prototypes, int64_t num, int64_t size,
                                Metric metric, acc_t g) {
  Columns<acc_t> cols;
  std::vector<acc_t> squared(num), inverse(num);
  cols.upper_base.resize(num);
  cols.scale.resize(num);
  cols.spread.resize(num);
  cols.squared_exact.assign(num, 0.0);
  cols.trusted.resize(num);
  parallel_chunks(0, num, 64, [&](int64_t begin, int64_t end) {
    squared_norms(prototypes + begin * size, end - begin, size, squared.data() + begin);
    describe_rows(squared.data() + begin, end - begin, inverse.data() + begin,
                  cols.trusted.data() + begin);
    for (int64_t m = begin; m < end; ++m) {
      const acc_t norm = std::sqrt(squared[m]);
      if (metric == Metric::kSqEuclidean) {
        cols.upper_base[m] = (1 + g) * squared[m];
        cols.scale[m] = 2;
        cols.spread[m] = 2 * g * squared[m];
      } else if (metric == Metric::kDot) {
        cols.upper_base[m] = g * norm;
        cols.scale[m] = 1;
        cols.spread[m] = 2 * g * norm;
      } else {
        cols.upper_base[m] = 1 + g;
        cols.scale[m] = inverse[m];
        cols.spread[m] = 2 * g;
        dispatched_exact_dot(prototypes + m * size, prototypes + m * size, size,
                             &cols.squared_exact[m]);
      }
      if (!cols.trusted[m]) cols.upper_base[m] = std::numeric_limits<acc_t>::infinity();
    }
  });
  for (int64_t m = 0; m < num; ++m)
    if (!cols.trusted[m]) cols.untrusted.push_back(m);
  return cols;
}

}  // namespace

template <typename in_t, typename acc_t>
void nearest_prototypes_forward(const in_t* x, const FeatureMap& map, const acc_t* prototypes,
                                int64_t num, int64_t k, Metric metric, double input_rounding,
                                acc_t* values, int64_t* indices) {
  const int64_t batch = map.batch, positions = map.positions(), size = map.row_size();
  if (batch == 0 || positions == 0) return;
  const bool sq = metric == Metric::kSqEuclidean;
  const ExpansionBounds bounds = expansion_bounds<acc_t>(size, metric, input_rounding);
  const acc_t g = static_cast<acc_t>(bounds.g), tau = static_cast<acc_t>(bounds.tau);
  const Columns<acc_t> cols = describe_columns(prototypes, num, size, metric, g);

  const int64_t images_per_block =
      std::clamp<int64_t>((kTargetRows + positions - 1) / positions, 1, batch);
  const int64_t image_blocks = (batch + images_per_block - 1) / images_per_block;
  parallel_tasks(image_blocks, [&](auto&& take) {
    const int64_t capacity = images_per_block * positions;
    std::vector<acc_t> rows(capacity * size), tile(capacity * kPrototypeBlock);
    std::vector<acc_t> squared(capacity), inverse(capacity), scores(kPrototypeBlock);
    std::vector<uint8_t> trusted(capacity), flags(kPrototypeBlock);
    std::vector<RowState<acc_t>> states(capacity);
    std::vector<std::pair<double, int64_t>> found;
    RowsGemm<acc_t> gemm;
    // A row's factor on the inner products and its own gap (see the top of this file).
    auto row_scale = [&](int64_t r) { return sq ? acc_t(1) : inverse[r]; };
    auto row_gap = [&](int64_t r) {
      return sq ? 2 * g * squared[r] + 2 * tau
                : metric == Metric::kDot ? 2 * inverse[r] * tau : acc_t(0);
    };
    for (int64_t block; take(block);) {
      const int64_t first_image = block * images_per_block;
      const int64_t count = std::min(images_per_block, batch - first_image) * positions;
      pack_rows(x, map, first_image, count / positions, rows.data());
      squared_norms(rows.data(), count, size, squared.data());
      describe_rows(squared.data(), count, inverse.data(), trusted.data());
      gemm.load(rows.data(), count, size);
      for (int64_t r = 0; r < count; ++r) {
        states[r].uppers.assign(k, std::numeric_limits<acc_t>::infinity());
        states[r].shortlist.clear();
      }
      for (int64_t c0 = 0; c0 < num; c0 += kPrototypeBlock) {
        const int64_t columns = std::min(kPrototypeBlock, num - c0);
        gemm.multiply(prototypes + c0 * size, columns, tile.data());
        for (int64_t r = 0; r < count; ++r) {
          if (!trusted[r]) continue;  // compared with every prototype below
          offer_row(tile.data() + r * columns, columns, c0, cols.upper_base.data() + c0,
                    cols.scale.data() + c0, cols.spread.data() + c0, row_scale(r), row_gap(r), k,
                    scores.data(), flags.data(), states[r]);
        }
      }
      for (int64_t r = 0; r < count; ++r) {
        const acc_t* row = rows.data() + r * size;
        found.clear();
        auto exact = [&](int64_t m) {
          found.emplace_back(dispatched_exact_distance(row, prototypes + m * size, size,
                                                       metric, cols.squared_exact[m],
                                                       trusted[r] && cols.trusted[m]),
                             m);
        };
        if (!trusted[r]) {
          for (int64_t m = 0; m < num; ++m) exact(m);
        } else {
          const acc_t limit = states[r].threshold() + row_gap(r);
          // untrusted prototypes once, from their own list: the tiles may have shortlisted
          // them too (cosine: an inf bound below an inf threshold while k exceeds the finite
          // ones), which took a NaN prototype twice
          for (const Shortlisted<acc_t>& s : states[r].shortlist)
            if (s.lower <= limit && cols.trusted[s.index]) exact(s.index);
          for (const int64_t m : cols.untrusted) exact(m);
        }
        const int64_t out = (first_image * positions + r) * k;
        write_first_k(found, k, values + out, indices + out);
      }
    }
  });
}

#define PK_INSTANTIATE(in_t, acc_t)                                                         \
  template void nearest_prototypes_forward<in_t, acc_t>(const in_t*, const FeatureMap&,     \
                                                        const acc_t*, int64_t, int64_t,     \
                                                        Metric, double, acc_t*, int64_t*);

PK_INSTANTIATE(float, float)
PK_INSTANTIATE(double, double)
PK_INSTANTIATE(c10::Half, float)
PK_INSTANTIATE(c10::BFloat16, float)

}  // namespace protokern::cpu
