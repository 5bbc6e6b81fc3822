// Launchers of protokern's CUDA kernels for nearest_prototypes, the reduction over prototypes
// (1x1 prototypes). Plain C++ over raw pointers, as min_distance_kernels.h (whose RowsView,
// ScalarKind, GemmPath and PairCoefficients they take); the glue is nearest_prototypes_cuda.cpp.
//
// Rows: x is B images of L rows (RowsView); row r = b * L + l is a window, image-major.
// values and indices are (B * L, k) contiguous: each row's k nearest prototypes, values
// ascending in the input's storage type (each the exact float32 distance at its pair), NaN
// first, ties to the lowest index; indices int64. Prototypes are one image of M <= 2^31 - 1
// rows; 1 <= k <= min(M, kNearestMaxK) (the glue checks both).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/min_distance_kernels.h"
#include "metric.h"

namespace protokern::cuda {

// The largest k: a row's k smallest upper bounds and its 32 candidate slots are spread over
// the 32 lanes of one warp, one of each per lane (nearest_prototypes_search_kernel.cu).
inline constexpr int64_t kNearestMaxK = 32;

// Forward, step 1 (x_sq, proto_sq from launch_squared_norms): per row, the GEMM tiles bound
// every distance, and the prototypes the bounds cannot rule out are recomputed directly; the
// first k by (exact distance, index) go to values / indices, and searched[r] = 0. A row the
// bounds cannot settle (more near-ties than candidate slots, or an inf, NaN or huge squared
// norm among its pairs) gets searched[r] = 1 and is left to step 2. searched: B * L bytes.
cudaError_t launch_nearest_prototypes_search(ScalarKind kind, GemmPath path, Metric metric,
                                             RowsView x, RowsView protos, const float* x_sq,
                                             const float* proto_sq, int64_t k, void* values,
                                             int64_t* indices, uint8_t* searched,
                                             cudaStream_t stream);

// Forward, step 2: every row with searched[r] != 0 against every prototype directly (no
// expansion), the first k by (exact distance, index) to values / indices.
cudaError_t launch_nearest_prototypes_direct_search(ScalarKind kind, Metric metric, RowsView x,
                                                    RowsView protos, int64_t k,
                                                    const uint8_t* searched, void* values,
                                                    int64_t* indices, cudaStream_t stream);

// Backward, step 1: coeffs (B * L, k), per pair (r, j) of prototype m = indices[r * k + j], the
// coefficients of grad_values[r * k + j] * distance(x[r], p[m]) (as in min_distance's
// backward). grad_values: (B * L, k) contiguous, in the input's storage type; indices must come
// from the forward (every entry in [0, M)).
cudaError_t launch_nearest_pair_coefficients(ScalarKind kind, Metric metric, RowsView x,
                                             RowsView protos, int64_t k, const int64_t* indices,
                                             const void* grad_values, PairCoefficients* coeffs,
                                             cudaStream_t stream);

// Backward, step 2: grad_rows (B * L, K) float32, contiguous, fully written: each row sums its
// k pairs in order j = 0..k-1 (deterministic, no atomics).
cudaError_t launch_nearest_row_gradient(ScalarKind kind, Metric metric, RowsView x,
                                        RowsView protos, int64_t k, const int64_t* indices,
                                        const PairCoefficients* coeffs, float* grad_rows,
                                        cudaStream_t stream);

// Backward, step 3: grad_protos (M, K) float32, contiguous, fully written. deterministic: the
// pairs bucketed by prototype, `order` (B * L * k pair numbers r * k + j, by prototype, then
// increasing) and `starts` (M + 1: bucket m is order[starts[m] .. starts[m + 1])), each
// prototype summing its bucket in order; workspace: B * L * k int64s. Otherwise float atomics
// (faster, summation order varies between runs; order, starts and workspace unused, may be
// null).
cudaError_t launch_nearest_prototype_gradient(ScalarKind kind, Metric metric, bool deterministic,
                                              RowsView x, RowsView protos, int64_t k,
                                              const int64_t* indices,
                                              const PairCoefficients* coeffs,
                                              const int64_t* order, const int64_t* starts,
                                              int64_t* workspace, float* grad_protos,
                                              cudaStream_t stream);

}  // namespace protokern::cuda
