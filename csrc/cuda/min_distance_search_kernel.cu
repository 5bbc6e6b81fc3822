// The fused min_distance search: a tiled GEMM (prototypes x rows of x) whose epilogue turns the
// dot products into distances with the precomputed norms and keeps, per (image, prototype), the
// best (distance, position) candidate. The distance tensor never leaves shared memory.
//
// A block computes a kTileM x kTileN tile (prototypes x flattened rows r = b*L + l, which may
// span several images, so that L = 1 tokens fill the tile too), then reduces it and merges its
// candidates into best[b, m] with a 64-bit atomicMin on the packed key (pack_candidate). A min
// is exact and order-independent, so the result is deterministic.
//
// Rows are the fast grid index: blocks running together share a prototype tile and sweep the
// rows of x, which (B L K, 6.4 MB at large_bank) stay in L2, so the bank (M K, 51 MB there, past
// an H200's 50 MB L2) is read from DRAM about once. With prototypes fast, every row tile walked
// the whole bank: about 5 GB of DRAM traffic at large_bank.
#include "cuda/dot_tiles.cuh"

namespace protokern::cuda {
namespace {

// The epilogue: dots[m_local * kLdC + r_local] holds <p_m, x_r> for the block's tile. Two
// threads per prototype each scan half of the rows in increasing order and merge one candidate
// per (image, prototype) they saw.
template <typename T>
__device__ void merge_tile_candidates(const float* dots, Metric metric, const RowsView& x,
                                      const RowsView& protos, const float* x_sq,
                                      const float* proto_sq, int64_t first_proto,
                                      int64_t first_row, unsigned long long* best) {
  constexpr int kThreadsPerProto = kTileThreads / kTileM;
  constexpr int kRowsPerThread = kTileN / kThreadsPerProto;
  static_assert(kThreadsPerProto * kTileM == kTileThreads, "threads must cover prototypes");
  const int local_proto = static_cast<int>(threadIdx.x) / kThreadsPerProto;
  const int first_local_row = (static_cast<int>(threadIdx.x) % kThreadsPerProto) * kRowsPerThread;
  const int64_t num_protos = protos.rows_per_image;
  const int64_t m = first_proto + local_proto;
  const int64_t total_rows = x.num_images * x.rows_per_image;
  int64_t r = first_row + first_local_row;
  if (m >= num_protos || r >= total_rows) {
    return;
  }
  const float p_sq = proto_sq[m];
  const T* proto = row_pointer<T>(protos, 0, m);
  int64_t image = r / x.rows_per_image;
  int64_t position = r - image * x.rows_per_image;
  unsigned long long candidate = ~0ull;
  for (int i = 0; i < kRowsPerThread && r < total_rows; ++i, ++r) {
    const float r_sq = x_sq[r];
    const float dot = dots[local_proto * kLdC + first_local_row + i];
    float distance;
    if (metric == Metric::kSqEuclidean) {
      distance = r_sq - 2.f * dot + p_sq;
    } else {
      distance = 1.f - dot / (fmaxf(sqrtf(r_sq), kNormFloorFloat) *
                              fmaxf(sqrtf(p_sq), kNormFloorFloat));
    }
    // An inf or NaN entry (non-finite norm) or an overflow: inf - inf must not leak out of the
    // expansion, so such pairs are computed directly (rare: only non-finite or huge inputs).
    if (!isfinite(r_sq + p_sq) || !isfinite(distance)) {
      distance = direct_distance<T>(metric, row_pointer<T>(x, image, position), proto, x.dim);
    } else {
      distance = metric == Metric::kSqEuclidean ? clamp_sqeuclidean(distance)
                                                : clamp_cosine(distance);
    }
    candidate = min(candidate, pack_candidate(distance, position));
    if (++position == x.rows_per_image) {  // the next row starts a new image
      atomicMin(&best[image * num_protos + m], candidate);
      candidate = ~0ull;
      position = 0;
      ++image;
    }
  }
  if (position != 0) {
    atomicMin(&best[image * num_protos + m], candidate);
  }
}

// One block per (prototype tile, row tile): the tile's dots on tensor cores or by SIMT FMAs
// (dot_tiles.cuh), then the epilogue.
template <typename T, typename Tile>
__global__ void __launch_bounds__(kTileThreads)
    min_distance_search_kernel(Metric metric, RowsView x, RowsView protos,
                               const float* __restrict__ x_sq,
                               const float* __restrict__ proto_sq,
                               unsigned long long* __restrict__ best, int64_t row_tiles) {
  __shared__ Tile tile;
  const int64_t first_proto = (blockIdx.x / row_tiles) * kTileM;
  const int64_t first_row = (blockIdx.x % row_tiles) * kTileN;
  row_offsets_of_tile(protos, first_proto, tile.proto_offsets);
  row_offsets_of_tile(x, first_row, tile.row_offsets);
  __syncthreads();
  tile.multiply(static_cast<const T*>(protos.data), static_cast<const T*>(x.data), x.dim,
                DotLayout::kPrototypeMajor);
  merge_tile_candidates<T>(tile.dots(), metric, x, protos, x_sq, proto_sq, first_proto,
                           first_row, best);
}

}  // namespace

cudaError_t launch_min_distance_search(ScalarKind kind, GemmPath path, Metric metric, RowsView x,
                                       RowsView protos, const float* x_sq, const float* proto_sq,
                                       unsigned long long* best, cudaStream_t stream) {
  const int64_t num_pairs = x.num_images * protos.rows_per_image;
  if (num_pairs == 0) {
    return cudaSuccess;
  }
  // All ones: above every packed candidate, so the first atomicMin always wins.
  cudaError_t error = cudaMemsetAsync(best, 0xff, sizeof(unsigned long long) * num_pairs, stream);
  if (error != cudaSuccess) {
    return error;
  }
  const int64_t proto_tiles = (protos.rows_per_image + kTileM - 1) / kTileM;
  const int64_t row_tiles = (x.num_images * x.rows_per_image + kTileN - 1) / kTileN;
  const int64_t blocks = blocks_for(proto_tiles * row_tiles, 1);
  if (blocks == 0) {
    return cudaErrorInvalidConfiguration;
  }
  return dispatch_scalar_kind(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks), kTileThreads, 0, stream>>>(
          metric, x, protos, x_sq, proto_sq, best, row_tiles);
      return cudaGetLastError();
    };
    if (path == GemmPath::kSimt) {
      return launch(min_distance_search_kernel<T, SimtTile<T>>);
    }
    const bool chunks = rows_load_in_chunks<T>(x) && rows_load_in_chunks<T>(protos);
    if (path == GemmPath::kTensorCoreSplit) {
      if constexpr (std::is_same_v<T, float>) {
        return chunks ? launch(min_distance_search_kernel<T, TensorCoreTile<T, true, true>>)
                      : launch(min_distance_search_kernel<T, TensorCoreTile<T, false, true>>);
      } else {
        return cudaErrorInvalidValue;  // the glue splits float32 only
      }
    }
    if (chunks) {
      return launch(min_distance_search_kernel<T, TensorCoreTile<T, true>>);
    }
    return launch(min_distance_search_kernel<T, TensorCoreTile<T, false>>);
  });
}

}  // namespace protokern::cuda
