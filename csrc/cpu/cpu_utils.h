// Helpers shared by the forward and backward CPU kernels (raw pointers only; see
// min_distance_kernels.h): the vectorisation macros and the packing of windows as rows.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/min_distance_kernels.h"
#include "cpu/task_pool.h"
#include "cpu/transpose.h"

// Element-wise passes are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time,
// so one build runs everywhere and still vectorises where it can (the GEMM is PyTorch's BLAS).
// Helpers are force-inlined (PK_INLINE) into those entry points (PK_VECTOR_CLONES) so that they
// get the same instruction set: a helper that is not inlined runs the baseline one.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PK_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PK_VECTOR_CLONES
#endif
#if defined(__GNUC__)
#define PK_INLINE inline __attribute__((always_inline))
#define PK_LAMBDA_INLINE __attribute__((always_inline))
#else
#define PK_INLINE inline
#define PK_LAMBDA_INLINE
#endif

namespace protokern::cpu {

// 256-bit GCC vector types of the working type, for the reductions and exact sums that the vector
// clones lower to their own registers (specialised: the attribute does not survive a dependent
// alias). 256, not 512: the AVX2 clone lowered 512-bit types to scalar code with stack traffic
// (perf at cub: the reduction 1.7x the GEMM's samples); the AVX-512 clone runs them in ymm
// registers.
template <typename acc_t>
struct VectorOf;
template <>
struct VectorOf<float> {
  using Index = int32_t;
  typedef float Values __attribute__((vector_size(32)));
  typedef int32_t Indices __attribute__((vector_size(32)));
};
template <>
struct VectorOf<double> {
  using Index = int64_t;
  typedef double Values __attribute__((vector_size(32)));
  typedef int64_t Indices __attribute__((vector_size(32)));
};


// Calls fn(c) for each c in 0 .. count - 1 with flags[c] != 0, in order, reading the flags
// eight at a time: where few are set (the shortlists of the forward kernels) most words are zero
// and cost one test, where a test and branch per flag was a third of the reduction.
template <typename Fn>
PK_INLINE void for_each_flagged(const uint8_t* flags, int64_t count, Fn&& fn) {
  for (int64_t c8 = 0; c8 < count; c8 += 8) {
    const int64_t end = std::min(c8 + 8, count);
    uint64_t word = 0;
    std::memcpy(&word, flags + c8, static_cast<size_t>(end - c8));
    if (word == 0) continue;
    for (int64_t c = c8; c < end; ++c)
      if (flags[c]) fn(c);
  }
}

// Element-wise work below this many elements runs on the calling thread: opening a parallel
// region wakes the other threads, and with another process competing for the cores a waking
// thread waited about 2 ms on average before it ran (benchmarks/NOTES.md, "Packing 1x1 windows
// as 8 x 8 blocks, small parallel regions under load, ..."), where streaming through 1M floats
// or indices takes about 0.1-0.3 ms.
inline constexpr int64_t kMinParallelElements = int64_t{1} << 20;

// at::parallel_for's grain for items of `item_size` elements each: at least `fewest` items and
// kMinParallelElements elements per chunk, so that a small job runs on the calling thread.
inline int64_t parallel_grain(int64_t fewest, int64_t item_size) {
  return std::max(fewest, kMinParallelElements / std::max<int64_t>(item_size, 1));
}

// Runs worker(take) on the calling thread and on helpers (task_pool.h), at most
// at::get_num_threads() threads in all; take(task) claims the next of tasks 0 .. count - 1 from a
// shared counter and returns false when none is left. Unlike at::parallel_for's static split, a
// thread the OS deschedules (another process competing for the cores) then takes fewer tasks
// instead of keeping the others waiting at the end of the region, and a helper that wakes too
// late to take one is not waited for. Each task writes its own outputs, so the results do not
// depend on which thread ran it. Per-thread scratch belongs in the worker, before its loop over
// take.
template <typename Worker>
void parallel_tasks(int64_t count, const Worker& worker) {
  if (count <= 0) return;
  run_tasks(count, at::get_num_threads(), [&worker](TaskCounter& take) { worker(take); });
}

// at::parallel_for's contract on the same threads as parallel_tasks: fn(chunk_begin, chunk_end)
// over [begin, end) in the chunks at::parallel_for would make (at most at::get_num_threads(), of
// at least `grain` items), on the calling thread when the range is at most one grain. Kernels use
// it instead of at::parallel_for so that OpenMP's threads, which spin for a while after each
// region, do not compete with the pool's helpers for the cores in the next job (imagenet
// forward+backward, quiet, the pool's helpers with OpenMP regions around them: 91.5-97.4 ms
// against 84-85 with OpenMP alone; with OpenMP's threads made passive, OMP_WAIT_POLICY=passive,
// 80.9 against 81.8).
template <typename Fn>
void parallel_chunks(int64_t begin, int64_t end, int64_t grain, const Fn& fn) {
  const int64_t items = end - begin;
  if (items <= 0) return;
  const int64_t least = std::max<int64_t>(grain, 1);
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), (items + least - 1) / least);
  if (chunks <= 1) {
    fn(begin, end);
    return;
  }
  const int64_t chunk = (items + chunks - 1) / chunks;
  parallel_tasks(chunks, [&](auto&& take) {
    for (int64_t c; take(c);) {
      const int64_t first = begin + c * chunk;
      if (first < end) fn(first, std::min(end, first + chunk));
    }
  });
}

// Windows of images [first, first + count) as rows (count * L, K), in the prototypes' order.
template <typename in_t, typename acc_t>
void pack_rows(const in_t* x, const FeatureMap& map, int64_t first, int64_t count, acc_t* rows) {
  const int64_t positions = map.positions(), size = map.row_size();
  const int64_t out_h = map.out_h(), out_w = map.out_w();
  const int64_t window = map.patch_h * map.patch_w;
  for (int64_t b = 0; b < count; ++b) {
    const in_t* image = x + (first + b) * map.stride_b;
    acc_t* image_rows = rows + b * positions * size;
    if (map.stride_c <= map.stride_w) {  // channels_last-like: walk channels innermost
      for (int64_t h = 0; h < out_h; ++h)
        for (int64_t w = 0; w < out_w; ++w)
          for (int64_t i = 0; i < map.patch_h; ++i)
            for (int64_t j = 0; j < map.patch_w; ++j) {
              const in_t* src = image + (h + i) * map.stride_h + (w + j) * map.stride_w;
              acc_t* dst = image_rows + (h * out_w + w) * size + i * map.patch_w + j;
              for (int64_t d = 0; d < map.channels; ++d)
                dst[d * window] = static_cast<acc_t>(src[d * map.stride_c]);
            }
    } else if (window == 1 && map.stride_w == 1 && std::is_same_v<in_t, float> &&
               std::is_same_v<acc_t, float>) {
      // 1x1 windows of a channels-first float map: the rows are its (D, H W) planes transposed,
      // 8 x 8 blocks at a time (transpose.h), the whole plane at once where its rows are adjacent.
      const float* src = reinterpret_cast<const float*>(image);
      float* dst = reinterpret_cast<float*>(image_rows);
      if (map.stride_h == out_w)
        transpose(src, map.channels, out_h * out_w, map.stride_c, dst, size);
      else
        for (int64_t h = 0; h < out_h; ++h)
          transpose(src + h * map.stride_h, map.channels, out_w, map.stride_c,
                    dst + h * out_w * size, size);
    } else if (window == 1 && map.stride_w == 1) {
      // 1x1 windows of a channels-first map: the rows are the image's (D, H W) transposed,
      // taken 16 channels at a time, so that each row gets 16 consecutive values (a cache line)
      // from 16 sequential reads; the walk below wrote one float per cache line, 512 floats
      // apart at cub14, and packing was a third of its forward+backward's samples.
      constexpr int64_t kChannels = 16;
      for (int64_t d0 = 0; d0 < map.channels; d0 += kChannels) {
        const int64_t count_d = std::min(kChannels, map.channels - d0);
        for (int64_t h = 0; h < out_h; ++h) {
          const in_t* src = image + d0 * map.stride_c + h * map.stride_h;
          acc_t* dst = image_rows + h * out_w * size + d0;
          for (int64_t w = 0; w < out_w; ++w)
            for (int64_t d = 0; d < count_d; ++d)
              dst[w * size + d] = static_cast<acc_t>(src[d * map.stride_c + w]);
        }
      }
    } else {  // channels first: walk the map's columns innermost
      for (int64_t d = 0; d < map.channels; ++d)
        for (int64_t i = 0; i < map.patch_h; ++i)
          for (int64_t j = 0; j < map.patch_w; ++j) {
            const int64_t k = (d * map.patch_h + i) * map.patch_w + j;
            for (int64_t h = 0; h < out_h; ++h) {
              const in_t* src = image + d * map.stride_c + (h + i) * map.stride_h +
                                j * map.stride_w;
              acc_t* dst = image_rows + h * out_w * size + k;
              for (int64_t w = 0; w < out_w; ++w)
                dst[w * size] = static_cast<acc_t>(src[w * map.stride_w]);
            }
          }
    }
  }
}

}  // namespace protokern::cpu
