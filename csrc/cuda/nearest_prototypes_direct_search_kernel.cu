// The rows nearest_prototypes_search_kernel could not settle (more near-ties than its candidate
// slots, or a NaN, inf or huge squared norm among their pairs): every prototype's distance
// computed directly (warp_pair_sums, power-of-two scaled, no expansion), the first k by (exact
// distance, index) kept. Rare, and slow where it is not: O(M K) per row without tensor cores.
// A NaN distance comes first (pack_candidate), so a row with a NaN entry gets NaN values and
// the indices 0 .. k - 1, as the reference's.
#include "cuda/nearest_prototypes_kernels.h"
#include "cuda/warp_first_k.cuh"

namespace protokern::cuda {
namespace {

constexpr int kDirectThreads = 256;  // 8 warps, one row each

template <typename T>
__global__ void __launch_bounds__(kDirectThreads)
    nearest_prototypes_direct_search_kernel(Metric metric, RowsView x, RowsView protos, int k,
                                            const uint8_t* __restrict__ searched,
                                            T* __restrict__ values,
                                            int64_t* __restrict__ indices) {
  const int64_t row =
      (static_cast<int64_t>(blockIdx.x) * kDirectThreads + threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  if (row >= x.num_images * x.rows_per_image || searched[row] == 0) {
    return;  // uniform across the warp
  }
  const int64_t image = row / x.rows_per_image;
  const T* row_data = row_pointer<T>(x, image, row - image * x.rows_per_image);
  unsigned long long best = ~0ull;
  for (int64_t m = 0; m < protos.rows_per_image; ++m) {
    const unsigned long long key =
        exact_key(metric, row_data, row_pointer<T>(protos, 0, m), m, x.dim, lane);
    if (key < __shfl_sync(kFullMask, best, k - 1)) {  // uniform: every lane has the same key
      best = insert_ascending(best, key, lane);
    }
  }
  store_first_k(best, k, row, lane, values, indices);
}

}  // namespace

cudaError_t launch_nearest_prototypes_direct_search(ScalarKind kind, Metric metric, RowsView x,
                                                    RowsView protos, int64_t k,
                                                    const uint8_t* searched, void* values,
                                                    int64_t* indices, cudaStream_t stream) {
  const int64_t num_rows = x.num_images * x.rows_per_image;
  if (num_rows == 0) {
    return cudaSuccess;
  }
  const int64_t blocks = blocks_for(num_rows, kDirectThreads / kWarpSize);
  if (blocks == 0 || k < 1 || k > kNearestMaxK) {
    return cudaErrorInvalidConfiguration;
  }
  return dispatch_scalar_kind(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    nearest_prototypes_direct_search_kernel<T>
        <<<static_cast<unsigned>(blocks), kDirectThreads, 0, stream>>>(
            metric, x, protos, static_cast<int>(k), searched, static_cast<T*>(values), indices);
    return cudaGetLastError();
  });
}

}  // namespace protokern::cuda
