// The fused nearest_prototypes search: a block takes kTileN rows of x and streams every
// prototype past them, one GEMM tile (dot_tiles.cuh, kTileM prototypes) at a time; the (rows, M)
// distances never leave shared memory.
//
// From each tile a warp per row takes bounds of the true distances: the GEMM expansion minus /
// plus its rounding bound (`Bound`: protokern.backends.triton.min_distance.rounding_bound's,
// the Triton kernel's), and keeps, spread over its lanes (RowState), the row's k smallest upper
// bounds, the largest of which is T, and 32 candidate slots: the prototypes of smallest lower
// bound among those offered, a prototype being offered when its lower bound is at most the T of
// the time (T only falls, so one that is not offered is farther than k others). `rejected` is
// the smallest lower bound of an offered prototype that is not in the slots (evicted by a
// smaller one, or finding the slots full of smaller ones). At the end, if rejected > T, every
// prototype outside the slots is farther than the k whose upper bounds are at most T: the k
// nearest are among the slots whose lower bound is at most T, which are recomputed directly
// (warp_pair_sums, as min_distance's recompute: no expansion) and ranked by (exact distance,
// index). So ties go to the lowest index and a prototype equal to a patch is found at distance 0
// whatever the GEMM's rounding. Otherwise (more near-ties than slots; or a pair the expansion
// cannot bound: a NaN, inf or huge squared norm, as the Triton kernel: a bad prototype sends
// every row) the row is flagged for the direct search (nearest_prototypes_direct_search_kernel).
//
// As in the Triton kernel, TF32's rounding of the operands is left out of the bound: identical
// windows still round alike (exact ties are caught) and near-ties within TF32's tolerance may
// move, as the contract lets them; the values are recomputed from the inputs all the same.
#include <limits>

#include "cuda/dot_tiles.cuh"
#include "cuda/nearest_prototypes_kernels.h"
#include "cuda/warp_first_k.cuh"

namespace protokern::cuda {
namespace {

constexpr int kRowsPerWarp = kTileN / (kTileThreads / kWarpSize);  // 16
static_assert(kNearestMaxK <= kWarpSize, "one upper bound per lane");

constexpr float kInf = std::numeric_limits<float>::infinity();

// A squared norm above this (max / 8) may overflow once doubled or added to another: pairs
// with one are not bounded by the expansion (launch.huge in the Triton backend).
constexpr float kHugeSquaredNorm = std::numeric_limits<float>::max() / 8;

// The expansion of a pair is within growth * (|x|^2 + |p|^2) + floor of the truth
// (sqeuclidean; cosine: within growth).
struct Bound {
  float growth;
  float floor;
};

// One side's terms of a pair's bounds: with (a, b) the row's and the prototype's terms,
//   lower = (a.lower + b.lower) - (dot * a.scale) * b.scale, upper likewise with .upper.
// sqeuclidean: row ((1 - g) |x|^2 - floor, (1 + g) |x|^2 + floor, 1), prototype ((1 - g) |p|^2,
// (1 + g) |p|^2, 2); cosine: row (1 - g, 1 + g, 1 / max(|x|, eps)), prototype (0, 0,
// 1 / max(|p|, eps)). The order of operations is tiles.distance_bounds'.
struct BoundTerms {
  float lower;
  float upper;
  float scale;
};

__device__ __forceinline__ BoundTerms row_terms(Metric metric, float squared_norm, Bound bound) {
  if (metric == Metric::kSqEuclidean) {
    return {(1.f - bound.growth) * squared_norm - bound.floor,
            (1.f + bound.growth) * squared_norm + bound.floor, 1.f};
  }
  return {1.f - bound.growth, 1.f + bound.growth,
          1.f / clamp_min_keep_nan(sqrtf(squared_norm), kNormFloorFloat)};
}

__device__ __forceinline__ BoundTerms prototype_terms(Metric metric, float squared_norm,
                                                      Bound bound) {
  if (metric == Metric::kSqEuclidean) {
    return {(1.f - bound.growth) * squared_norm, (1.f + bound.growth) * squared_norm, 2.f};
  }
  return {0.f, 0.f, 1.f / clamp_min_keep_nan(sqrtf(squared_norm), kNormFloorFloat)};
}

// What a warp keeps of one row across the tiles (see the file comment), while it offers it a
// tile; between tiles it lives in RowStates.
struct RowState {
  float upper;     // lane j: the j-th smallest upper bound so far
  float lower;     // lane j: slot j's lower bound (inf: empty)
  int32_t index;   // lane j: slot j's prototype (-1: empty)
  float rejected;  // warp-uniform; -inf: the row goes to the direct search
};

// The states of a block's kTileN rows, in dynamic shared memory (with the tile, past the 48 KB
// of static shared memory for float32's tensor-core stages); row i belongs to warp
// i / kRowsPerWarp alone.
struct RowStates {
  float upper[kTileN][kWarpSize];
  float lower[kTileN][kWarpSize];
  int32_t index[kTileN][kWarpSize];
  float rejected[kTileN];

  __device__ RowState load(int row, int lane) const {
    return {upper[row][lane], lower[row][lane], index[row][lane], rejected[row]};
  }
  __device__ void store(int row, int lane, const RowState& s) {
    upper[row][lane] = s.upper;
    lower[row][lane] = s.lower;
    index[row][lane] = s.index;
    if (lane == 0) {
      rejected[row] = s.rejected;
    }
  }
};

// Offers each lane's pair (lower, upper, prototype m; inf bounds: nothing) to the row's state.
__device__ __forceinline__ void offer(RowState& s, float lower, float upper, int32_t m, int k,
                                      int lane) {
  float threshold = __shfl_sync(kFullMask, s.upper, k - 1);
  unsigned pending = __ballot_sync(kFullMask, upper < threshold);
  while (pending != 0) {  // uniform: one upper bound at a time, in lane order
    const int from = __ffs(pending) - 1;
    s.upper = insert_ascending(s.upper, __shfl_sync(kFullMask, upper, from), lane);
    threshold = __shfl_sync(kFullMask, s.upper, k - 1);
    // the lanes after `from` still below the (lower) threshold
    pending &= __ballot_sync(kFullMask, upper < threshold) & ~((2u << from) - 1u);
  }
  unsigned offered = __ballot_sync(kFullMask, lower < kInf && lower <= threshold);
  while (offered != 0) {
    const int from = __ffs(offered) - 1;
    offered &= offered - 1;
    const float candidate = __shfl_sync(kFullMask, lower, from);
    const int32_t candidate_m = __shfl_sync(kFullMask, m, from);
    // the slot of largest lower bound (of the highest lane among equals), in every lane
    float largest = s.lower;
    int at = lane;
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(kFullMask, largest, offset);
      const int other_at = __shfl_xor_sync(kFullMask, at, offset);
      if (other > largest || (other == largest && other_at > at)) {
        largest = other;
        at = other_at;
      }
    }
    if (candidate < largest) {  // it takes that slot (an empty one first: inf)
      s.rejected = fminf(s.rejected, largest);
      if (lane == at) {
        s.lower = candidate;
        s.index = candidate_m;
      }
    } else {
      s.rejected = fminf(s.rejected, candidate);
    }
  }
}

// The row's k nearest from its slots when its bounds settle it (searched[row] = 0), else
// searched[row] = 1.
template <typename T>
__device__ __forceinline__ void finish_row(const RowState& s, Metric metric, const RowsView& x,
                                           const RowsView& protos, int64_t row, int k, int lane,
                                           T* values, int64_t* indices, uint8_t* searched) {
  const float threshold = __shfl_sync(kFullMask, s.upper, k - 1);
  const bool settled = s.rejected > threshold;  // uniform; false for -inf and for T = inf
  if (lane == 0) {
    searched[row] = settled ? 0 : 1;
  }
  if (!settled) {
    return;
  }
  const int64_t image = row / x.rows_per_image;
  const T* row_data = row_pointer<T>(x, image, row - image * x.rows_per_image);
  unsigned long long best = ~0ull;
  unsigned candidates = __ballot_sync(kFullMask, s.index >= 0 && s.lower <= threshold);
  while (candidates != 0) {
    const int from = __ffs(candidates) - 1;
    candidates &= candidates - 1;
    const int32_t m = __shfl_sync(kFullMask, s.index, from);
    best = insert_ascending(
        best, exact_key(metric, row_data, row_pointer<T>(protos, 0, m), m, x.dim, lane), lane);
  }
  store_first_k(best, k, row, lane, values, indices);
}

// One block per kTileN rows; warp w keeps rows w * kRowsPerWarp .. (w + 1) * kRowsPerWarp - 1.
// Three blocks per SM: what float32's tensor-core variant fits (67 KB of shared memory each, an
// A100 has 164 KB); without that target ptxas spilled the bfloat16 variant at 80 registers.
template <typename T, typename Tile>
__global__ void __launch_bounds__(kTileThreads, 3)
    nearest_prototypes_search_kernel(Metric metric, RowsView x, RowsView protos,
                                     const float* __restrict__ x_sq,
                                     const float* __restrict__ proto_sq, Bound bound, int k,
                                     T* __restrict__ values, int64_t* __restrict__ indices,
                                     uint8_t* __restrict__ searched) {
  __shared__ Tile tile;
  extern __shared__ __align__(16) unsigned char dynamic_shared[];
  RowStates& states = *reinterpret_cast<RowStates*>(dynamic_shared);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t total_rows = x.num_images * x.rows_per_image;
  const int64_t num_protos = protos.rows_per_image;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kTileN;
  const T* proto_data = static_cast<const T*>(protos.data);
  const T* x_data = static_cast<const T*>(x.data);
  row_offsets_of_tile(x, first_row, tile.row_offsets);
  for (int i = 0; i < kRowsPerWarp; ++i) {
    states.store(warp * kRowsPerWarp + i, lane, RowState{kInf, kInf, -1, kInf});
  }

  for (int64_t first_proto = 0; first_proto < num_protos; first_proto += kTileM) {
    __syncthreads();  // every warp is done with the last tile's dots and prototype offsets
    row_offsets_of_tile(protos, first_proto, tile.proto_offsets);
    __syncthreads();
    tile.multiply(proto_data, x_data, x.dim, DotLayout::kRowMajor);
    // this lane's prototypes of the tile: lane and lane + 32
    BoundTerms terms[2];
    bool usable[2];
    bool unbounded = false;
    for (int h = 0; h < 2; ++h) {
      const int64_t m = first_proto + lane + kWarpSize * h;
      const float p_sq = m < num_protos ? proto_sq[m] : 0.f;
      usable[h] = m < num_protos && p_sq <= kHugeSquaredNorm;
      unbounded = unbounded || (m < num_protos && !(p_sq <= kHugeSquaredNorm));
      terms[h] = prototype_terms(metric, p_sq, bound);
    }
    unbounded = __any_sync(kFullMask, unbounded);
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int local_row = warp * kRowsPerWarp + i;
      const int64_t row = first_row + local_row;
      if (row >= total_rows || states.rejected[local_row] == -kInf) {
        continue;  // uniform across the warp
      }
      RowState s = states.load(local_row, lane);
      const float r_sq = x_sq[row];
      if (unbounded || !(r_sq <= kHugeSquaredNorm)) {
        s.rejected = -kInf;
      } else {
        const BoundTerms row_bound = row_terms(metric, r_sq, bound);
        for (int h = 0; h < 2; ++h) {
          const int proto = lane + kWarpSize * h;
          float lower = kInf;
          float upper = kInf;
          if (usable[h]) {
            const float scaled = tile.dot(DotLayout::kRowMajor, proto, local_row) *
                                 row_bound.scale * terms[h].scale;
            lower = (row_bound.lower + terms[h].lower) - scaled;
            upper = (row_bound.upper + terms[h].upper) - scaled;
          }
          offer(s, lower, upper, static_cast<int32_t>(first_proto + proto), k, lane);
        }
      }
      states.store(local_row, lane, s);
    }
  }
  __syncthreads();  // the last stores of `rejected` (lane 0) before every lane reads them
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int local_row = warp * kRowsPerWarp + i;
    const int64_t row = first_row + local_row;
    if (row < total_rows) {
      finish_row(states.load(local_row, lane), metric, x, protos, row, k, lane, values, indices,
                 searched);
    }
  }
}

// protokern.backends.triton.min_distance.rounding_bound for float32 accumulation: the
// reference's summation bound plus a few eps for the kernel's rearrangements.
Bound rounding_bound(Metric metric, int64_t dim) {
  const double eps = std::numeric_limits<float>::epsilon();
  if (metric == Metric::kSqEuclidean) {
    return {static_cast<float>((dim + 12) * eps),
            static_cast<float>(4.0 * (dim + 1) * std::numeric_limits<float>::min())};
  }
  return {static_cast<float>((2 * dim + 12) * eps), 0.f};
}

}  // namespace

cudaError_t launch_nearest_prototypes_search(ScalarKind kind, GemmPath path, Metric metric,
                                             RowsView x, RowsView protos, const float* x_sq,
                                             const float* proto_sq, int64_t k, void* values,
                                             int64_t* indices, uint8_t* searched,
                                             cudaStream_t stream) {
  const int64_t num_rows = x.num_images * x.rows_per_image;
  if (num_rows == 0) {
    return cudaSuccess;
  }
  const int64_t blocks = blocks_for(num_rows, kTileN);
  if (blocks == 0 || k < 1 || k > kNearestMaxK) {
    return cudaErrorInvalidConfiguration;
  }
  const Bound bound = rounding_bound(metric, x.dim);
  return dispatch_scalar_kind(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto launch = [&](auto kernel) {
      // past 48 KB with the tile's static shared memory (float32's tensor-core stages): opt in
      constexpr int kStateBytes = static_cast<int>(sizeof(RowStates));
      cudaError_t error =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kStateBytes);
      if (error != cudaSuccess) {
        return error;
      }
      kernel<<<static_cast<unsigned>(blocks), kTileThreads, kStateBytes, stream>>>(
          metric, x, protos, x_sq, proto_sq, bound, static_cast<int>(k),
          static_cast<T*>(values), indices, searched);
      return cudaGetLastError();
    };
    if (path == GemmPath::kSimt) {
      return launch(nearest_prototypes_search_kernel<T, SimtTile<T>>);
    }
    if (rows_load_in_chunks<T>(x) && rows_load_in_chunks<T>(protos)) {
      return launch(nearest_prototypes_search_kernel<T, TensorCoreTile<T, true>>);
    }
    return launch(nearest_prototypes_search_kernel<T, TensorCoreTile<T, false>>);
  });
}

}  // namespace protokern::cuda
