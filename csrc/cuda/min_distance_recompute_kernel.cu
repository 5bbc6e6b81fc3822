// The exact value at the chosen position: the search ranks positions by the GEMM expansion
// (half-precision or split-TF32 dots, cancellation between norms), so the returned distance is
// recomputed directly, in float32, from the inputs at the position it chose -- unless the
// search's own value is as good: with exact products (float16/bfloat16 operands, float32 FMAs,
// or float32 as split TF32 products, GemmPath::kTensorCoreSplit; not plain TF32:
// `from_search`), a finite cosine (its error, like the direct sum's, is absolute: ~K eps), or a
// sqeuclidean distance whose expansion cancelled at most one bit (|x|^2 + |p|^2 <= 2 d: its
// rounding bound then within twice the direct float32 sum's own). Such pairs read 8 + 4 + 4
// bytes here instead of their 2 K entries (at cil_vectors in bfloat16 most pairs: 31 GB less;
// in float32 with TF32 allowed, 63 GB less since the split).
#include "cuda/device_utils.cuh"

namespace protokern::cuda {
namespace {

constexpr int kRecomputeThreads = 256;  // 8 warps, one (image, prototype) pair each

template <typename T>
__global__ void __launch_bounds__(kRecomputeThreads)
    min_distance_recompute_kernel(Metric metric, RowsView x, RowsView protos,
                                  const unsigned long long* __restrict__ best,
                                  bool from_search, const float* __restrict__ x_sq,
                                  const float* __restrict__ proto_sq,
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
  const unsigned long long candidate = best[pair];
  const int64_t position = unpack_position(candidate);
  if (from_search) {  // uniform across the warp: every lane read the same pair
    const float searched = unpack_distance(candidate);
    const bool exact_enough =
        isfinite(searched) &&
        (metric == Metric::kCosine ||
         x_sq[image * x.rows_per_image + position] + proto_sq[m] <= 2.f * searched);
    if (exact_enough) {
      if (lane == 0) {
        values[pair] = from_float<T>(searched);
        indices[pair] = position;
      }
      return;
    }
  }
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
                                          bool from_search, const float* x_sq,
                                          const float* proto_sq, void* values,
                                          int64_t* indices, cudaStream_t stream) {
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
                                       stream>>>(metric, x, protos, best, from_search,
                                                 x_sq, proto_sq, static_cast<T*>(values),
                                                 indices);
    return cudaGetLastError();
  });
}

}  // namespace protokern::cuda
