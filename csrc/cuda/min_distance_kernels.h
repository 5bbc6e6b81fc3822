// Launchers of protokern's CUDA kernels for min_distance (1x1 prototypes).
//
// Plain C++ over raw pointers, sizes, strides and a cudaStream_t: no PyTorch header, so the .cu
// files compile with bare nvcc (CI checks them on machines without a GPU) and the glue in
// min_distance_cuda.cpp is the only file that sees tensors.
//
// Data model: a feature map (B, D, H, W) with 1x1 prototypes is B images of L = H*W rows of
// K = D channels; prototypes (M, D) are one "image" of M rows. Channels are contiguous within a
// row (the glue makes them so); rows and images have arbitrary strides, in elements, as int64.
//
// Every launcher returns the first CUDA error it met (cudaSuccess otherwise), after checking the
// launch with cudaGetLastError; the glue turns an error into a Python exception naming the kernel
// and the shapes. Sizes are int64 and offsets are computed in int64: B*L*K can exceed 2^31.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "metric.h"

namespace protokern::cuda {

// The storage type of x, prototypes, values and grad_values; accumulation is always float32.
enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// How the search GEMM runs: kTensorCore is WMMA (float16/bfloat16 inputs, or TF32 for float32
// inputs, which the glue picks only when PyTorch's float32 matmul precision allows TF32) and
// needs sm_80 or newer; kTensorCoreSplit (float32 only) is WMMA on TF32 three times, each
// operand split into a TF32 head and a TF32 tail (head x head + head x tail + tail x head), about
// float32's precision: min_distance's search takes it where TF32 is allowed, so that its values
// are as good as exact products' and the recompute touches only the pairs whose expansion
// cancelled; kSimt is exact float32 FMAs on any GPU.
enum class GemmPath : int { kSimt = 0, kTensorCore = 1, kTensorCoreSplit = 2 };

// A batch of row matrices: row r of image b starts at data + b*image_stride + r*row_stride
// (elements) and holds `dim` contiguous values.
struct RowsView {
  const void* data;
  int64_t num_images;
  int64_t rows_per_image;
  int64_t image_stride;
  int64_t row_stride;
  int64_t dim;
};

// |row|^2 in float32 for every row of every image, in a fixed summation order (identical rows
// get identical norms, so exact ties stay ties). out: num_images * rows_per_image floats.
cudaError_t launch_squared_norms(ScalarKind kind, RowsView rows, float* out, cudaStream_t stream);

// The fused search: for every image b and prototype m, the position l minimising the distance
// computed by the GEMM expansion from x_sq/proto_sq (from launch_squared_norms) and the dot
// products. Pairs where a norm is not finite (an inf or NaN entry) are computed directly instead,
// so inf - inf never appears. Writes best[b*M + m] = (order key of the distance << 32) | l, the
// minimum over positions of that packed key: NaN sorts first, ties go to the lowest l. best is
// (B, M) uint64; it is initialised here. x: B images of L rows; protos: 1 image of M rows.
cudaError_t launch_min_distance_search(ScalarKind kind, GemmPath path, Metric metric, RowsView x,
                                       RowsView protos, const float* x_sq, const float* proto_sq,
                                       unsigned long long* best, cudaStream_t stream);

// The exact float32 distance at the chosen position: values (B, M) in the input's storage type,
// indices (B, M) int64 (the position l of best). from_search: the search's products were exact
// (no TF32), so a pair whose searched value is as good as a direct sum (see the kernel) keeps
// it and reads only x_sq and proto_sq (from launch_squared_norms) instead of its rows.
cudaError_t launch_min_distance_recompute(ScalarKind kind, Metric metric, RowsView x,
                                          RowsView protos, const unsigned long long* best,
                                          bool from_search, const float* x_sq,
                                          const float* proto_sq, void* values,
                                          int64_t* indices, cudaStream_t stream);

// Per (b, m), the coefficients of the gradient of grad_values[b, m] * distance(x[b, l], p[m])
// (l = indices[b, m]):
//   d/dx[b, l] = row_self x[b, l] + cross p[m]      d/dp[m] = proto_self p[m] + cross x[b, l].
// Double: cosine's ~ g / |v|^2 underflows float32 where |v|^2 overflows it (norms past ~1.8e19).
// For sqeuclidean (row_self = proto_self = -cross = 2 g) the kernels take the difference
// first, 2 g (x - p), which stays exact where x and p nearly coincide.
struct PairCoefficients {
  double row_self;
  double cross;
  double proto_self;
};

// Backward, step 1: coeffs (B, M). grad_values: (B, M) contiguous, in the input's storage type.
cudaError_t launch_selected_pair_coefficients(ScalarKind kind, Metric metric, RowsView x,
                                              RowsView protos, const int64_t* indices,
                                              const void* grad_values, PairCoefficients* coeffs,
                                              cudaStream_t stream);

// Backward, step 2: grad_protos (M, K) float32, contiguous: a gather over the images in the
// order b = 0..B-1 (deterministic).
cudaError_t launch_prototype_gradient(ScalarKind kind, Metric metric, RowsView x, RowsView protos,
                                      const int64_t* indices, const PairCoefficients* coeffs,
                                      float* grad_protos, cudaStream_t stream);

// Backward, step 3: grad_rows (B, L, K) float32, contiguous, zeroed or filled here.
// deterministic: a stable counting sort of the prototypes of each image by chosen position
// (workspace: row_gradient_workspace_elements int32s), then every (b, l) sums the contributions
// of the prototypes that chose it in increasing m. Otherwise: float atomics (faster, summation
// order varies between runs; workspace unused, may be null). indices must come from the
// forward: every entry in [0, L).
cudaError_t launch_row_gradient(ScalarKind kind, Metric metric, bool deterministic, RowsView x,
                                RowsView protos, const int64_t* indices,
                                const PairCoefficients* coeffs, int32_t* workspace,
                                float* grad_rows, cudaStream_t stream);

// int32 entries of the deterministic row gradient's workspace: per image, the L + 1 bucket
// starts, L fill cursors and the M prototypes sorted by position.
inline int64_t row_gradient_workspace_elements(int64_t images, int64_t positions,
                                               int64_t protos) {
  return images * (2 * positions + 1 + protos);
}

}  // namespace protokern::cuda
