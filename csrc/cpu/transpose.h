// A float32 matrix transpose for the packing of 1x1 windows of channels-first maps.
//
// Why: the rows of a (D, H, W) image's 1x1 windows are its (D, H W) planes transposed, and the
// kernels pack them once per task; element by element that ran at about four cycles a value and
// was 9.5% of the samples of a forward+backward at cub14 (benchmarks/NOTES.md, "Packing 1x1
// windows as 8 x 8 blocks").
#pragma once

#include <cstdint>

namespace protokern::cpu {

// dst[c * dst_stride + r] = src[r * src_stride + c] for r < rows, c < cols (the regions must not
// overlap). Moves 8 x 8 blocks through vector registers; the edges one value at a time.
void transpose(const float* src, int64_t rows, int64_t cols, int64_t src_stride, float* dst,
               int64_t dst_stride);

}  // namespace protokern::cpu
