// The packed float32 GEMM of packed_gemm.h: its AVX-512 micro-kernel and the per-host choice.
#include "cpu/packed_gemm.h"

#include "cpu/cpu_utils.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <string>

#if defined(__GNUC__) && defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <unistd.h>
#define PK_HAVE_PACKED_GEMM 1
#define PK_AVX512 __attribute__((target("avx512f")))
#else
#define PK_HAVE_PACKED_GEMM 0
#endif

namespace protokern::cpu {
namespace {

std::atomic<int> current_choice{static_cast<int>(GemmChoice::kAuto)};

inline constexpr int kPanelVectors = kPanelRows / 16;  // 16-float vectors per panel column
inline constexpr int64_t kTileColumns = 8;             // prototypes per micro-tile

#if PK_HAVE_PACKED_GEMM
// tile rows [0, rows) x columns [0, NC) = the panel (48 rows, k-major) . prototypes b .. b + NC
// (rows of length size, stride size). 3 NC accumulators, all of the depth in registers: every
// step loads the panel's three vectors once and broadcasts one value of each prototype.
template <int NC>
PK_AVX512 void micro_tile(const float* panel, const float* b, int64_t size, float* tile,
                          int64_t ld, int64_t rows) {
  __m512 acc[NC][kPanelVectors];
#pragma GCC unroll 8
  for (int j = 0; j < NC; ++j)
#pragma GCC unroll 3
    for (int v = 0; v < kPanelVectors; ++v) acc[j][v] = _mm512_setzero_ps();
  const float* column[NC];
#pragma GCC unroll 8
  for (int j = 0; j < NC; ++j) column[j] = b + j * size;
  for (int64_t k = 0; k < size; ++k) {
    __m512 a[kPanelVectors];
#pragma GCC unroll 3
    for (int v = 0; v < kPanelVectors; ++v) a[v] = _mm512_loadu_ps(panel + k * kPanelRows + 16 * v);
#pragma GCC unroll 8
    for (int j = 0; j < NC; ++j) {
      const __m512 p = _mm512_set1_ps(column[j][k]);
#pragma GCC unroll 3
      for (int v = 0; v < kPanelVectors; ++v) acc[j][v] = _mm512_fmadd_ps(a[v], p, acc[j][v]);
    }
  }
  // The accumulators hold columns and the tile wants rows: through a small buffer, once per
  // micro-tile (48 x 8 values against 48 x 8 x size multiply-adds).
  alignas(64) float out[NC][kPanelRows];
#pragma GCC unroll 8
  for (int j = 0; j < NC; ++j)
#pragma GCC unroll 3
    for (int v = 0; v < kPanelVectors; ++v) _mm512_store_ps(&out[j][16 * v], acc[j][v]);
  for (int64_t r = 0; r < rows; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NC; ++j) tile[r * ld + j] = out[j][r];
}

// out rows [0, R) x columns [0, 48) (+)= A rows . B's chunk: R rows of A broadcast (strided),
// three vectors of each B row, masked to the block's columns; `accumulate` adds to out.
template <int R>
PK_AVX512 void row_tile(const float* a, int64_t a_row, int64_t a_depth, const float* b,
                        int64_t b_row, int64_t depth, float* out, int64_t ld,
                        const __mmask16* masks, bool accumulate) {
  __m512 acc[R][kPanelVectors];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 3
    for (int v = 0; v < kPanelVectors; ++v)
      acc[i][v] = accumulate ? _mm512_maskz_loadu_ps(masks[v], out + i * ld + 16 * v)
                             : _mm512_setzero_ps();
  for (int64_t d = 0; d < depth; ++d) {
    __m512 bv[kPanelVectors];
#pragma GCC unroll 3
    for (int v = 0; v < kPanelVectors; ++v)
      bv[v] = _mm512_maskz_loadu_ps(masks[v], b + d * b_row + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * a_row + d * a_depth]);
#pragma GCC unroll 3
      for (int v = 0; v < kPanelVectors; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 3
    for (int v = 0; v < kPanelVectors; ++v)
      _mm512_mask_storeu_ps(out + i * ld + 16 * v, masks[v], acc[i][v]);
}

using RowTile = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*,
                         int64_t, const __mmask16*, bool);
inline constexpr int64_t kTileRows = 8;
constexpr RowTile kRowTiles[kTileRows] = {row_tile<1>, row_tile<2>, row_tile<3>, row_tile<4>,
                                          row_tile<5>, row_tile<6>, row_tile<7>, row_tile<8>};

using MicroTile = void (*)(const float*, const float*, int64_t, float*, int64_t, int64_t);
// By the micro-tile's column count, 1 .. kTileColumns (the last block's remainder).
constexpr MicroTile kMicroTiles[kTileColumns] = {micro_tile<1>, micro_tile<2>, micro_tile<3>,
                                                 micro_tile<4>, micro_tile<5>, micro_tile<6>,
                                                 micro_tile<7>, micro_tile<8>};

// rows x 48 of B (rows b_row apart, masked to the block's columns) -> packed (rows x 48,
// contiguous, zeros past the mask).
PK_AVX512 void pack_column_block(const float* b, int64_t b_row, int64_t rows,
                                 const __mmask16* masks, float* packed) {
  for (int64_t d = 0; d < rows; ++d)
#pragma GCC unroll 3
    for (int v = 0; v < kPanelVectors; ++v)
      _mm512_store_ps(packed + d * 16 * kPanelVectors + 16 * v,
                      _mm512_maskz_loadu_ps(masks[v], b + d * b_row + 16 * v));
}

// The depth of packed_matmul's chunks, from this CPU's L1 data cache: B's chunk (depth x 48
// floats) takes three quarters of it and the 8 rows of A streaming past it the rest. 192 on a
// 48 KiB L1 (Zen 5, recent Intel), 128 on 32 KiB (Zen 3 and 4). Measured on the Zen 5 only: with
// B packed, 128, 192 and 256 within noise of each other; before, in place, 64 and 256 slower.
int64_t depth_chunk() {
  static const int64_t chunk = [] {
    long l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE);
    if (l1 <= 0) l1 = 32 << 10;  // unknown (some VMs): the smaller of the usual sizes
    const int64_t fit = static_cast<int64_t>(l1) * 3 / 4 / (16 * kPanelVectors * sizeof(float));
    return std::clamp<int64_t>(fit / 16 * 16, 32, 512);
  }();
  return chunk;
}

// The x86 family of this CPU from CPUID leaf 1 (base family, plus the extended family where the
// base is 15: AMD's Zen 3 and 4 are family 25, Zen 5 family 26).
int cpu_family() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
  const int base = static_cast<int>((eax >> 8) & 0xf);
  return base == 0xf ? base + static_cast<int>((eax >> 20) & 0xff) : base;
}
#endif

}  // namespace

bool packed_gemm_supported() {
#if PK_HAVE_PACKED_GEMM
  static const bool supported = __builtin_cpu_supports("avx512f");
  return supported;
#else
  return false;
#endif
}

GemmChoice set_gemm_choice(GemmChoice choice) {
  TORCH_CHECK_VALUE(choice != GemmChoice::kPacked || packed_gemm_supported(),
                    "the packed GEMM needs a CPU with AVX-512F, which this one lacks");
  return static_cast<GemmChoice>(current_choice.exchange(static_cast<int>(choice)));
}

GemmChoice gemm_choice() { return static_cast<GemmChoice>(current_choice.load()); }

bool use_packed_gemm() {
  switch (gemm_choice()) {
    case GemmChoice::kBlas:
      return false;
    case GemmChoice::kPacked:
      return true;
    case GemmChoice::kAuto:
      break;
  }
#if PK_HAVE_PACKED_GEMM
  static const bool measured_faster = __builtin_cpu_is("amd") && cpu_family() >= 26;
  return measured_faster && packed_gemm_supported();
#else
  return false;
#endif
}

void pack_row_panels(const float* rows, int64_t count, int64_t size, float* panels) {
  for (int64_t p0 = 0; p0 < count; p0 += kPanelRows) {
    float* panel = panels + p0 * size;
    const int64_t filled = std::min(kPanelRows, count - p0);
    for (int64_t r = 0; r < filled; ++r) {
      const float* row = rows + (p0 + r) * size;
      for (int64_t k = 0; k < size; ++k) panel[k * kPanelRows + r] = row[k];
    }
    for (int64_t k = 0; filled < kPanelRows && k < size; ++k)
      std::fill_n(panel + k * kPanelRows + filled, kPanelRows - filled, 0.0f);
  }
}

void packed_gemm(const float* panels, int64_t count, const float* prototypes, int64_t columns,
                 int64_t size, float* tile, int64_t ld) {
#if PK_HAVE_PACKED_GEMM
  TORCH_CHECK(packed_gemm_supported(), "packed_gemm: this CPU lacks AVX-512F");
  // Prototypes outermost: a micro-tile's 8 prototypes (8 x size floats) stay in L1 while every
  // panel of the task streams past them.
  for (int64_t c0 = 0; c0 < columns; c0 += kTileColumns) {
    const MicroTile micro = kMicroTiles[std::min(kTileColumns, columns - c0) - 1];
    for (int64_t r0 = 0; r0 < count; r0 += kPanelRows)
      micro(panels + r0 * size, prototypes + c0 * size, size, tile + r0 * ld + c0, ld,
            std::min(kPanelRows, count - r0));
  }
#else
  (void)panels, (void)count, (void)prototypes, (void)columns, (void)size, (void)tile, (void)ld;
  TORCH_CHECK(false, "packed_gemm: not built for this CPU");
#endif
}

void packed_matmul(const float* a, int64_t a_row, int64_t a_depth, const float* b, int64_t b_row,
                   int64_t rows, int64_t depth, int64_t columns, float* out) {
#if PK_HAVE_PACKED_GEMM
  TORCH_CHECK(packed_gemm_supported(), "packed_matmul: this CPU lacks AVX-512F");
  if (rows == 0 || columns == 0) return;
  if (depth == 0) {
    std::fill_n(out, rows * columns, 0.0f);
    return;
  }
  constexpr int64_t kBlockColumns = 16 * kPanelVectors;  // 48
  // Each task packs its B chunks once for all of its rows: with 256-row blocks the packing was 7%
  // of the cil_vectors backward's samples (perf), with 1024 2% (its median 138 -> 123 ms).
  constexpr int64_t kBlockRows = 1024;
  const int64_t chunk_depth = depth_chunk();
  const int64_t column_blocks = (columns + kBlockColumns - 1) / kBlockColumns;
  const int64_t row_blocks = (rows + kBlockRows - 1) / kBlockRows;
  // Each task one (row block, column block) of out, all of the depth: no two tasks write the
  // same element, so the result does not depend on the thread count. Tasks from a shared
  // counter: a descheduled thread takes fewer (with at::parallel_for's static split the cil_vectors
  // products' medians doubled on a busy host).
  parallel_tasks(column_blocks * row_blocks, [&](auto&& take) {
    // B's chunk for this task, chunk_depth x 48, contiguous: read in place, B's rows (3 KiB
    // apart at the cil_vectors shape's 768 columns, so every fourth one maps to the same L1
    // sets) fell into 12 of L1's 64 sets and were evicted before their reuse
    // (benchmarks/NOTES.md: 52-64 -> 43-46 ms for G P there).
    const size_t bytes = chunk_depth * kBlockColumns * sizeof(float);  // a multiple of 64
    const std::unique_ptr<float, decltype(&std::free)> buffer(
        static_cast<float*>(std::aligned_alloc(64, bytes)), &std::free);
    TORCH_CHECK(buffer != nullptr, "packed_matmul: out of memory for ", bytes, " bytes");
    float* packed = buffer.get();
    for (int64_t task; take(task);) {
      const int64_t c0 = (task % column_blocks) * kBlockColumns;
      const int64_t r_begin = (task / column_blocks) * kBlockRows;
      const int64_t r_end = std::min(rows, r_begin + kBlockRows);
      __mmask16 masks[kPanelVectors];
      for (int v = 0; v < kPanelVectors; ++v) {
        const int64_t left = std::clamp<int64_t>(columns - c0 - 16 * v, 0, 16);
        masks[v] = static_cast<__mmask16>((1u << left) - 1u);
      }
      for (int64_t d0 = 0; d0 < depth; d0 += chunk_depth) {
        const int64_t chunk = std::min(chunk_depth, depth - d0);
        pack_column_block(b + d0 * b_row + c0, b_row, chunk, masks, packed);
        for (int64_t r0 = r_begin; r0 < r_end; r0 += kTileRows) {
          const int64_t count = std::min(kTileRows, r_end - r0);
          kRowTiles[count - 1](a + r0 * a_row + d0 * a_depth, a_row, a_depth, packed,
                               kBlockColumns, chunk, out + r0 * columns + c0, columns, masks,
                               d0 > 0);
        }
      }
    }
  });
#else
  (void)a, (void)a_row, (void)a_depth, (void)b, (void)b_row, (void)rows, (void)depth,
      (void)columns, (void)out;
  TORCH_CHECK(false, "packed_matmul: not built for this CPU");
#endif
}

namespace {

std::string choice_name(GemmChoice choice) {
  return choice == GemmChoice::kBlas ? "blas" : choice == GemmChoice::kPacked ? "packed" : "auto";
}

// protokern_cpu::set_gemm("auto" | "blas" | "packed") -> the previous choice; for tests and
// benchmarks (protokern.backends.cpu.gemm).
std::string set_gemm_op(const std::string& name) {
  GemmChoice choice;
  if (name == "auto") {
    choice = GemmChoice::kAuto;
  } else if (name == "blas") {
    choice = GemmChoice::kBlas;
  } else if (name == "packed") {
    choice = GemmChoice::kPacked;
  } else {
    TORCH_CHECK_VALUE(false, "set_gemm: choice must be 'auto', 'blas' or 'packed', got '", name,
                      "'");
  }
  return choice_name(set_gemm_choice(choice));
}

// What the float32 tiles run now: "packed" or "blas".
std::string gemm_in_use_op() { return use_packed_gemm() ? "packed" : "blas"; }

// Whether this CPU can run the packed GEMM at all (AVX-512F), whatever the choice.
bool packed_gemm_supported_op() { return packed_gemm_supported(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(protokern_cpu, m) {
  m.def("set_gemm(str choice) -> str", &set_gemm_op);
  m.def("gemm_in_use() -> str", &gemm_in_use_op);
  m.def("packed_gemm_supported() -> bool", &packed_gemm_supported_op);
}

}  // namespace protokern::cpu
