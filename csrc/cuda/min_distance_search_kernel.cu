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
#include <cuda_pipeline.h>
#include <mma.h>

#include "cuda/device_utils.cuh"

namespace protokern::cuda {
namespace {

constexpr int kTileM = 64;            // prototypes per block
constexpr int kTileN = 64;            // rows of x per block
constexpr int kTileK = 32;            // channels per shared-memory stage
constexpr int kSearchThreads = 128;   // 4 warps
constexpr int kLdC = kTileN + 4;      // float row length of the dot tile (WMMA: multiple of 4)
// Tensor-core operand row length in elements: 16-byte multiple, and 16 rows of it a 32-byte
// multiple, so every WMMA fragment pointer is 256-bit aligned as load_matrix_sync requires.
constexpr int kLdTensorCore = kTileK + 8;
constexpr int kLdSimt = kTileM + 1;   // k-major SIMT tiles; +1 avoids bank conflicts on store
static_assert(kTileM == kTileN, "the SIMT loader and the epilogue assume square tiles");

// Shared offsets of the block's rows: offset (elements) of row i of the tile from the data
// pointer, or -1 past the end, so that loads need no division.
__device__ void row_offsets_of_tile(const RowsView& rows, int64_t first_row, int64_t* offsets) {
  const int64_t total = rows.num_images * rows.rows_per_image;
  for (int i = static_cast<int>(threadIdx.x); i < kTileN; i += kSearchThreads) {
    const int64_t r = first_row + i;
    int64_t offset = -1;
    if (r < total) {
      const int64_t image = r / rows.rows_per_image;
      offset = image * rows.image_stride + (r - image * rows.rows_per_image) * rows.row_stride;
    }
    offsets[i] = offset;
  }
}

// Element (row, k) of a tile, zero outside the matrix (zeros add nothing to a dot product).
template <typename T>
__device__ __forceinline__ T tile_element(const T* data, const int64_t* offsets, int row,
                                          int64_t k, int64_t dim) {
  const int64_t offset = offsets[row];
  return offset >= 0 && k < dim ? data[offset + k] : from_float<T>(0.f);
}

// The epilogue: dots[m_local * kLdC + r_local] holds <p_m, x_r> for the block's tile. Two
// threads per prototype each scan half of the rows in increasing order and merge one candidate
// per (image, prototype) they saw.
template <typename T>
__device__ void merge_tile_candidates(const float* dots, Metric metric, const RowsView& x,
                                      const RowsView& protos, const float* x_sq,
                                      const float* proto_sq, int64_t first_proto,
                                      int64_t first_row, unsigned long long* best) {
  constexpr int kThreadsPerProto = kSearchThreads / kTileM;
  constexpr int kRowsPerThread = kTileN / kThreadsPerProto;
  static_assert(kThreadsPerProto * kTileM == kSearchThreads, "threads must cover prototypes");
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

// ------------------------------------------------------------------------------------------
// Tensor cores (WMMA): float16 and bfloat16 with k = 16, float32 as TF32 with k = 8; float
// accumulators. Each warp computes a 32 x 32 quarter of the tile as 2 x 2 fragments.

namespace wmma = nvcuda::wmma;

template <typename T>
struct WmmaOperand;
template <>
struct WmmaOperand<__half> {
  using Element = __half;
  static constexpr int kK = 16;
};
template <>
struct WmmaOperand<__nv_bfloat16> {
  using Element = __nv_bfloat16;
  static constexpr int kK = 16;
};
template <>
struct WmmaOperand<float> {
  using Element = wmma::precision::tf32;
  static constexpr int kK = 8;
};

// 16-byte chunks: what one cp.async moves.
template <typename T>
constexpr int kChunkElements = 16 / static_cast<int>(sizeof(T));

// Whether a tile of `rows` can be staged by 16-byte asynchronous copies: the data pointer and
// every row 16-byte aligned, and `dim` a whole number of chunks (so that a chunk is entirely
// inside the row or entirely past its end).
template <typename T>
bool rows_load_in_chunks(const RowsView& rows) {
  const auto aligned = [](int64_t elements) {
    return (elements * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  };
  return reinterpret_cast<uintptr_t>(rows.data) % 16 == 0 && aligned(rows.row_stride) &&
         (rows.num_images == 1 || aligned(rows.image_stride)) &&
         rows.dim % kChunkElements<T> == 0;
}

// Stages channels k0 .. k0 + kTileK of the tile's rows into `tile`, zero outside the matrix:
// with cp.async (kAsync; rows_load_in_chunks holds), which the caller commits and waits for,
// else with plain loads and stores.
template <typename T, bool kAsync>
__device__ __forceinline__ void stage_tile(T (*tile)[kLdTensorCore], const T* data,
                                           const int64_t* offsets, int64_t k0, int64_t dim) {
  if constexpr (kAsync) {
    constexpr int kChunksPerRow = kTileK / kChunkElements<T>;
    for (int c = static_cast<int>(threadIdx.x); c < kTileN * kChunksPerRow;
         c += kSearchThreads) {
      const int row = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * kChunkElements<T>;
      const int64_t offset = offsets[row];
      const bool inside = offset >= 0 && k0 + col < dim;
      // zfill 16: nothing is read (src is only a valid address), 16 zero bytes are written
      __pipeline_memcpy_async(&tile[row][col], inside ? data + offset + k0 + col : data, 16,
                              inside ? 0 : 16);
    }
  } else {
    // Consecutive threads read consecutive channels of a row: coalesced.
    for (int e = static_cast<int>(threadIdx.x); e < kTileN * kTileK; e += kSearchThreads) {
      const int row = e / kTileK;
      const int col = e % kTileK;
      tile[row][col] = tile_element(data, offsets, row, k0 + col, dim);
    }
  }
}

// The tile's GEMM is double-buffered: while the warps multiply stage s, the copies of stage
// s + 1 are in flight (cp.async where the rows allow it). The two stages of both operands and,
// after the loop, the dot tile share one shared buffer (static shared memory stops at 48 KB).
template <typename T, bool kAsync>
__global__ void __launch_bounds__(kSearchThreads)
    min_distance_search_tensor_core_kernel(Metric metric, RowsView x, RowsView protos,
                                           const float* __restrict__ x_sq,
                                           const float* __restrict__ proto_sq,
                                           unsigned long long* __restrict__ best,
                                           int64_t row_tiles) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using Operand = WmmaOperand<T>;
  constexpr int kK = Operand::kK;
  using FragmentA = wmma::fragment<wmma::matrix_a, 16, 16, kK, typename Operand::Element,
                                   wmma::row_major>;
  using FragmentB = wmma::fragment<wmma::matrix_b, 16, 16, kK, typename Operand::Element,
                                   wmma::col_major>;
  using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, kK, float>;
  using Tile = T[kTileM][kLdTensorCore];
  constexpr size_t kStagesBytes = 4 * sizeof(Tile);  // 2 stages x (prototypes, rows)
  constexpr size_t kDotsBytes = sizeof(float) * kTileM * kLdC;

  __shared__ __align__(128) unsigned char buffer[kStagesBytes > kDotsBytes ? kStagesBytes
                                                                          : kDotsBytes];
  __shared__ int64_t proto_offsets[kTileM];
  __shared__ int64_t row_offsets[kTileN];
  Tile* proto_tiles = reinterpret_cast<Tile*>(buffer);  // [2]
  Tile* row_tiles_shared = proto_tiles + 2;              // [2]
  auto dots = reinterpret_cast<float (*)[kLdC]>(buffer);

  const int64_t first_proto = (blockIdx.x / row_tiles) * kTileM;
  const int64_t first_row = (blockIdx.x % row_tiles) * kTileN;
  row_offsets_of_tile(protos, first_proto, proto_offsets);
  row_offsets_of_tile(x, first_row, row_offsets);
  const T* proto_data = static_cast<const T*>(protos.data);
  const T* x_data = static_cast<const T*>(x.data);
  const int64_t dim = x.dim;

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int warp_m = (warp / 2) * 32;
  const int warp_n = (warp % 2) * 32;
  Accumulator acc[2][2];
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      wmma::fill_fragment(acc[i][j], 0.f);
    }
  }
  __syncthreads();  // the offsets

  stage_tile<T, kAsync>(proto_tiles[0], proto_data, proto_offsets, 0, dim);
  stage_tile<T, kAsync>(row_tiles_shared[0], x_data, row_offsets, 0, dim);
  __pipeline_commit();
  int stage = 0;
  for (int64_t k0 = 0; k0 < dim; k0 += kTileK, stage ^= 1) {
    if (k0 + kTileK < dim) {  // the next stage, into the buffer the last iteration read
      stage_tile<T, kAsync>(proto_tiles[stage ^ 1], proto_data, proto_offsets, k0 + kTileK,
                            dim);
      stage_tile<T, kAsync>(row_tiles_shared[stage ^ 1], x_data, row_offsets, k0 + kTileK,
                            dim);
    }
    __pipeline_commit();
    __pipeline_wait_prior(1);  // every group but the newest has landed: this stage
    __syncthreads();
    for (int kk = 0; kk < kTileK; kk += kK) {
      FragmentA a[2];
      FragmentB b[2];
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a[i], &proto_tiles[stage][warp_m + 16 * i][kk], kLdTensorCore);
        wmma::load_matrix_sync(b[i], &row_tiles_shared[stage][warp_n + 16 * i][kk],
                               kLdTensorCore);
        if constexpr (kK == 8) {  // TF32: round the float32 operands as the MMA expects
          for (int t = 0; t < a[i].num_elements; ++t) {
            a[i].x[t] = wmma::__float_to_tf32(a[i].x[t]);
          }
          for (int t = 0; t < b[i].num_elements; ++t) {
            b[i].x[t] = wmma::__float_to_tf32(b[i].x[t]);
          }
        }
      }
      for (int i = 0; i < 2; ++i) {
        for (int j = 0; j < 2; ++j) {
          wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  // the stages are dead: the buffer now holds the dot tile
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(&dots[warp_m + 16 * i][warp_n + 16 * j], acc[i][j], kLdC,
                              wmma::mem_row_major);
    }
  }
  __syncthreads();
  merge_tile_candidates<T>(&dots[0][0], metric, x, protos, x_sq, proto_sq, first_proto,
                           first_row, best);
#else
  __trap();  // the glue launches tensor-core kernels on sm_80+ only
#endif
}

// ------------------------------------------------------------------------------------------
// SIMT: exact float32 FMAs (float32 without TF32, and any dtype before sm_80). Each thread
// computes 4 prototypes x 8 rows; rows are strided by 8 so that a warp reads distinct banks.

template <typename T>
__global__ void __launch_bounds__(kSearchThreads)
    min_distance_search_simt_kernel(Metric metric, RowsView x, RowsView protos,
                                    const float* __restrict__ x_sq,
                                    const float* __restrict__ proto_sq,
                                    unsigned long long* __restrict__ best, int64_t row_tiles) {
  constexpr int kProtosPerThread = 4;
  constexpr int kRowsPerThread = 8;
  constexpr int kRowGroups = kTileN / kRowsPerThread;  // threads along rows
  static_assert(kTileM / kProtosPerThread * kRowGroups == kSearchThreads, "threads cover tile");
  __shared__ float proto_tile[kTileK][kLdSimt];
  __shared__ float row_tile[kTileK][kLdSimt];
  __shared__ float dots[kTileM][kLdC];
  __shared__ int64_t proto_offsets[kTileM];
  __shared__ int64_t row_offsets[kTileN];

  const int64_t first_proto = (blockIdx.x / row_tiles) * kTileM;
  const int64_t first_row = (blockIdx.x % row_tiles) * kTileN;
  row_offsets_of_tile(protos, first_proto, proto_offsets);
  row_offsets_of_tile(x, first_row, row_offsets);
  const T* proto_data = static_cast<const T*>(protos.data);
  const T* x_data = static_cast<const T*>(x.data);
  const int64_t dim = x.dim;
  const int proto_group = static_cast<int>(threadIdx.x) / kRowGroups;
  const int row_group = static_cast<int>(threadIdx.x) % kRowGroups;
  float acc[kProtosPerThread][kRowsPerThread] = {};
  __syncthreads();  // the offsets

  for (int64_t k0 = 0; k0 < dim; k0 += kTileK) {
    for (int e = static_cast<int>(threadIdx.x); e < kTileM * kTileK; e += kSearchThreads) {
      const int row = e / kTileK;
      const int col = e % kTileK;
      proto_tile[col][row] = to_float(tile_element(proto_data, proto_offsets, row, k0 + col, dim));
      row_tile[col][row] = to_float(tile_element(x_data, row_offsets, row, k0 + col, dim));
    }
    __syncthreads();
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[kProtosPerThread];
      float b[kRowsPerThread];
      for (int i = 0; i < kProtosPerThread; ++i) {
        a[i] = proto_tile[kk][proto_group * kProtosPerThread + i];
      }
      for (int j = 0; j < kRowsPerThread; ++j) {
        b[j] = row_tile[kk][row_group + kRowGroups * j];
      }
      for (int i = 0; i < kProtosPerThread; ++i) {
        for (int j = 0; j < kRowsPerThread; ++j) {
          acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
      }
    }
    __syncthreads();
  }
  for (int i = 0; i < kProtosPerThread; ++i) {
    for (int j = 0; j < kRowsPerThread; ++j) {
      dots[proto_group * kProtosPerThread + i][row_group + kRowGroups * j] = acc[i][j];
    }
  }
  __syncthreads();
  merge_tile_candidates<T>(&dots[0][0], metric, x, protos, x_sq, proto_sq, first_proto,
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
    if (path == GemmPath::kTensorCore) {
      if (rows_load_in_chunks<T>(x) && rows_load_in_chunks<T>(protos)) {
        min_distance_search_tensor_core_kernel<T, true>
            <<<static_cast<unsigned>(blocks), kSearchThreads, 0, stream>>>(
                metric, x, protos, x_sq, proto_sq, best, row_tiles);
      } else {
        min_distance_search_tensor_core_kernel<T, false>
            <<<static_cast<unsigned>(blocks), kSearchThreads, 0, stream>>>(
                metric, x, protos, x_sq, proto_sq, best, row_tiles);
      }
    } else {
      min_distance_search_simt_kernel<T>
          <<<static_cast<unsigned>(blocks), kSearchThreads, 0, stream>>>(
              metric, x, protos, x_sq, proto_sq, best, row_tiles);
    }
    return cudaGetLastError();
  });
}

}  // namespace protokern::cuda
