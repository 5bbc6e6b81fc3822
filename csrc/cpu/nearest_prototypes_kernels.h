// Entry points of protokern's CPU kernels for nearest_prototypes, the reduction over prototypes:
// nearest_prototypes_forward (nearest_prototypes_forward_kernel.cpp) and
// nearest_prototypes_backward (nearest_prototypes_backward_kernel.cpp). The glue in
// nearest_prototypes_cpu.cpp checks the tensors and hands the kernels raw pointers.
//
// Shapes: x and prototypes as in min_distance_kernels.h; rows are the B * L windows of x
// (image-major, positions row-major), and values/indices are (B * L, k) contiguous, the k
// nearest prototypes of each row ascending (NaN first, ties to the lowest index).
#pragma once

#include <cstdint>

#include "cpu/min_distance_kernels.h"
#include "metric.h"

namespace protokern::cpu {

// The k nearest prototypes of every row, exact: GEMM tiles bound every distance (as in
// min_distance), only the prototypes the bounds cannot rule out are recomputed directly, and
// the first k by (exact distance, index) win. `input_rounding` as in min_distance_forward.
template <typename in_t, typename acc_t>
void nearest_prototypes_forward(const in_t* x, const FeatureMap& map, const acc_t* prototypes,
                                int64_t num_prototypes, int64_t k, Metric metric,
                                double input_rounding, acc_t* values, int64_t* indices);

// Gradients of sum(grad_values * values) through the chosen pairs (grad_values, indices:
// (B * L, k) contiguous). grad_x (B, D, H, W) and grad_prototypes (M, K) contiguous, acc_t,
// each fully written or skipped when null. Deterministic whatever the thread count: each row
// sums its k pairs in order, each prototype its pairs in row order.
template <typename in_t, typename acc_t>
void nearest_prototypes_backward(const acc_t* grad_values, const in_t* x, const FeatureMap& map,
                                 const acc_t* prototypes, int64_t num_prototypes, int64_t k,
                                 const int64_t* indices, Metric metric, acc_t* grad_x,
                                 acc_t* grad_prototypes);

}  // namespace protokern::cpu
