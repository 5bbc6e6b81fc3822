// The CPU backward kernel of min_distance: gradients through the selected positions only,
// reading nothing of the forward but its indices.
//
// The selected windows are gathered from windows packed one image at a time per thread. grad_x:
// per image, each window sums the terms of the prototypes that chose it, in prototype order, then
// the windows are folded back into the image. grad_prototypes: per range of prototypes, the terms
// of the images in image order. So every sum has one order whatever the thread count. With one
// position per image (tokens, or a window as large as the map) every pair is selected and the
// gradient is two dense BLAS products instead (single_position_backward).
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
#include "cpu/packed_gemm.h"
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

// out (n, K) = 2 sum_j W_ij (u_i - v_j), computed by BLAS as 2 (rowsum(W) u - W V): that form
// cancels where a pair's u_i and v_j nearly coincide and its weight dwarfs the others' (the
// euclidean metric's chain factor 1 / (2 sqrt(d + eps)) is 5e6 at a copy: grad_x was 66% off in
// float32). A row whose products' magnitude, 2 sum_j |W_ij| (|u_i| + |v_j|), is more than
// 1 / (4096 eps) times its result's norm (2048 in float32) is summed again from the differences,
// 2 W_i (u_i - V), which cannot cancel; usually no row is.
// `magnitude_weights` is |W| (taken once by the caller for both gradients: 20% of the
// cil_vectors backward went to taking it four times).
template <typename acc_t>
void resum_cancelled_rows(at::Tensor& out, const at::Tensor& weights,
                          const at::Tensor& magnitude_weights, const at::Tensor& u,
                          const at::Tensor& v) {
  const at::Tensor magnitude = 2 * (magnitude_weights.sum(1) * u.norm(2, 1) +
                                    at::mv(magnitude_weights, v.norm(2, 1)));
  const double limit = 1.0 / (4096 * std::numeric_limits<acc_t>::epsilon());
  const at::Tensor cancelled = (magnitude > limit * out.norm(2, 1)).nonzero().flatten();
  const auto rows = cancelled.accessor<int64_t, 1>();
  for (int64_t j = 0; j < rows.size(0); ++j) {
    const int64_t i = rows[j];
    out[i].copy_(at::mv((u[i].unsqueeze(0) - v).t(), weights[i]).mul_(2));
  }
}

// a (n, d) @ b (d, c), float32 through the packed GEMM's product where the float32 tiles use it
// (packed_gemm.h) and b's rows are contiguous, through BLAS otherwise.
at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat || b.stride(1) != 1 ||
      !use_packed_gemm())
    return at::mm(a, b);
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  packed_matmul(a.const_data_ptr<float>(), a.stride(0), a.stride(1), b.const_data_ptr<float>(),
                b.stride(0), a.size(0), a.size(1), b.size(1), out.mutable_data_ptr<float>());
  return out;
}

// One position per image: every (image, prototype) pair is selected, so the gather/scatter of the
// general backward is a pair of dense products, which BLAS runs far faster (why through ATen:
// see min_distance_kernels.h). With rows A (B, K), prototypes P (M, K) and G = grad_values:
//   sqeuclidean: grad_a = 2 (rowsum(G) a - G P),  grad_p = 2 (colsum(G) p - G^T A) (the rows
//                that cancel summed again: resum_cancelled_rows);
//   cosine: with C = A P^T, S = G / (|a| |p|) (norms floored) and the floor's zero gradient,
//           grad_a = rowsum(S C / |a|^2) a - S P,  grad_p = colsum(S C / |p|^2) p - S^T A;
//   dot:    grad_a = -G P,  grad_p = -G^T A.
// The products through `product`. Deterministic for a given thread count (BLAS splits its output,
// not its sums, across threads; the packed product whatever the count).
template <typename in_t, typename acc_t>
void single_position_backward(const acc_t* grad_values, const in_t* x, const FeatureMap& map,
                              const acc_t* prototypes, int64_t num, Metric metric,
                              acc_t* grad_x, acc_t* grad_prototypes) {
  const auto acc = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t batch = map.batch, size = map.row_size();
  const at::Tensor grad = at::from_blob(const_cast<acc_t*>(grad_values), {batch, num}, acc);
  const at::Tensor protos = at::from_blob(const_cast<acc_t*>(prototypes), {num, size}, acc);
  const at::Tensor rows =
      at::from_blob(const_cast<in_t*>(x), {batch, map.channels, map.height, map.width},
                    {map.stride_b, map.stride_c, map.stride_h, map.stride_w},
                    at::TensorOptions().dtype(c10::CppTypeToScalarType<in_t>::value))
          .reshape({batch, size})
          .to(acc.dtype());
  at::Tensor grad_rows, grad_protos;  // undefined where not needed
  if (grad_x != nullptr) grad_rows = at::from_blob(grad_x, {batch, size}, acc);
  if (grad_prototypes != nullptr) grad_protos = at::from_blob(grad_prototypes, {num, size}, acc);
  if (metric == Metric::kSqEuclidean) {
    const at::Tensor magnitude_grad = grad.abs();
    if (grad_rows.defined()) {
      at::sub_out(grad_rows, grad.sum(1, true) * rows, product(grad, protos)).mul_(2);
      resum_cancelled_rows<acc_t>(grad_rows, grad, magnitude_grad, rows, protos);
    }
    if (grad_protos.defined()) {
      at::sub_out(grad_protos, grad.sum(0).unsqueeze(1) * protos, product(grad.t(), rows))
          .mul_(2);
      resum_cancelled_rows<acc_t>(grad_protos, grad.t(), magnitude_grad.t(), protos, rows);
    }
    return;
  }
  if (metric == Metric::kDot) {
    if (grad_rows.defined()) grad_rows.copy_(product(grad, protos)).neg_();
    if (grad_protos.defined()) grad_protos.copy_(product(grad.t(), rows)).neg_();
    return;
  }
  // float32 norms of entries past ~1e18 overflow when squared (NaN gradients): take such
  // inputs in double, as the scatter path takes its coefficients.
  const double largest = std::max(rows.numel() ? rows.abs().max().item<double>() : 0.0,
                                  protos.numel() ? protos.abs().max().item<double>() : 0.0);
  const bool wide = std::is_same_v<acc_t, float> && largest * std::sqrt(double(size)) > 1e18;
  const at::Tensor r = wide ? rows.to(at::kDouble) : rows;
  const at::Tensor p = wide ? protos.to(at::kDouble) : protos;
  const at::Tensor g = wide ? grad.to(at::kDouble) : grad;
  const at::Tensor row_norm = r.norm(2, 1, true);          // (B, 1)
  const at::Tensor proto_norm = p.norm(2, 1, true).t();  // (1, M)
  const at::Tensor row_bound = row_norm.clamp_min(kNormFloor);
  const at::Tensor proto_bound = proto_norm.clamp_min(kNormFloor);
  const at::Tensor scale = g / (row_bound * proto_bound);  // (B, M)
  const at::Tensor scaled_dots = scale * at::mm(r, p.t());
  if (grad_rows.defined()) {
    const at::Tensor row_coef =
        at::where(row_norm >= kNormFloor, (scaled_dots / row_bound.square()).sum(1, true), 0);
    grad_rows.copy_(row_coef * r - product(scale, p));
  }
  if (grad_protos.defined()) {
    const at::Tensor proto_coef =
        at::where(proto_norm.t() >= kNormFloor,
                  (scaled_dots / proto_bound.square()).sum(0).unsqueeze(1), 0);
    grad_protos.copy_(proto_coef * p - product(scale.t(), r));
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
    at::parallel_for(0, num, 16, [&](int64_t begin, int64_t end) {
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
  // grad_x, one image per step: its windows are packed, turned into their gradients in place
  // and folded back into the image's (D, H, W) gradient.
  if (grad_x != nullptr) parallel_tasks(batch, [&](auto&& take) {
    AlignedBuffer<acc_t> rows(image_elements), sum(size);
    std::vector<int64_t> order(num), starts(positions + 1);
    for (int64_t b; take(b);) {
      pack_rows(x, map, b, 1, rows.data());
      image_row_gradients(in, b, rows.data(), order.data(), starts.data(), sum.data());
      fold_rows(rows.data(), map, grad_x + b * map.channels * map.height * map.width);
    }
  });
  // grad_prototypes, a range of prototypes per thread, images in order: each thread packs every
  // image once (x is read once per thread, which costs far less than the gather itself).
  if (grad_prototypes == nullptr) return;
  // Four tasks per thread, so that a descheduled thread's share can move (each task packs x
  // once more: a few percent of the gather).
  const int64_t per_task = std::max<int64_t>(
      kBackwardBlock, (num + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads()));
  parallel_tasks((num + per_task - 1) / per_task, [&](auto&& take) {
    AlignedBuffer<acc_t> rows(image_elements);
    std::vector<double> p_coef(per_task);
    for (int64_t block; take(block);) {
      const int64_t begin = block * per_task, end = std::min(begin + per_task, num);
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
