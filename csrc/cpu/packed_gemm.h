// protokern's own float32 GEMM for the forward kernels' tiles, where PyTorch's BLAS is slow.
//
// Why: on AMD EPYC hosts torch's MKL runs its sgemm at 66 GFLOP/s per core on a Zen 5 (AVX-512,
// two 512-bit FMA pipes), where the register-blocked AVX-512 kernel below runs at 150-190 and
// OpenBLAS (faiss-cpu's) at 97: the forward kernels, which are GEMM-bound, lost to faiss there
// for want of a GEMM, not of a reduction (benchmarks/NOTES.md, "An own GEMM for AMD hosts").
// On Intel hosts MKL is the faster one, so the choice is per host (GemmChoice below).
//
// Layout: a task's rows (count x size, row-major, as pack_rows writes them) are repacked once
// into panels of kPanelRows rows, k-major (panel p holds rows 48p .. 48p + 47, element (r, k) at
// k * 48 + r, zero rows past count), and then multiplied with block after block of prototypes
// straight from the bank (M x size row-major: a prototype's k-th value is broadcast, so the bank
// needs no packing). A micro-tile is 48 rows (three 16-float vectors) x 8 prototypes: 24
// accumulators over the whole depth, written once into the row-major tile the reductions read.
// Each product is a sum of `size` float32 terms in some order, so the expansion's rounding bound
// (gemm_tiles.h's callers: g = (size + 12) eps ...) holds for it as for any BLAS.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace protokern::cpu {

inline constexpr int64_t kPanelRows = 48;

// Which GEMM the float tiles use. kAuto: the packed kernel where it was measured faster than
// torch's BLAS, an AMD CPU of family 26 (Zen 5) or later with AVX-512F; torch's BLAS elsewhere
// (Intel, where MKL is the faster; Zen 4, AVX-512 too but not yet measured; AVX2-only CPUs,
// which cannot run it).
enum class GemmChoice : int { kAuto = 0, kBlas = 1, kPacked = 2 };

// Sets the choice for the whole process and returns the previous one. kPacked on a CPU without
// AVX-512F raises ValueError.
GemmChoice set_gemm_choice(GemmChoice choice);
GemmChoice gemm_choice();
bool packed_gemm_supported();  // this CPU runs the packed kernel (AVX-512F)
bool use_packed_gemm();        // what the float tiles do now (kAuto resolved)

// Floats the panels of `count` rows of length `size` take.
inline int64_t packed_panels_size(int64_t count, int64_t size) {
  return (count + kPanelRows - 1) / kPanelRows * kPanelRows * size;
}

// rows (count x size, row-major) -> panels (packed_panels_size floats).
void pack_row_panels(const float* rows, int64_t count, int64_t size, float* panels);

// tile (count x columns, rows `ld` apart) = rows . prototypes^T, the rows given as their panels
// and prototypes (columns x size) row-major. Runs on the calling thread. Needs the AVX-512F CPU.
void packed_gemm(const float* panels, int64_t count, const float* prototypes, int64_t columns,
                 int64_t size, float* tile, int64_t ld);

// out (rows x columns, row-major) = A . B, with A(i, d) = a[i * a_row + d * a_depth] (any
// strides: A may be a transpose) and B (depth x columns) row-major with rows b_row apart. The
// other orientation of the same micro-kernel idea: 8 rows of A broadcast against 48 columns of B
// (three vectors, masked at the edge), so A needs no packing; the depth goes in chunks sized to
// the L1 data cache (B's chunk of 48 columns copied contiguous, then read from L1 by every row
// tile). Parallel over torch's threads, each writing its own blocks of out. For the
// one-position backward's dense products. Needs the AVX-512F CPU.
void packed_matmul(const float* a, int64_t a_row, int64_t a_depth, const float* b, int64_t b_row,
                   int64_t rows, int64_t depth, int64_t columns, float* out);

}  // namespace protokern::cpu
