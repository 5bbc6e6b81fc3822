// The CPU backward kernel of min_distance: gradients through the selected positions only,
// reading nothing of the forward but its indices.
//
// The selected windows are gathered from windows packed one image at a time per thread. grad_x:
// per image, each window sums the terms of the prototypes that chose it, in prototype order, then
// the windows are folded back into the image. grad_prototypes: per range of prototypes, the terms
// of the images in image order. So every sum has one order whatever the thread count. With one
// position per image (tokens, or a window as large as the map) every pair is selected and the
// gradient is two dense products instead (single_position_backward.cpp).
#include "cpu/min_distance_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "cpu/cpu_utils.h"
#include "cpu/gradient_terms.h"
#include "cpu/exact_distance.h"
#include "metric.h"

namespace protokern::cpu {
namespace {

constexpr int64_t kBackwardBlock = 16;  // fewest prototypes per task in the grad gather

// What both backward passes read.
template <typename acc_t>
struct BackwardInputs {
  const acc_t* grad_values;  // (B, M)
  const acc_t* prototypes;   // (M, K)
  const int64_t* indices;    // (B, M)
  const double* dots;        // cosine: (B, M) a.p, (B, M) |a|^2, (M) |p|^2
  const double* a_squared;
  const double* p_squared;
  int64_t num, positions, size;
  Metric metric;
};

// Turns image b's packed windows `rows` (L, K) into their gradients, in place: each window's
// prototypes (grouped by a counting sort into `order`, `starts`) are summed into `sum` in
// prototype order, reading the window, then the sum overwrites it. In place, so the backward
// needs one (L, K) buffer per thread, not two.
template <typename acc_t>
PK_VECTOR_CLONES void image_row_gradients(const BackwardInputs<acc_t>& in, int64_t b,
                                          acc_t* rows, int64_t* order, int64_t* starts,
                                          acc_t* sum) {
  const int64_t* image_indices = in.indices + b * in.num;
  std::fill(starts, starts + in.positions + 1, int64_t(0));
  for (int64_t m = 0; m < in.num; ++m) ++starts[image_indices[m] + 1];
  for (int64_t l = 0; l < in.positions; ++l) starts[l + 1] += starts[l];
  for (int64_t m = 0; m < in.num; ++m) order[starts[image_indices[m]]++] = m;
  // starts[l] now ends window l's run; window l's run starts at starts[l - 1] (0 for l = 0)
  int64_t run = 0;
  for (int64_t l = 0; l < in.positions; ++l) {
    acc_t* window = rows + l * in.size;
    std::fill(sum, sum + in.size, acc_t(0));
    for (; run < starts[l]; ++run) {
      const int64_t m = order[run];
      const int64_t pair = b * in.num + m;
      const acc_t* p = in.prototypes + m * in.size;
      if (in.metric == Metric::kSqEuclidean) {
        add_scaled_difference(sum, static_cast<acc_t>(2.0 * in.grad_values[pair]), window, p,
                              in.size);
      } else if (in.metric == Metric::kDot) {  // d = -a.p: d/da = -p
        add_scaled(sum, -static_cast<double>(in.grad_values[pair]), p, in.size);
      } else {
        const CosineGradient cg = cosine_gradient(in.grad_values[pair], in.dots[pair],
                                                  in.a_squared[pair], in.p_squared[m]);
        add_combination(sum, cg.a_term, window, -cg.scale, p, in.size);
      }
    }
    std::copy(sum, sum + in.size, window);
  }
}

// Adds image b's terms to the gradient of prototypes [begin, end) (cosine: the coefficients
// of p to p_coef, applied once all images are in). `rows` are image b's packed windows. Called
// for b = 0, 1, ... in order, so each prototype's sum runs in image order.
template <typename acc_t>
PK_VECTOR_CLONES void add_image_to_prototype_gradients(const BackwardInputs<acc_t>& in,
                                                       int64_t b, const acc_t* rows,
                                                       int64_t begin, int64_t end,
                                                       acc_t* grad_prototypes, double* p_coef) {
  for (int64_t m = begin; m < end; ++m) {
    const int64_t pair = b * in.num + m;
    const acc_t* a = rows + in.indices[pair] * in.size;
    acc_t* out = grad_prototypes + m * in.size;
    if (in.metric == Metric::kSqEuclidean) {
      add_scaled_difference(out, static_cast<acc_t>(-2.0 * in.grad_values[pair]), a,
                            in.prototypes + m * in.size, in.size);
    } else if (in.metric == Metric::kDot) {  // d/dp = -a
      add_scaled(out, -static_cast<double>(in.grad_values[pair]), a, in.size);
    } else {
      const CosineGradient cg = cosine_gradient(in.grad_values[pair], in.dots[pair],
                                                in.a_squared[pair], in.p_squared[m]);
      p_coef[m - begin] += cg.p_term;
      add_scaled(out, -cg.scale, a, in.size);
    }
  }
}

}  // namespace

template <typename in_t, typename acc_t>
void min_distance_backward(const acc_t* grad_values, const in_t* x, const FeatureMap& map,
                           const acc_t* prototypes, int64_t num_prototypes,
                           const int64_t* indices, Metric metric, acc_t* grad_x,
                           acc_t* grad_prototypes) {
  const int64_t batch = map.batch, positions = map.positions(), size = map.row_size();
  const int64_t num = num_prototypes;
  if (batch == 0) {
    if (grad_prototypes != nullptr)
      std::fill(grad_prototypes, grad_prototypes + num * size, acc_t(0));
    return;
  }
  if (positions == 1) {
    single_position_backward(grad_values, x, map, prototypes, num, metric, grad_x,
                             grad_prototypes);
    return;
  }
  // The selected windows are gathered from windows packed one image at a time per thread (never a
  // packed copy of all of x, which would cost as much memory as the gradient of x).
  const int64_t image_elements = positions * size;
  // Cosine needs every pair's a.p, |a|^2 and |p|^2; computed once, read by both passes.
  std::vector<double> dots, a_squared, p_squared;
  if (metric == Metric::kCosine) {
    dots.resize(batch * num);
    a_squared.resize(batch * num);
    p_squared.resize(num);
    parallel_chunks(0, num, parallel_grain(16, size), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        dispatched_exact_dot(prototypes + m * size, prototypes + m * size, size, &p_squared[m]);
    });
    parallel_tasks(batch, [&](auto&& take) {
      AlignedBuffer<acc_t> rows(image_elements);
      for (int64_t b; take(b);) {
        pack_rows(x, map, b, 1, rows.data());
        for (int64_t m = 0; m < num; ++m) {
          const acc_t* a = rows.data() + indices[b * num + m] * size;
          dots[b * num + m] = dispatched_exact_dot(a, prototypes + m * size, size,
                                                   &a_squared[b * num + m]);
        }
      }
    });
  }
  const BackwardInputs<acc_t> in{grad_values, prototypes, indices, dots.data(),
                                 a_squared.data(), p_squared.data(), num, positions, size,
                                 metric};
  // One parallel region for both gradients, so that a thread finishing its share of one goes on
  // with the other instead of waiting at a barrier in between; under a competing process each
  // region costs a woken thread's wait at its start and, at its end, the last task of a thread
  // the competitor holds (benchmarks/NOTES.md, "The loaded clause judged per row"). The
  // prototype ranges first, one image's grad_x after: where the batch is larger than twice the
  // thread count (every benchmark shape), a range over every image is the longer task, and the
  // region ends on short ones. Each task writes its own outputs.
  //
  // grad_prototypes: a range of prototypes per task, images in order; each task packs every
  // image once, so x is read once per task. Two tasks per thread, so that a descheduled thread's
  // share can move. Not more: each task reads and packs all of x again, which at cub14 (12.8 MB)
  // costs more than its gather: 1, 4, 8 tasks per thread took 4.2, 9.3, 17.8 ms quiet there, and
  // in another run 2 against 4 took 5.7 against 9.6 ms quiet, 9.9 against 14.9 loaded
  // (benchmarks/NOTES.md, "Packing 1x1 windows as 8 x 8 blocks, ...").
  // grad_x: one image per task; its windows are packed, turned into their gradients in place and
  // folded back into the image's (D, H, W) gradient.
  const int64_t tasks = 2 * static_cast<int64_t>(at::get_num_threads());
  const int64_t per_task = std::max<int64_t>(kBackwardBlock, (num + tasks - 1) / tasks);
  const int64_t prototype_tasks =
      grad_prototypes != nullptr ? (num + per_task - 1) / per_task : 0;
  const int64_t image_tasks = grad_x != nullptr ? batch : 0;
  parallel_tasks(prototype_tasks + image_tasks, [&](auto&& take) {
    AlignedBuffer<acc_t> rows(image_elements), sum(size);
    std::vector<int64_t> order(num), starts(positions + 1);
    std::vector<double> p_coef(per_task);
    for (int64_t task; take(task);) {
      if (task >= prototype_tasks) {
        const int64_t b = task - prototype_tasks;
        pack_rows(x, map, b, 1, rows.data());
        image_row_gradients(in, b, rows.data(), order.data(), starts.data(), sum.data());
        fold_rows(rows.data(), map, grad_x + b * map.channels * map.height * map.width);
        continue;
      }
      const int64_t begin = task * per_task, end = std::min(begin + per_task, num);
      std::fill(p_coef.begin(), p_coef.end(), 0.0);
      std::fill(grad_prototypes + begin * size, grad_prototypes + end * size, acc_t(0));
      for (int64_t b = 0; b < batch; ++b) {
        pack_rows(x, map, b, 1, rows.data());
        add_image_to_prototype_gradients(in, b, rows.data(), begin, end, grad_prototypes,
                                         p_coef.data());
      }
      if (metric == Metric::kCosine)
        for (int64_t m = begin; m < end; ++m)
          add_scaled(grad_prototypes + m * size, p_coef[m - begin],
                     prototypes + m * size, size);
    }
  });
}

#define PK_INSTANTIATE(in_t, acc_t)                                                          \
  template void min_distance_backward<in_t, acc_t>(const acc_t*, const in_t*,                \
                                                   const FeatureMap&, const acc_t*, int64_t, \
                                                   const int64_t*, Metric, acc_t*, acc_t*);

PK_INSTANTIATE(float, float)
PK_INSTANTIATE(double, double)
PK_INSTANTIATE(c10::Half, float)
PK_INSTANTIATE(c10::BFloat16, float)

}  // namespace protokern::cpu
