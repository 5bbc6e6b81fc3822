// The 8 x 8 block transpose of transpose.h, as GCC vector shuffles (unpack, then pairs, then
// 128-bit halves), compiled for AVX-512, AVX2 and baseline x86-64 (PK_VECTOR_CLONES).
#include "cpu/transpose.h"

#include <algorithm>

#include "cpu/cpu_utils.h"

namespace protokern::cpu {
namespace {

// Eight floats at any 4-byte-aligned address (loads and stores through it are unaligned ones).
typedef float Eight __attribute__((vector_size(32), aligned(4), may_alias));

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define PK_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#endif

#ifdef PK_SHUFFLE
// Rows src[0 .. 7] (stride src_stride) become columns of dst (stride dst_stride).
PK_INLINE void transpose_8x8(const float* src, int64_t src_stride, float* dst,
                             int64_t dst_stride) {
  Eight r[8], t[8], s[8];
  for (int i = 0; i < 8; ++i) r[i] = *reinterpret_cast<const Eight*>(src + i * src_stride);
  for (int i = 0; i < 8; i += 2) {  // (r_i[0], r_i+1[0], r_i[1], r_i+1[1], then the same at 4, 5)
    t[i] = PK_SHUFFLE(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = PK_SHUFFLE(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {  // four rows' values of columns j and j + 4
    s[i] = PK_SHUFFLE(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    s[i + 1] = PK_SHUFFLE(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    s[i + 2] = PK_SHUFFLE(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    s[i + 3] = PK_SHUFFLE(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int j = 0; j < 4; ++j) {  // rows 0-3 from s[j], rows 4-7 from s[j + 4]
    *reinterpret_cast<Eight*>(dst + j * dst_stride) =
        PK_SHUFFLE(s[j], s[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    *reinterpret_cast<Eight*>(dst + (j + 4) * dst_stride) =
        PK_SHUFFLE(s[j], s[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}
#endif

}  // namespace

PK_VECTOR_CLONES void transpose(const float* src, int64_t rows, int64_t cols, int64_t src_stride,
                                float* dst, int64_t dst_stride) {
  int64_t full_rows = 0, full_cols = 0;
#ifdef PK_SHUFFLE
  full_rows = rows / 8 * 8;
  full_cols = cols / 8 * 8;
  // 16 source rows per sweep, so that each destination row gets a whole 64-byte line at a time.
  for (int64_t r0 = 0; r0 < full_rows; r0 += 16) {
    const int64_t r_end = std::min(r0 + 16, full_rows);
    for (int64_t c0 = 0; c0 < full_cols; c0 += 8)
      for (int64_t r = r0; r < r_end; r += 8)
        transpose_8x8(src + r * src_stride + c0, src_stride, dst + c0 * dst_stride + r,
                      dst_stride);
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {  // the edges: columns past full_cols, rows past full_rows
    const int64_t c_begin = r < full_rows ? full_cols : 0;
    for (int64_t c = c_begin; c < cols; ++c) dst[c * dst_stride + r] = src[r * src_stride + c];
  }
}

}  // namespace protokern::cpu
