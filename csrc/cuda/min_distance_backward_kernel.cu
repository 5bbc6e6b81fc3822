// Backward of min_distance from the saved indices: only the chosen position of each
// (image, prototype) pair carries gradient. Per pair, the gradient is a combination of the chosen
// row x and the prototype p (coefficients from selected_pair_coefficients_kernel, numerics in
// pair_gradients.cuh); the prototypes' gradient gathers it over images, and the rows' gradient
// scatters it to the chosen positions, deterministically unless the caller allows atomics.
#include "cuda/pair_gradients.cuh"

namespace protokern::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kWarpThreads = kWarpsPerBlock * kWarpSize;
constexpr int kSortThreads = 256;

// One warp per (b, m): coefficients of grad_values[b, m] * distance(x[b, l], p[m]).
template <typename T>
__global__ void __launch_bounds__(kWarpThreads)
    selected_pair_coefficients_kernel(Metric metric, RowsView x, RowsView protos,
                                      const int64_t* __restrict__ indices,
                                      const T* __restrict__ grad_values,
                                      PairCoefficients* __restrict__ coeffs) {
  const int64_t pair = (static_cast<int64_t>(blockIdx.x) * kWarpThreads + threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  const int64_t num_protos = protos.rows_per_image;
  if (pair >= x.num_images * num_protos) {
    return;  // uniform across the warp
  }
  const double grad = to_float(grad_values[pair]);
  if (metric == Metric::kSqEuclidean) {
    if (lane == 0) {
      coeffs[pair] = sqeuclidean_pair_coefficients(grad);
    }
    return;
  }
  const int64_t image = pair / num_protos;
  const int64_t m = pair - image * num_protos;
  const PairSums sums = warp_pair_sums(row_pointer<T>(x, image, indices[pair]),
                                       row_pointer<T>(protos, 0, m), x.dim, lane);
  if (lane == 0) {
    coeffs[pair] = cosine_pair_coefficients(sums, grad);
  }
}

// grad_protos[m, k] = sum over b = 0..B-1 of the pair gradient w.r.t. p[m, k]. Blocks of 32
// channels (coalesced) x 8 prototypes.
template <typename T>
__global__ void __launch_bounds__(kWarpThreads)
    prototype_gradient_kernel(Metric metric, RowsView x, RowsView protos,
                              const int64_t* __restrict__ indices,
                              const PairCoefficients* __restrict__ coeffs,
                              float* __restrict__ grad_protos, int64_t channel_tiles) {
  const int64_t num_protos = protos.rows_per_image;
  const int64_t m = (blockIdx.x / channel_tiles) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t k = (blockIdx.x % channel_tiles) * kWarpSize + threadIdx.x % kWarpSize;
  if (m >= num_protos || k >= x.dim) {
    return;
  }
  const float proto_value = to_float(row_pointer<T>(protos, 0, m)[k]);
  float acc = 0.f;
  for (int64_t image = 0; image < x.num_images; ++image) {
    const int64_t pair = image * num_protos + m;
    const PairCoefficients c = coeffs[pair];
    const float row_value = to_float(row_pointer<T>(x, image, indices[pair])[k]);
    acc += pair_gradient(metric, c.proto_self, c.cross, proto_value, row_value);
  }
  grad_protos[m * x.dim + k] = acc;
}

// One block per image: a stable counting sort of its prototypes by chosen position. Writes the
// bucket starts (L + 1) and the prototypes in position-major, then increasing-m order (M).
__global__ void __launch_bounds__(kSortThreads)
    sort_prototypes_by_position_kernel(int64_t num_positions, int64_t num_protos,
                                       const int64_t* __restrict__ indices,
                                       int32_t* __restrict__ workspace) {
  __shared__ int32_t scan[kSortThreads];
  __shared__ int32_t chunk_positions[kSortThreads];
  __shared__ int32_t carry;
  const int t = static_cast<int>(threadIdx.x);
  const int64_t image = blockIdx.x;
  int32_t* starts = workspace + image * (2 * num_positions + 1 + num_protos);
  int32_t* cursor = starts + num_positions + 1;
  int32_t* order = cursor + num_positions;
  const int64_t* chosen = indices + image * num_protos;

  // Bucket sizes (integer atomics: the counts do not depend on their order).
  for (int64_t l = t; l < num_positions; l += kSortThreads) {
    cursor[l] = 0;
  }
  __syncthreads();
  for (int64_t m = t; m < num_protos; m += kSortThreads) {
    atomicAdd(&cursor[chosen[m]], 1);
  }
  if (t == 0) {
    carry = 0;
  }
  __syncthreads();

  // Exclusive prefix sum of the sizes, kSortThreads positions at a time (Hillis-Steele).
  for (int64_t l0 = 0; l0 < num_positions; l0 += kSortThreads) {
    const int64_t l = l0 + t;
    const int32_t count = l < num_positions ? cursor[l] : 0;
    scan[t] = count;
    __syncthreads();
    for (int offset = 1; offset < kSortThreads; offset *= 2) {
      const int32_t add = t >= offset ? scan[t - offset] : 0;
      __syncthreads();
      scan[t] += add;
      __syncthreads();
    }
    if (l < num_positions) {
      starts[l] = carry + scan[t] - count;
      cursor[l] = starts[l];
    }
    __syncthreads();  // every thread has read carry
    if (t == kSortThreads - 1) {
      carry += scan[t];
    }
    __syncthreads();
  }
  if (t == 0) {
    starts[num_positions] = carry;  // == num_protos
  }

  // Stable placement, kSortThreads prototypes at a time: a prototype's slot is its bucket's
  // cursor plus the number of earlier prototypes of this chunk in the same bucket; the last
  // of them advances the cursor.
  for (int64_t m0 = 0; m0 < num_protos; m0 += kSortThreads) {
    const int64_t m = m0 + t;
    const int32_t position = m < num_protos ? static_cast<int32_t>(chosen[m]) : -1;
    chunk_positions[t] = position;
    __syncthreads();
    int32_t rank = 0;
    bool last = true;
    if (position >= 0) {
      for (int u = 0; u < kSortThreads; ++u) {
        if (chunk_positions[u] == position) {
          rank += u < t ? 1 : 0;
          last = last && u <= t;
        }
      }
      order[cursor[position] + rank] = static_cast<int32_t>(m);
    }
    __syncthreads();  // every thread has read its cursor
    if (position >= 0 && last) {
      cursor[position] += rank + 1;
    }
    __syncthreads();
  }
}

// One warp per (b, l): the sum, in increasing m, of the pair gradients w.r.t. x[b, l] of the
// prototypes that chose (b, l). Writes every entry of grad_rows, zeros included.
template <typename T>
__global__ void __launch_bounds__(kWarpThreads)
    gather_row_gradient_kernel(Metric metric, RowsView x, RowsView protos,
                               const PairCoefficients* __restrict__ coeffs,
                               const int32_t* __restrict__ workspace,
                               float* __restrict__ grad_rows) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kWarpThreads + threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  const int64_t num_positions = x.rows_per_image;
  const int64_t num_protos = protos.rows_per_image;
  if (row >= x.num_images * num_positions) {
    return;
  }
  const int64_t image = row / num_positions;
  const int64_t position = row - image * num_positions;
  const int32_t* starts = workspace + image * (2 * num_positions + 1 + num_protos);
  const int32_t* order = starts + 2 * num_positions + 1;
  const int32_t begin = starts[position];
  const int32_t end = starts[position + 1];
  const T* row_data = row_pointer<T>(x, image, position);
  float* out = grad_rows + row * x.dim;
  for (int64_t k = lane; k < x.dim; k += kWarpSize) {
    const float row_value = to_float(row_data[k]);
    float acc = 0.f;
    for (int32_t s = begin; s < end; ++s) {
      const int64_t m = order[s];
      const PairCoefficients c = coeffs[image * num_protos + m];
      acc += pair_gradient(metric, c.row_self, c.cross, row_value,
                           to_float(row_pointer<T>(protos, 0, m)[k]));
    }
    out[k] = acc;
  }
}

// One warp per (b, m): atomically adds the pair gradient w.r.t. x[b, l] to the chosen row.
template <typename T>
__global__ void __launch_bounds__(kWarpThreads)
    scatter_row_gradient_atomic_kernel(Metric metric, RowsView x, RowsView protos,
                                       const int64_t* __restrict__ indices,
                                       const PairCoefficients* __restrict__ coeffs,
                                       float* __restrict__ grad_rows) {
  const int64_t pair = (static_cast<int64_t>(blockIdx.x) * kWarpThreads + threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  const int64_t num_protos = protos.rows_per_image;
  if (pair >= x.num_images * num_protos) {
    return;
  }
  const int64_t image = pair / num_protos;
  const int64_t m = pair - image * num_protos;
  const int64_t position = indices[pair];
  const PairCoefficients c = coeffs[pair];
  const T* row_data = row_pointer<T>(x, image, position);
  const T* proto = row_pointer<T>(protos, 0, m);
  float* out = grad_rows + (image * x.rows_per_image + position) * x.dim;
  for (int64_t k = lane; k < x.dim; k += kWarpSize) {
    atomicAdd(&out[k], pair_gradient(metric, c.row_self, c.cross, to_float(row_data[k]),
                                     to_float(proto[k])));
  }
}

}  // namespace

cudaError_t launch_selected_pair_coefficients(ScalarKind kind, Metric metric, RowsView x,
                                              RowsView protos, const int64_t* indices,
                                              const void* grad_values, PairCoefficients* coeffs,
                                              cudaStream_t stream) {
  const int64_t num_pairs = x.num_images * protos.rows_per_image;
  if (num_pairs == 0) {
    return cudaSuccess;
  }
  const int64_t blocks = blocks_for(num_pairs, kWarpsPerBlock);
  if (blocks == 0) {
    return cudaErrorInvalidConfiguration;
  }
  return dispatch_scalar_kind(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    selected_pair_coefficients_kernel<T><<<static_cast<unsigned>(blocks), kWarpThreads, 0,
                                           stream>>>(metric, x, protos, indices,
                                                     static_cast<const T*>(grad_values), coeffs);
    return cudaGetLastError();
  });
}

cudaError_t launch_prototype_gradient(ScalarKind kind, Metric metric, RowsView x, RowsView protos,
                                      const int64_t* indices, const PairCoefficients* coeffs,
                                      float* grad_protos, cudaStream_t stream) {
  const int64_t num_protos = protos.rows_per_image;
  if (num_protos == 0 || x.dim == 0) {
    return cudaSuccess;
  }
  if (x.num_images == 0) {  // no image chose anything
    return cudaMemsetAsync(grad_protos, 0, sizeof(float) * num_protos * x.dim, stream);
  }
  const int64_t channel_tiles = (x.dim + kWarpSize - 1) / kWarpSize;
  const int64_t proto_tiles = (num_protos + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t blocks = blocks_for(channel_tiles * proto_tiles, 1);
  if (blocks == 0) {
    return cudaErrorInvalidConfiguration;
  }
  return dispatch_scalar_kind(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    prototype_gradient_kernel<T><<<static_cast<unsigned>(blocks), kWarpThreads, 0, stream>>>(
        metric, x, protos, indices, coeffs, grad_protos, channel_tiles);
    return cudaGetLastError();
  });
}

cudaError_t launch_row_gradient(ScalarKind kind, Metric metric, bool deterministic, RowsView x,
                                RowsView protos, const int64_t* indices,
                                const PairCoefficients* coeffs, int32_t* workspace,
                                float* grad_rows, cudaStream_t stream) {
  const int64_t num_rows = x.num_images * x.rows_per_image;
  if (num_rows == 0 || x.dim == 0) {
    return cudaSuccess;
  }
  const int64_t num_pairs = x.num_images * protos.rows_per_image;
  if (!deterministic || num_pairs == 0) {
    cudaError_t error = cudaMemsetAsync(grad_rows, 0, sizeof(float) * num_rows * x.dim, stream);
    if (error != cudaSuccess || num_pairs == 0) {
      return error;
    }
    const int64_t blocks = blocks_for(num_pairs, kWarpsPerBlock);
    if (blocks == 0) {
      return cudaErrorInvalidConfiguration;
    }
    return dispatch_scalar_kind(kind, [&](auto tag) {
      using T = typename decltype(tag)::type;
      scatter_row_gradient_atomic_kernel<T><<<static_cast<unsigned>(blocks), kWarpThreads, 0,
                                              stream>>>(metric, x, protos, indices, coeffs, grad_rows);
      return cudaGetLastError();
    });
  }
  const int64_t gather_blocks = blocks_for(num_rows, kWarpsPerBlock);
  if (gather_blocks == 0 || x.num_images > 0x7fffffffLL) {
    return cudaErrorInvalidConfiguration;
  }
  sort_prototypes_by_position_kernel<<<static_cast<unsigned>(x.num_images), kSortThreads, 0,
                                       stream>>>(x.rows_per_image, protos.rows_per_image,
                                                 indices, workspace);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    return error;
  }
  return dispatch_scalar_kind(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    gather_row_gradient_kernel<T><<<static_cast<unsigned>(gather_blocks), kWarpThreads, 0,
                                    stream>>>(metric, x, protos, coeffs, workspace, grad_rows);
    return cudaGetLastError();
  });
}

}  // namespace protokern::cuda
