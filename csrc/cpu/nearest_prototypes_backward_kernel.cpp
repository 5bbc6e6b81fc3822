// The CPU backward kernel of nearest_prototypes: gradients through the chosen (row, prototype)
// pairs only, deterministic whatever the thread count.
//
// - grad_x: one image per step, as min_distance_backward: its windows are packed, each window's
//   k pairs are summed in order into the window's gradient (in place), which is folded back
//   onto the image.
// - grad_prototypes: the pairs are bucketed by prototype (a counting sort, in row order), and
//   each prototype sums its bucket in that order, reading each pair's window straight from x.
// Cosine needs every pair's a.p and |a|^2: computed once, in double, before both passes.
#include "cpu/nearest_prototypes_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "cpu/cpu_utils.h"
#include "cpu/exact_distance.h"
#include "cpu/gradient_terms.h"

namespace protokern::cpu {
namespace {

constexpr int64_t kPrototypesPerTask = 16;  // fewest prototypes per thread in the grad gather

// Window `row` (over all images) of x, as one packed row in the prototypes' order.
template <typename in_t, typename acc_t>
PK_INLINE void load_window(const in_t* x, const FeatureMap& map, int64_t row, acc_t* out) {
  const int64_t positions = map.positions();
  const int64_t image = row / positions, position = row % positions;
  const int64_t h = position / map.out_w(), w = position % map.out_w();
  const in_t* top_left = x + image * map.stride_b + h * map.stride_h + w * map.stride_w;
  int64_t k = 0;
  for (int64_t d = 0; d < map.channels; ++d)
    for (int64_t i = 0; i < map.patch_h; ++i)
      for (int64_t j = 0; j < map.patch_w; ++j)
        out[k++] = static_cast<acc_t>(top_left[d * map.stride_c + i * map.stride_h +
                                               j * map.stride_w]);
}

// Image b's packed windows `rows` (L, K) become their gradients, in place.
template <typename acc_t>
PK_VECTOR_CLONES void image_window_gradients(const acc_t* grad, const acc_t* prototypes,
                                             const int64_t* indices, const CosineGradient* cosine,
                                             int64_t first_row, int64_t positions,
                                             int64_t size, int64_t k, Metric metric,
                                             acc_t* rows, acc_t* sum) {
  for (int64_t l = 0; l < positions; ++l) {
    acc_t* window = rows + l * size;
    std::fill(sum, sum + size, acc_t(0));
    for (int64_t j = 0; j < k; ++j) {
      const int64_t pair = (first_row + l) * k + j;
      const acc_t* p = prototypes + indices[pair] * size;
      if (metric == Metric::kSqEuclidean) {
        add_scaled_difference(sum, static_cast<acc_t>(2.0 * grad[pair]), window, p, size);
      } else if (metric == Metric::kDot) {  // d = -a.p: d/da = -p
        add_scaled(sum, -static_cast<double>(grad[pair]), p, size);
      } else {
        add_combination(sum, cosine[pair].a_term, window, -cosine[pair].scale, p, size);
      }
    }
    std::copy(sum, sum + size, window);
  }
}

// Adds the pairs of prototypes [begin, end) (bucketed: bucket m is order[starts[m]..
// starts[m + 1]), in increasing pair order) to their gradient rows.
template <typename in_t, typename acc_t>
PK_VECTOR_CLONES void prototype_gradients(const acc_t* grad, const in_t* x, const FeatureMap& map,
                                          const acc_t* prototypes, const int64_t* order,
                                          const int64_t* starts, const CosineGradient* cosine,
                                          int64_t begin, int64_t end, int64_t k, Metric metric,
                                          acc_t* window, acc_t* grad_prototypes) {
  const int64_t size = map.row_size();
  for (int64_t m = begin; m < end; ++m) {
    acc_t* out = grad_prototypes + m * size;
    const acc_t* p = prototypes + m * size;
    std::fill(out, out + size, acc_t(0));
    double p_coef = 0;
    for (int64_t s = starts[m]; s < starts[m + 1]; ++s) {
      const int64_t pair = order[s];
      load_window(x, map, pair / k, window);
      if (metric == Metric::kSqEuclidean) {
        add_scaled_difference(out, static_cast<acc_t>(-2.0 * grad[pair]), window, p, size);
      } else if (metric == Metric::kDot) {  // d/dp = -a
        add_scaled(out, -static_cast<double>(grad[pair]), window, size);
      } else {
        p_coef += cosine[pair].p_term;
        add_scaled(out, -cosine[pair].scale, window, size);
      }
    }
    if (metric == Metric::kCosine) add_scaled(out, p_coef, p, size);
  }
}

}  // namespace

template <typename in_t, typename acc_t>
void nearest_prototypes_backward(const acc_t* grad, const in_t* x, const FeatureMap& map,
                                 const acc_t* prototypes, int64_t num, int64_t k,
                                 const int64_t* indices, Metric metric, acc_t* grad_x,
                                 acc_t* grad_prototypes) {
  const int64_t batch = map.batch, positions = map.positions(), size = map.row_size();
  const int64_t pairs = batch * positions * k;
  std::vector<CosineGradient> cosine;
  if (metric == Metric::kCosine) {
    cosine.resize(pairs);
    std::vector<double> p_squared(num);
    parallel_chunks(0, num, 64, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        dispatched_exact_dot(prototypes + m * size, prototypes + m * size, size, &p_squared[m]);
    });
    parallel_chunks(0, batch * positions, 64, [&](int64_t begin, int64_t end) {
      AlignedBuffer<acc_t> window(size);
      for (int64_t row = begin; row < end; ++row) {
        load_window(x, map, row, window.data());
        for (int64_t j = 0; j < k; ++j) {
          const int64_t pair = row * k + j, m = indices[pair];
          double a_squared;
          const double dot =
              dispatched_exact_dot(window.data(), prototypes + m * size, size, &a_squared);
          cosine[pair] = cosine_gradient(grad[pair], dot, a_squared, p_squared[m]);
        }
      }
    });
  }
  if (grad_x != nullptr) {
    parallel_tasks(batch, [&](auto&& take) {
      AlignedBuffer<acc_t> rows(positions * size), sum(size);
      for (int64_t b; take(b);) {
        pack_rows(x, map, b, 1, rows.data());
        image_window_gradients(grad, prototypes, indices, cosine.data(), b * positions,
                               positions, size, k, metric, rows.data(), sum.data());
        fold_rows(rows.data(), map, grad_x + b * map.channels * map.height * map.width);
      }
    });
  }
  if (grad_prototypes == nullptr) return;
  std::vector<int64_t> starts(num + 1, 0), order(pairs);
  for (int64_t pair = 0; pair < pairs; ++pair) ++starts[indices[pair] + 1];
  for (int64_t m = 0; m < num; ++m) starts[m + 1] += starts[m];
  std::vector<int64_t> cursor(starts.begin(), starts.end() - 1);
  for (int64_t pair = 0; pair < pairs; ++pair) order[cursor[indices[pair]]++] = pair;
  parallel_chunks(0, num, kPrototypesPerTask, [&](int64_t begin, int64_t end) {
    AlignedBuffer<acc_t> window(size);
    prototype_gradients(grad, x, map, prototypes, order.data(), starts.data(), cosine.data(),
                        begin, end, k, metric, window.data(), grad_prototypes);
  });
}

#define PK_INSTANTIATE(in_t, acc_t)                                                           \
  template void nearest_prototypes_backward<in_t, acc_t>(                                     \
      const acc_t*, const in_t*, const FeatureMap&, const acc_t*, int64_t, int64_t,           \
      const int64_t*, Metric, acc_t*, acc_t*);

PK_INSTANTIATE(float, float)
PK_INSTANTIATE(double, double)
PK_INSTANTIATE(c10::Half, float)
PK_INSTANTIATE(c10::BFloat16, float)

}  // namespace protokern::cpu
