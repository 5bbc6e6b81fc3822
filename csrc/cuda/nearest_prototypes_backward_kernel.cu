// Backward of nearest_prototypes from the saved indices: only the k chosen pairs (r, j) of each
// row r (window) carry gradient, with prototype m = indices[r * k + j]. Per pair, the gradient
// is a combination of the row and the prototype (coefficients and numerics: pair_gradients.cuh,
// as min_distance's backward). The rows' gradient sums each row's k pairs in order; the
// prototypes' gradient gathers each prototype's pairs in the order of a stable bucketing by
// prototype (deterministic), or adds them with float atomics.
#include "cuda/nearest_prototypes_kernels.h"
#include "cuda/pair_gradients.cuh"

namespace protokern::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kWarpThreads = kWarpsPerBlock * kWarpSize;

template <typename T>
__device__ __forceinline__ const T* row_of(const RowsView& x, int64_t row) {
  const int64_t image = row / x.rows_per_image;
  return row_pointer<T>(x, image, row - image * x.rows_per_image);
}

// One warp per pair: coefficients of grad_values[pair] * distance(x[r], p[m]).
template <typename T>
__global__ void __launch_bounds__(kWarpThreads)
    nearest_pair_coefficients_kernel(Metric metric, RowsView x, RowsView protos, int64_t k,
                                     const int64_t* __restrict__ indices,
                                     const T* __restrict__ grad_values,
                                     PairCoefficients* __restrict__ coeffs) {
  const int64_t pair = (static_cast<int64_t>(blockIdx.x) * kWarpThreads + threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  if (pair >= x.num_images * x.rows_per_image * k) {
    return;  // uniform across the warp
  }
  const double grad = to_float(grad_values[pair]);
  if (metric == Metric::kSqEuclidean) {
    if (lane == 0) {
      coeffs[pair] = sqeuclidean_pair_coefficients(grad);
    }
    return;
  }
  const PairSums sums = warp_pair_sums(row_of<T>(x, pair / k),
                                       row_pointer<T>(protos, 0, indices[pair]), x.dim, lane);
  if (lane == 0) {
    coeffs[pair] = cosine_pair_coefficients(sums, grad);
  }
}

// One warp per row: grad_rows[r, c] = sum over j = 0..k-1 of the pair gradient w.r.t. x[r, c].
template <typename T>
__global__ void __launch_bounds__(kWarpThreads)
    nearest_row_gradient_kernel(Metric metric, RowsView x, RowsView protos, int64_t k,
                                const int64_t* __restrict__ indices,
                                const PairCoefficients* __restrict__ coeffs,
                                float* __restrict__ grad_rows) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kWarpThreads + threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  if (row >= x.num_images * x.rows_per_image) {
    return;
  }
  const T* row_data = row_of<T>(x, row);
  float* out = grad_rows + row * x.dim;
  for (int64_t c = lane; c < x.dim; c += kWarpSize) {
    const float row_value = to_float(row_data[c]);
    float acc = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t pair = row * k + j;
      const PairCoefficients pc = coeffs[pair];
      acc += pair_gradient(metric, pc.row_self, pc.cross, row_value,
                           to_float(row_pointer<T>(protos, 0, indices[pair])[c]));
    }
    out[c] = acc;
  }
}

// The element offset in x of the row of each bucketed pair: row_offsets[s] for pair order[s]
// (so that the gather below divides nothing in its loop: a 64-bit division is a call, whose
// saved registers ptxas spilled there).
__global__ void __launch_bounds__(kWarpThreads)
    bucketed_row_offsets_kernel(RowsView x, int64_t k, const int64_t* __restrict__ order,
                                int64_t* __restrict__ row_offsets) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kWarpThreads + threadIdx.x;
  if (s >= x.num_images * x.rows_per_image * k) {
    return;
  }
  const int64_t row = order[s] / k;
  const int64_t image = row / x.rows_per_image;
  row_offsets[s] = image * x.image_stride + (row - image * x.rows_per_image) * x.row_stride;
}

// grad_protos[m, c] = sum over the pairs of bucket m, in order, of the pair gradient w.r.t.
// p[m, c]. Blocks of 32 channels (coalesced) x 8 prototypes.
template <typename T>
__global__ void __launch_bounds__(kWarpThreads)
    nearest_prototype_gradient_kernel(Metric metric, RowsView x, RowsView protos,
                                      const PairCoefficients* __restrict__ coeffs,
                                      const int64_t* __restrict__ order,
                                      const int64_t* __restrict__ starts,
                                      const int64_t* __restrict__ row_offsets,
                                      float* __restrict__ grad_protos, int64_t channel_tiles) {
  const int64_t m = (blockIdx.x / channel_tiles) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t c = (blockIdx.x % channel_tiles) * kWarpSize + threadIdx.x % kWarpSize;
  if (m >= protos.rows_per_image || c >= x.dim) {
    return;
  }
  const T* x_data = static_cast<const T*>(x.data);
  const float proto_value = to_float(row_pointer<T>(protos, 0, m)[c]);
  float acc = 0.f;
  for (int64_t s = starts[m]; s < starts[m + 1]; ++s) {
    const PairCoefficients pc = coeffs[order[s]];
    acc += pair_gradient(metric, pc.proto_self, pc.cross, proto_value,
                         to_float(x_data[row_offsets[s] + c]));
  }
  grad_protos[m * x.dim + c] = acc;
}

// One warp per pair: atomically adds the pair gradient w.r.t. p[m] to its prototype.
template <typename T>
__global__ void __launch_bounds__(kWarpThreads)
    nearest_prototype_gradient_atomic_kernel(Metric metric, RowsView x, RowsView protos,
                                             int64_t k, const int64_t* __restrict__ indices,
                                             const PairCoefficients* __restrict__ coeffs,
                                             float* __restrict__ grad_protos) {
  const int64_t pair = (static_cast<int64_t>(blockIdx.x) * kWarpThreads + threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  if (pair >= x.num_images * x.rows_per_image * k) {
    return;
  }
  const int64_t m = indices[pair];
  const PairCoefficients pc = coeffs[pair];
  const T* row_data = row_of<T>(x, pair / k);
  const T* proto = row_pointer<T>(protos, 0, m);
  float* out = grad_protos + m * x.dim;
  for (int64_t c = lane; c < x.dim; c += kWarpSize) {
    atomicAdd(&out[c], pair_gradient(metric, pc.proto_self, pc.cross, to_float(proto[c]),
                                     to_float(row_data[c])));
  }
}

}  // namespace

cudaError_t launch_nearest_pair_coefficients(ScalarKind kind, Metric metric, RowsView x,
                                             RowsView protos, int64_t k, const int64_t* indices,
                                             const void* grad_values, PairCoefficients* coeffs,
                                             cudaStream_t stream) {
  const int64_t num_pairs = x.num_images * x.rows_per_image * k;
  if (num_pairs == 0) {
    return cudaSuccess;
  }
  const int64_t blocks = blocks_for(num_pairs, kWarpsPerBlock);
  if (blocks == 0) {
    return cudaErrorInvalidConfiguration;
  }
  return dispatch_scalar_kind(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    nearest_pair_coefficients_kernel<T><<<static_cast<unsigned>(blocks), kWarpThreads, 0,
                                          stream>>>(metric, x, protos, k, indices,
                                                    static_cast<const T*>(grad_values), coeffs);
    return cudaGetLastError();
  });
}

cudaError_t launch_nearest_row_gradient(ScalarKind kind, Metric metric, RowsView x,
                                        RowsView protos, int64_t k, const int64_t* indices,
                                        const PairCoefficients* coeffs, float* grad_rows,
                                        cudaStream_t stream) {
  const int64_t num_rows = x.num_images * x.rows_per_image;
  if (num_rows == 0 || x.dim == 0) {
    return cudaSuccess;
  }
  const int64_t blocks = blocks_for(num_rows, kWarpsPerBlock);
  if (blocks == 0) {
    return cudaErrorInvalidConfiguration;
  }
  return dispatch_scalar_kind(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    nearest_row_gradient_kernel<T><<<static_cast<unsigned>(blocks), kWarpThreads, 0, stream>>>(
        metric, x, protos, k, indices, coeffs, grad_rows);
    return cudaGetLastError();
  });
}

cudaError_t launch_nearest_prototype_gradient(ScalarKind kind, Metric metric, bool deterministic,
                                              RowsView x, RowsView protos, int64_t k,
                                              const int64_t* indices,
                                              const PairCoefficients* coeffs,
                                              const int64_t* order, const int64_t* starts,
                                              int64_t* workspace, float* grad_protos,
                                              cudaStream_t stream) {
  const int64_t num_protos = protos.rows_per_image;
  if (num_protos == 0 || x.dim == 0) {
    return cudaSuccess;
  }
  const int64_t num_pairs = x.num_images * x.rows_per_image * k;
  if (!deterministic || num_pairs == 0) {
    cudaError_t error =
        cudaMemsetAsync(grad_protos, 0, sizeof(float) * num_protos * x.dim, stream);
    if (error != cudaSuccess || num_pairs == 0) {
      return error;
    }
    const int64_t blocks = blocks_for(num_pairs, kWarpsPerBlock);
    if (blocks == 0) {
      return cudaErrorInvalidConfiguration;
    }
    return dispatch_scalar_kind(kind, [&](auto tag) {
      using T = typename decltype(tag)::type;
      nearest_prototype_gradient_atomic_kernel<T><<<static_cast<unsigned>(blocks), kWarpThreads,
                                                    0, stream>>>(metric, x, protos, k, indices,
                                                                 coeffs, grad_protos);
      return cudaGetLastError();
    });
  }
  const int64_t offset_blocks = blocks_for(num_pairs, kWarpThreads);
  const int64_t channel_tiles = (x.dim + kWarpSize - 1) / kWarpSize;
  const int64_t proto_tiles = (num_protos + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t blocks = blocks_for(channel_tiles * proto_tiles, 1);
  if (blocks == 0 || offset_blocks == 0) {
    return cudaErrorInvalidConfiguration;
  }
  bucketed_row_offsets_kernel<<<static_cast<unsigned>(offset_blocks), kWarpThreads, 0, stream>>>(
      x, k, order, workspace);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    return error;
  }
  return dispatch_scalar_kind(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    nearest_prototype_gradient_kernel<T><<<static_cast<unsigned>(blocks), kWarpThreads, 0,
                                           stream>>>(metric, x, protos, coeffs, order, starts,
                                                     workspace, grad_protos, channel_tiles);
    return cudaGetLastError();
  });
}

}  // namespace protokern::cuda
