// The GEMM tile of the fused searches (min_distance_search_kernel.cu,
// nearest_prototypes_search_kernel.cu): one block of kTileThreads threads computes the inner
// products of kTileM prototypes with kTileN rows of x into shared memory, either on tensor cores
// (WMMA: float16/bfloat16 with k = 16, float32 as TF32 with k = 8; float accumulators) or by
// exact float32 FMAs (SIMT). The kernels around it turn the tile into distances and reduce it.
//
// A tile is a __shared__ TensorCoreTile<T, kAsync> or SimtTile<T>: the caller fills its
// proto_offsets and row_offsets (row_offsets_of_tile), synchronises, and calls multiply(),
// which returns, synchronised, with dot(m, r) = <p_m, x_r> readable by every thread. The caller
// synchronises again before it changes the offsets or calls multiply() once more (the dots share
// memory with the operand stages).
#pragma once

#include <cuda_pipeline.h>
#include <mma.h>

#include <type_traits>

#include "cuda/device_utils.cuh"

namespace protokern::cuda {

constexpr int kTileM = 64;           // prototypes per tile
constexpr int kTileN = 64;           // rows of x per tile
constexpr int kTileK = 32;           // channels per shared-memory stage
constexpr int kTileThreads = 128;    // 4 warps
constexpr int kLdC = kTileN + 4;     // float row length of the dot tile (WMMA: multiple of 4)
// Tensor-core operand row length in elements: 16-byte multiple, and 16 rows of it a 32-byte
// multiple, so every WMMA fragment pointer is 256-bit aligned as load_matrix_sync requires.
constexpr int kLdTensorCore = kTileK + 8;
constexpr int kLdSimt = kTileM + 1;  // k-major SIMT tiles; +1 avoids bank conflicts on store
static_assert(kTileM == kTileN, "the SIMT loader and the dot layouts assume square tiles");

// Where <p_m, x_r> lies in the dot tile: dots[m * kLdC + r] (kPrototypeMajor: a thread scanning
// the rows of one prototype reads consecutive floats) or dots[r * kLdC + m] (kRowMajor: the
// lanes of a warp reading one row's prototypes read consecutive floats, no bank conflict).
enum class DotLayout : int { kPrototypeMajor = 0, kRowMajor = 1 };

__device__ __forceinline__ int dot_offset(DotLayout layout, int proto, int row) {
  return layout == DotLayout::kPrototypeMajor ? proto * kLdC + row : row * kLdC + proto;
}

// Offset (elements) of row i of the tile from the data pointer, or -1 past the end, so that
// loads need no division.
__device__ inline void row_offsets_of_tile(const RowsView& rows, int64_t first_row,
                                           int64_t* offsets) {
  const int64_t total = rows.num_images * rows.rows_per_image;
  for (int i = static_cast<int>(threadIdx.x); i < kTileN; i += kTileThreads) {
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

// ------------------------------------------------------------------------------------------
// Tensor cores (WMMA). Each warp computes a 32 x 32 quarter of the tile as 2 x 2 fragments.

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
    for (int c = static_cast<int>(threadIdx.x); c < kTileN * kChunksPerRow; c += kTileThreads) {
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
    for (int e = static_cast<int>(threadIdx.x); e < kTileN * kTileK; e += kTileThreads) {
      const int row = e / kTileK;
      const int col = e % kTileK;
      tile[row][col] = tile_element(data, offsets, row, k0 + col, dim);
    }
  }
}

// The GEMM is double-buffered: while the warps multiply stage s, the copies of stage s + 1 are
// in flight (cp.async where the rows allow it). The two stages of both operands and, after the
// loop, the dot tile share one buffer (static shared memory stops at 48 KB). kSplit (float32
// only, GemmPath::kTensorCoreSplit): each TF32 fragment also keeps its tail, the TF32 rounding of
// what the head left out, and every step adds the two small products before the large one.
template <typename T, bool kAsync, bool kSplit = false>
struct TensorCoreTile {
  static_assert(!kSplit || std::is_same_v<T, float>, "the TF32 split is for float32 operands");
  using Stage = T[kTileM][kLdTensorCore];
  static constexpr size_t kStagesBytes = 4 * sizeof(Stage);  // 2 stages x (prototypes, rows)
  static constexpr size_t kDotsBytes = sizeof(float) * kTileM * kLdC;

  alignas(128) unsigned char buffer[kStagesBytes > kDotsBytes ? kStagesBytes : kDotsBytes];
  int64_t proto_offsets[kTileM];
  int64_t row_offsets[kTileN];

  __device__ float dot(DotLayout layout, int proto, int row) const {
    return reinterpret_cast<const float*>(buffer)[dot_offset(layout, proto, row)];
  }
  __device__ const float* dots() const { return reinterpret_cast<const float*>(buffer); }

  __device__ void multiply(const T* proto_data, const T* x_data, int64_t dim, DotLayout layout) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    using Operand = WmmaOperand<T>;
    constexpr int kK = Operand::kK;
    using FragmentA = wmma::fragment<wmma::matrix_a, 16, 16, kK, typename Operand::Element,
                                     wmma::row_major>;
    using FragmentB = wmma::fragment<wmma::matrix_b, 16, 16, kK, typename Operand::Element,
                                     wmma::col_major>;
    using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, kK, float>;
    Stage* proto_tiles = reinterpret_cast<Stage*>(buffer);  // [2]
    Stage* row_tiles = proto_tiles + 2;                     // [2]
    float* dot_tile = reinterpret_cast<float*>(buffer);

    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    const int warp_m = (warp / 2) * 32;
    const int warp_n = (warp % 2) * 32;
    Accumulator acc[2][2];
    for (int i = 0; i < 2; ++i) {
      for (int j = 0; j < 2; ++j) {
        wmma::fill_fragment(acc[i][j], 0.f);
      }
    }
    stage_tile<T, kAsync>(proto_tiles[0], proto_data, proto_offsets, 0, dim);
    stage_tile<T, kAsync>(row_tiles[0], x_data, row_offsets, 0, dim);
    __pipeline_commit();
    int stage = 0;
    for (int64_t k0 = 0; k0 < dim; k0 += kTileK, stage ^= 1) {
      if (k0 + kTileK < dim) {  // the next stage, into the buffer the last iteration read
        stage_tile<T, kAsync>(proto_tiles[stage ^ 1], proto_data, proto_offsets, k0 + kTileK,
                              dim);
        stage_tile<T, kAsync>(row_tiles[stage ^ 1], x_data, row_offsets, k0 + kTileK, dim);
      }
      __pipeline_commit();
      __pipeline_wait_prior(1);  // every group but the newest has landed: this stage
      __syncthreads();
      for (int kk = 0; kk < kTileK; kk += kK) {
        FragmentA a[2], a_tail[kSplit ? 2 : 1];
        FragmentB b[2], b_tail[kSplit ? 2 : 1];
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(a[i], &proto_tiles[stage][warp_m + 16 * i][kk], kLdTensorCore);
          wmma::load_matrix_sync(b[i], &row_tiles[stage][warp_n + 16 * i][kk], kLdTensorCore);
          if constexpr (kK == 8) {  // TF32: round the float32 operands as the MMA expects
            for (int t = 0; t < a[i].num_elements; ++t) {
              const float value = a[i].x[t];
              a[i].x[t] = wmma::__float_to_tf32(value);
              if constexpr (kSplit) a_tail[i].x[t] = wmma::__float_to_tf32(value - a[i].x[t]);
            }
            for (int t = 0; t < b[i].num_elements; ++t) {
              const float value = b[i].x[t];
              b[i].x[t] = wmma::__float_to_tf32(value);
              if constexpr (kSplit) b_tail[i].x[t] = wmma::__float_to_tf32(value - b[i].x[t]);
            }
          }
        }
        for (int i = 0; i < 2; ++i) {
          for (int j = 0; j < 2; ++j) {
            if constexpr (kSplit) {
              wmma::mma_sync(acc[i][j], a_tail[i], b[j], acc[i][j]);
              wmma::mma_sync(acc[i][j], a[i], b_tail[j], acc[i][j]);
            }
            wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
          }
        }
      }
      __syncthreads();  // every warp is done with this stage before it is refilled
    }
    // the stages are dead: the buffer now holds the dot tile. Fragment (i, j) covers
    // prototypes warp_m + 16 i .. and rows warp_n + 16 j ..; its element (p, r) goes to
    // dot_offset(p, r), which a column-major store gives for kRowMajor.
    for (int i = 0; i < 2; ++i) {
      for (int j = 0; j < 2; ++j) {
        const int proto = warp_m + 16 * i;
        const int row = warp_n + 16 * j;
        wmma::store_matrix_sync(&dot_tile[dot_offset(layout, proto, row)], acc[i][j], kLdC,
                                layout == DotLayout::kPrototypeMajor ? wmma::mem_row_major
                                                                     : wmma::mem_col_major);
      }
    }
    __syncthreads();
#else
    (void)proto_data;
    (void)x_data;
    (void)dim;
    (void)layout;
    __trap();  // the glue launches tensor-core kernels on sm_80+ only
#endif
  }
};

// ------------------------------------------------------------------------------------------
// SIMT: exact float32 FMAs (float32 without TF32, and any dtype before sm_80). Each thread
// computes 4 prototypes x 8 rows; rows are strided by 8 so that a warp reads distinct banks.

template <typename T>
struct SimtTile {
  float proto_tile[kTileK][kLdSimt];
  float row_tile[kTileK][kLdSimt];
  float dot_tile[kTileM * kLdC];
  int64_t proto_offsets[kTileM];
  int64_t row_offsets[kTileN];

  __device__ float dot(DotLayout layout, int proto, int row) const {
    return dot_tile[dot_offset(layout, proto, row)];
  }
  __device__ const float* dots() const { return dot_tile; }

  __device__ void multiply(const T* proto_data, const T* x_data, int64_t dim, DotLayout layout) {
    constexpr int kProtosPerThread = 4;
    constexpr int kRowsPerThread = 8;
    constexpr int kRowGroups = kTileN / kRowsPerThread;  // threads along rows
    static_assert(kTileM / kProtosPerThread * kRowGroups == kTileThreads, "threads cover tile");
    const int proto_group = static_cast<int>(threadIdx.x) / kRowGroups;
    const int row_group = static_cast<int>(threadIdx.x) % kRowGroups;
    float acc[kProtosPerThread][kRowsPerThread] = {};
    for (int64_t k0 = 0; k0 < dim; k0 += kTileK) {
      for (int e = static_cast<int>(threadIdx.x); e < kTileM * kTileK; e += kTileThreads) {
        const int row = e / kTileK;
        const int col = e % kTileK;
        proto_tile[col][row] = to_float(tile_element(proto_data, proto_offsets, row, k0 + col,
                                                     dim));
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
        dot_tile[dot_offset(layout, proto_group * kProtosPerThread + i,
                            row_group + kRowGroups * j)] = acc[i][j];
      }
    }
    __syncthreads();
  }
};

}  // namespace protokern::cuda
