// The exact value at the chosen position: the search ranks positions by the GEMM expansion
// (TF32/half-precision dots, cancellation between norms), so the returned distance is recomputed
// directly, in float32, from the inputs at the position it chose.
#include "cuda/device_utils.cuh"

namespace protokern::cuda {
namespace {

constexpr int kRecomputeThreads = 256;  // 8 warps, one (image, prototype) pair each

template <typename T>
__global__ void __launch_bounds__(kRecomputeThreads)
    min_distance_recompute_kernel(Metric metric, RowsView x, RowsView protos,
                                  const unsigned long long* __restrict__ best,
                                  T* __restrict__ values, int64_t* __restrict__ indices) {
  const int64_t pair =
      (static_cast<int64_t>(blockIdx.x) * kRecomputeThreads + threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  const int64_t num_protos = protos.rows_per_image;
  if (pair >= x.num_images * num_protos) {
    return;  // uniform across the warp
  }
  const int64_t image = pair / num_protos;
  const int64_t m = pair - image * num_protos;
  const int64_t position = unpack_position(best[pair]);
  const PairSums sums = warp_pair_sums(row_pointer<T>(x, image, position),
                                       row_pointer<T>(protos, 0, m), x.dim, lane);
  if (lane == 0) {
    values[pair] = from_float<T>(distance_from_sums(metric, sums));
    indices[pair] = position;
  }
}

}  // namespace

cudaError_t launch_min_distance_recompute(ScalarKind kind, Metric metric, RowsView x,
                                          RowsView protos, const unsigned long long* best,
                                          void* values, int64_t* indices, cudaStream_t stream) {
  const int64_t num_pairs = x.num_images * protos.rows_per_image;
  if (num_pairs == 0) {
    return cudaSuccess;
  }
  const int64_t blocks = blocks_for(num_pairs, kRecomputeThreads / kWarpSize);
  if (blocks == 0) {
    return cudaErrorInvalidConfiguration;
  }
  return dispatch_scalar_kind(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    min_distance_recompute_kernel<T><<<static_cast<unsigned>(blocks), kRecomputeThreads, 0,
                                       stream>>>(metric, x, protos, best,
                                                 static_cast<T*>(values), indices);
    return cudaGetLastError();
  });
}

}  // namespace protokern::cuda
