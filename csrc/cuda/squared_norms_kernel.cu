// |row|^2 of every row, for the norms in the epilogue of the min_distance search.
#include "cuda/device_utils.cuh"

namespace protokern::cuda {
namespace {

constexpr int kNormThreads = 256;  // 8 warps, one row each

// One warp per row, in the fixed order of warp_pair_sums: identical rows get identical norms.
template <typename T>
__global__ void __launch_bounds__(kNormThreads)
    squared_norms_kernel(RowsView rows, float* __restrict__ out) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kNormThreads + threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  if (row >= rows.num_images * rows.rows_per_image) {
    return;  // uniform across the warp: row is the same for its 32 lanes
  }
  const int64_t image = row / rows.rows_per_image;
  const T* data = row_pointer<T>(rows, image, row - image * rows.rows_per_image);
  float sum = 0.f;
  for (int64_t k = lane; k < rows.dim; k += kWarpSize) {
    const float v = to_float(data[k]);
    sum = fmaf(v, v, sum);
  }
  sum = warp_sum(sum);
  if (lane == 0) {
    out[row] = sum;
  }
}

}  // namespace

cudaError_t launch_squared_norms(ScalarKind kind, RowsView rows, float* out, cudaStream_t stream) {
  const int64_t num_rows = rows.num_images * rows.rows_per_image;
  if (num_rows == 0) {
    return cudaSuccess;
  }
  const int64_t blocks = blocks_for(num_rows, kNormThreads / kWarpSize);
  if (blocks == 0) {
    return cudaErrorInvalidConfiguration;
  }
  return dispatch_scalar_kind(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    squared_norms_kernel<T><<<static_cast<unsigned>(blocks), kNormThreads, 0, stream>>>(rows, out);
    return cudaGetLastError();
  });
}

}  // namespace protokern::cuda
