// The CPU backward of min_distance with one position per image (tokens L = 1, or a window as
// large as the map): every (image, prototype) pair is selected, so the gather/scatter of the
// general backward (min_distance_backward_kernel.cpp) becomes two dense products. With rows
// A (B, K), prototypes P (M, K) and G = grad_values (B, M):
//   sqeuclidean: grad_a = 2 (rowsum(G) a - G P),  grad_p = 2 (colsum(G) p - G^T A), the rows
//                that cancel summed again from their differences;
//   cosine: with C = A P^T, S = G / (|a| |p|) (norms floored) and the floor's zero gradient,
//           grad_a = rowsum(S C / |a|^2) a - S P,  grad_p = colsum(S C / |p|^2) p - S^T A;
//   dot:    grad_a = -G P,  grad_p = -G^T A.
// The products are written straight into the gradients, and the squared-Euclidean metric's sums
// of G come from one pass over it (weight_sums): at the cil_vectors shape G is 41 MB, and the
// passes of whole-matrix ATen ops (|G|, its sums, the temporaries they allocate) had cost as much
// as one of the products (benchmarks/NOTES.md, "The one-position backward").
// Deterministic for a given thread count (BLAS splits its output, not its sums, across threads;
// the packed product and weight_sums whatever the count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/cpu_utils.h"
#include "cpu/exact_distance.h"
#include "cpu/min_distance_kernels.h"
#include "cpu/packed_gemm.h"
#include "metric.h"

namespace protokern::cpu {
namespace {

// out (n, c) = a (n, d) @ b (d, c), out contiguous: float32 through the packed GEMM's product
// where the float32 tiles use it (packed_gemm.h) and b's rows are contiguous, through BLAS
// otherwise (see min_distance_kernels.h for why ATen's).
void product_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat || b.stride(1) != 1 ||
      !use_packed_gemm()) {
    at::mm_out(out, a, b);
    return;
  }
  packed_matmul(a.const_data_ptr<float>(), a.stride(0), a.stride(1), b.const_data_ptr<float>(),
                b.stride(0), a.size(0), a.size(1), b.size(1), out.mutable_data_ptr<float>());
}

at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  product_into(out, a, b);
  return out;
}

using Double4 = VectorOf<double>::Values;

// Four consecutive values as doubles (through an argument, not a return value: a 256-bit vector
// returned from a function compiled for baseline x86-64 would change its ABI).
template <typename acc_t>
PK_INLINE void load4(const acc_t* p, Double4& v) {
  if constexpr (std::is_same_v<acc_t, float>) {
    typedef float Float4 __attribute__((vector_size(16)));
    Float4 f;
    std::memcpy(&f, p, sizeof f);
    v = __builtin_convertvector(f, Double4);
  } else {
    std::memcpy(&v, p, sizeof v);
  }
}

PK_INLINE double horizontal_sum(const Double4& v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// What the squared-Euclidean gradients need of W (n x m, row-major) beside the products: per row
// i, sum_j W_ij and the cancellation screen's sum_j |W_ij| and sum_j |W_ij| |v_j|; per column j,
// the same over i with |u_i|. Double sums.
struct WeightSums {
  std::vector<double> row_sum, row_abs, row_abs_norm;  // (n)
  std::vector<double> col_sum, col_abs, col_abs_norm;  // (m)
};

// Columns [c0, c1) of W over every row: the columns' sums into sums (whole), the rows' partial
// sums over these columns into partial (3 n: sum, |.|, |.| |v|).
template <typename acc_t>
PK_VECTOR_CLONES void weight_column_block(const acc_t* w, int64_t n, int64_t m, int64_t c0,
                                          int64_t c1, const double* u_norm,
                                          const double* v_norm, WeightSums& sums,
                                          double* partial) {
  double* col_sum = sums.col_sum.data();
  double* col_abs = sums.col_abs.data();
  double* col_abs_norm = sums.col_abs_norm.data();
  const int64_t vector_end = c0 + (c1 - c0) / 4 * 4;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* row = w + i * m;
    const double u = u_norm[i];
    Double4 s = {0, 0, 0, 0}, a = s, an = s;
    for (int64_t j = c0; j < vector_end; j += 4) {
      Double4 g;
      load4(row + j, g);
      const Double4 mag = g < 0 ? -g : g;
      Double4 v;
      std::memcpy(&v, v_norm + j, sizeof v);
      s += g;
      a += mag;
      an += mag * v;
      Double4 cs, ca, cn;
      std::memcpy(&cs, col_sum + j, sizeof cs);
      std::memcpy(&ca, col_abs + j, sizeof ca);
      std::memcpy(&cn, col_abs_norm + j, sizeof cn);
      cs += g;
      ca += mag;
      cn += mag * u;
      std::memcpy(col_sum + j, &cs, sizeof cs);
      std::memcpy(col_abs + j, &ca, sizeof ca);
      std::memcpy(col_abs_norm + j, &cn, sizeof cn);
    }
    double rs = horizontal_sum(s), ra = horizontal_sum(a), rn = horizontal_sum(an);
    for (int64_t j = vector_end; j < c1; ++j) {
      const double g = row[j], mag = std::abs(g);
      rs += g;
      ra += mag;
      rn += mag * v_norm[j];
      col_sum[j] += g;
      col_abs[j] += mag;
      col_abs_norm[j] += mag * u;
    }
    partial[i] = rs;
    partial[n + i] = ra;
    partial[2 * n + i] = rn;
  }
}

// One pass over W, parallel over a fixed split of its columns (at most 16 blocks, so that the
// rows' partial sums stay small; tasks from a shared counter), the rows' sums then added block by
// block in order: the same sums whatever the thread count.
template <typename acc_t>
WeightSums weight_sums(const acc_t* w, int64_t n, int64_t m, const double* u_norm,
                       const double* v_norm) {
  WeightSums sums;
  sums.row_sum.assign(n, 0.0), sums.row_abs.assign(n, 0.0), sums.row_abs_norm.assign(n, 0.0);
  sums.col_sum.assign(m, 0.0), sums.col_abs.assign(m, 0.0), sums.col_abs_norm.assign(m, 0.0);
  const int64_t width = std::max<int64_t>(256, ((m + 15) / 16 + 3) / 4 * 4);
  const int64_t blocks = (m + width - 1) / width;
  std::vector<double> partial(blocks * 3 * n);
  parallel_tasks(blocks, [&](auto&& take) {
    for (int64_t block; take(block);)
      weight_column_block(w, n, m, block * width, std::min(m, (block + 1) * width), u_norm,
                          v_norm, sums, partial.data() + block * 3 * n);
  });
  for (int64_t block = 0; block < blocks; ++block) {
    const double* p = partial.data() + block * 3 * n;
    for (int64_t i = 0; i < n; ++i) {
      sums.row_sum[i] += p[i];
      sums.row_abs[i] += p[n + i];
      sums.row_abs_norm[i] += p[2 * n + i];
    }
  }
  return sums;
}

// Norms of rows [begin, end) in double, for the screen.
template <typename acc_t>
PK_VECTOR_CLONES void row_norms(const acc_t* rows, int64_t begin, int64_t end, int64_t size,
                                double* out) {
  const int64_t vector_end = size / 4 * 4;
  for (int64_t i = begin; i < end; ++i) {
    const acc_t* row = rows + i * size;
    Double4 s = {0, 0, 0, 0};
    for (int64_t k = 0; k < vector_end; k += 4) {
      Double4 v;
      load4(row + k, v);
      s += v * v;
    }
    double total = horizontal_sum(s);
    for (int64_t k = vector_end; k < size; ++k) total += double(row[k]) * row[k];
    out[i] = std::sqrt(total);
  }
}

// Rows [begin, end) of out (n, K), holding W V, become 2 (rowsum(W)_i u_i - (W V)_i);
// out_norm[i] the row's norm. (The loops over rows run in the vector clones: parallel_chunks'
// lambdas are not cloned, so they only call these.)
template <typename acc_t>
PK_VECTOR_CLONES void finish_rows(acc_t* out, const acc_t* u, int64_t begin, int64_t end,
                                  int64_t size, const double* weight_sum, double* out_norm) {
  const int64_t vector_end = size / 4 * 4;
  for (int64_t i = begin; i < end; ++i) {
    acc_t* o = out + i * size;
    const acc_t* ui = u + i * size;
    const acc_t r = static_cast<acc_t>(weight_sum[i]);
    for (int64_t k = 0; k < size; ++k) o[k] = 2 * (r * ui[k] - o[k]);
    Double4 s = {0, 0, 0, 0};
    for (int64_t k = 0; k < vector_end; k += 4) {
      Double4 v;
      load4(o + k, v);
      s += v * v;
    }
    double total = horizontal_sum(s);
    for (int64_t k = vector_end; k < size; ++k) total += double(o[k]) * o[k];
    out_norm[i] = std::sqrt(total);
  }
}

// The expansion 2 sum_j W_ij (u_i - v_j) = 2 (rowsum(W) u - W V) cancels where a pair's u_i and
// v_j nearly coincide and its weight dwarfs the others' (the euclidean metric's chain factor
// 1 / (2 sqrt(d + eps)) is 5e6 at a copy: grad_x was 66% off in float32). A row whose products'
// magnitude, 2 (sum_j |W_ij| |u_i| + sum_j |W_ij| |v_j|), is more than 1 / (4096 eps) times its
// result's norm (2048 in float32) is summed again from the differences, 2 W_i (u_i - V), which
// cannot cancel; usually no row is. `weights` is W as a tensor (rows of it: W_i).
template <typename acc_t>
void resum_cancelled_rows(at::Tensor& out, const at::Tensor& weights, const at::Tensor& u,
                          const at::Tensor& v, const std::vector<double>& abs_sum,
                          const std::vector<double>& abs_norm_sum, const double* u_norm,
                          const double* out_norm) {
  const double limit = 1.0 / (4096 * std::numeric_limits<acc_t>::epsilon());
  for (int64_t i = 0; i < out.size(0); ++i) {
    const double magnitude = 2 * (abs_sum[i] * u_norm[i] + abs_norm_sum[i]);
    if (magnitude > limit * out_norm[i])  // false for NaN: nothing to save there
      out[i].copy_(at::mv((u[i].unsqueeze(0) - v).t(), weights[i]).mul_(2));
  }
}

template <typename acc_t>
void squared_euclidean_gradients(const at::Tensor& grad, const at::Tensor& rows,
                                 const at::Tensor& protos, at::Tensor& grad_rows,
                                 at::Tensor& grad_protos) {
  const int64_t batch = rows.size(0), num = protos.size(0), size = rows.size(1);
  std::vector<double> row_norm(batch), proto_norm(num);
  parallel_chunks(0, batch, 64, [&](int64_t begin, int64_t end) {
    row_norms(rows.const_data_ptr<acc_t>(), begin, end, size, row_norm.data());
  });
  parallel_chunks(0, num, 64, [&](int64_t begin, int64_t end) {
    row_norms(protos.const_data_ptr<acc_t>(), begin, end, size, proto_norm.data());
  });
  const WeightSums sums =
      weight_sums(grad.const_data_ptr<acc_t>(), batch, num, row_norm.data(), proto_norm.data());
  if (grad_rows.defined()) {
    product_into(grad_rows, grad, protos);
    std::vector<double> out_norm(batch);
    parallel_chunks(0, batch, 16, [&](int64_t begin, int64_t end) {
      finish_rows(grad_rows.mutable_data_ptr<acc_t>(), rows.const_data_ptr<acc_t>(), begin, end,
                  size, sums.row_sum.data(), out_norm.data());
    });
    resum_cancelled_rows<acc_t>(grad_rows, grad, rows, protos, sums.row_abs, sums.row_abs_norm,
                                row_norm.data(), out_norm.data());
  }
  if (grad_protos.defined()) {
    product_into(grad_protos, grad.t(), rows);
    std::vector<double> out_norm(num);
    parallel_chunks(0, num, 16, [&](int64_t begin, int64_t end) {
      finish_rows(grad_protos.mutable_data_ptr<acc_t>(), protos.const_data_ptr<acc_t>(), begin,
                  end, size, sums.col_sum.data(), out_norm.data());
    });
    resum_cancelled_rows<acc_t>(grad_protos, grad.t(), protos, rows, sums.col_abs,
                                sums.col_abs_norm, proto_norm.data(), out_norm.data());
  }
}

}  // namespace

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
          .to(acc.dtype())
          .contiguous();
  at::Tensor grad_rows, grad_protos;  // undefined where not needed
  if (grad_x != nullptr) grad_rows = at::from_blob(grad_x, {batch, size}, acc);
  if (grad_prototypes != nullptr) grad_protos = at::from_blob(grad_prototypes, {num, size}, acc);
  if (metric == Metric::kSqEuclidean) {
    squared_euclidean_gradients<acc_t>(grad, rows, protos, grad_rows, grad_protos);
    return;
  }
  if (metric == Metric::kDot) {
    if (grad_rows.defined()) product_into(grad_rows, grad, protos), grad_rows.neg_();
    if (grad_protos.defined()) product_into(grad_protos, grad.t(), rows), grad_protos.neg_();
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

#define PK_INSTANTIATE(in_t, acc_t)                                                          \
  template void single_position_backward<in_t, acc_t>(const acc_t*, const in_t*,             \
                                                      const FeatureMap&, const acc_t*,       \
                                                      int64_t, Metric, acc_t*, acc_t*);

PK_INSTANTIATE(float, float)
PK_INSTANTIATE(double, double)
PK_INSTANTIATE(c10::Half, float)
PK_INSTANTIATE(c10::BFloat16, float)

}  // namespace protokern::cpu
