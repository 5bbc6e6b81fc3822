// Small sorted lists spread over the lanes of a warp (lane j holds the j-th smallest entry),
// for the nearest_prototypes kernels: a row's k smallest upper bounds while its search runs,
// and its k nearest prototypes as packed keys (pack_candidate: NaN first, then by distance,
// then by prototype index) once their exact distances are known. Every lane of the warp takes
// part in every call, with the same arguments where they are warp-uniform.
#pragma once

#include "cuda/device_utils.cuh"

namespace protokern::cuda {

// `list` (this lane's entry of an ascending list) with `value` (warp-uniform) inserted, the
// largest entry dropped off the last lane.
template <typename V>
__device__ __forceinline__ V insert_ascending(V list, V value, int lane) {
  // the lanes whose entries stay are a prefix (the list is sorted)
  const int at = __popc(__ballot_sync(kFullMask, list <= value));
  const V shifted = __shfl_up_sync(kFullMask, list, 1);
  return lane < at ? list : lane == at ? value : shifted;
}

// The packed key of prototype m for the row `row`: its exact distance (the sums of
// warp_pair_sums, as min_distance's recompute) and its index.
template <typename T>
__device__ __forceinline__ unsigned long long exact_key(Metric metric, const T* row,
                                                        const T* proto, int64_t m, int64_t dim,
                                                        int lane) {
  return pack_candidate(distance_from_sums(metric, warp_pair_sums(row, proto, dim, lane)), m);
}

// Writes the k smallest keys of `best` (lanes 0..k-1) as row `row`'s values and indices.
template <typename T>
__device__ __forceinline__ void store_first_k(unsigned long long best, int k, int64_t row,
                                              int lane, T* values, int64_t* indices) {
  if (lane < k) {
    values[row * k + lane] = from_float<T>(unpack_distance(best));
    indices[row * k + lane] = unpack_position(best);
  }
}

}  // namespace protokern::cuda
