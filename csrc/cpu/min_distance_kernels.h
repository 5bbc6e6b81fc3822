// Entry points of protokern's CPU kernels for min_distance: min_distance_forward
// (min_distance_forward_kernel.cpp) and min_distance_backward (min_distance_backward_kernel.cpp).
// The glue in min_distance_cpu.cpp is the only file that reads tensors: it checks them,
// allocates the outputs and hands the kernels raw pointers, sizes and strides.
//
// Where the kernels call ATen: PyTorch's BLAS is reachable only through ATen (libtorch_cpu does
// not export cpublas::gemm's float overloads), so two kernels wrap their own memory in tensors
// (at::from_blob) and call ATen ops on it: the forward's GEMM tiles where the host keeps
// PyTorch's BLAS (RowsGemm in gemm_tiles.h, at::mm_out), and the backward with one position per
// image (single_position_backward.cpp), where every pair is selected and the whole gradient is
// two dense products. That ATen BLAS is also the one that honours torch's thread count and
// float32 matmul precision. This is the one place that says so; those functions refer here.
//
// Shapes follow the canonical forms of protokern/backends/reference.py:
//   x           (B, D, H, W) with arbitrary element strides
//   prototypes  (M, K) contiguous, K = D * ph * pw, ordered (channel, window row, window col)
//   windows     valid, stride 1: H' = H - ph + 1, W' = W - pw + 1, L = H' * W'
//   values      (B, M) contiguous; indices (B, M) int64, flat over H' x W' (row-major)
//
// `in_t` is the element type of x (float, double, at::Half, at::BFloat16); `acc_t` the type the
// GEMM runs in (double for double inputs, float otherwise).
#pragma once

#include <cstdint>

#include "metric.h"

namespace protokern::cpu {

struct FeatureMap {
  int64_t batch, channels, height, width;
  int64_t stride_b, stride_c, stride_h, stride_w;  // in elements
  int64_t patch_h, patch_w;                         // window size (the prototypes' ph, pw)

  int64_t out_h() const { return height - patch_h + 1; }
  int64_t out_w() const { return width - patch_w + 1; }
  int64_t positions() const { return out_h() * out_w(); }
  int64_t row_size() const { return channels * patch_h * patch_w; }
};

// values/indices of the min over positions. `input_rounding` is the relative rounding the GEMM
// may apply to its float32 inputs (TF32/bf16 settings), widening the shortlist bound.
template <typename in_t, typename acc_t>
void min_distance_forward(const in_t* x, const FeatureMap& map, const acc_t* prototypes,
                          int64_t num_prototypes, Metric metric, double input_rounding,
                          acc_t* values, int64_t* indices);

// min_distance_forward's case of one position per image (single_position_forward.cpp), which
// min_distance_forward does not take: every pair's distance, from one blocked GEMM into
// `values`. Same arguments, less the indices: every one is 0, and the caller provides them.
template <typename in_t, typename acc_t>
void single_position_forward(const in_t* x, const FeatureMap& map, const acc_t* prototypes,
                             int64_t num, Metric metric, double input_rounding, acc_t* values);

// The k smallest distances over positions (topk_distance_forward_kernel.cpp): values/indices
// (B, M, k) contiguous, ascending, a NaN first, ties to the lowest position; 1 <= k <= L. Its
// backward is min_distance_backward on k copies of each prototype (protokern/backends/cpu.py).
template <typename in_t, typename acc_t>
void topk_distance_forward(const in_t* x, const FeatureMap& map, const acc_t* prototypes,
                           int64_t num_prototypes, Metric metric, double input_rounding,
                           int64_t k, acc_t* values, int64_t* indices);

// Gradients of sum(grad_values * values) through the selected positions only.
// grad_values (B, M) contiguous; grad_x is (B, D, H, W) contiguous, grad_prototypes (M, K)
// contiguous, both acc_t; each is fully written, or skipped when null (a gradient nobody asked
// for). Deterministic: every sum runs in a fixed order whatever the thread count; with one
// position per image (BLAS products), for a given thread count.
template <typename in_t, typename acc_t>
void min_distance_backward(const acc_t* grad_values, const in_t* x, const FeatureMap& map,
                           const acc_t* prototypes, int64_t num_prototypes,
                           const int64_t* indices, Metric metric, acc_t* grad_x,
                           acc_t* grad_prototypes);

// min_distance_backward's case of one position per image (single_position_backward.cpp): every
// pair is selected, and the gradients are two dense products. Same arguments, less the indices.
template <typename in_t, typename acc_t>
void single_position_backward(const acc_t* grad_values, const in_t* x, const FeatureMap& map,
                              const acc_t* prototypes, int64_t num, Metric metric,
                              acc_t* grad_x, acc_t* grad_prototypes);

}  // namespace protokern::cpu
