// The packed float32 GEMM of packed_gemm.h: its AVX-512 micro-kernel and the per-host choice.
#include "cpu/packed_gemm.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
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

using MicroTile = void (*)(const float*, const float*, int64_t, float*, int64_t, int64_t);
// By the micro-tile's column count, 1 .. kTileColumns (the last block's remainder).
constexpr MicroTile kMicroTiles[kTileColumns] = {micro_tile<1>, micro_tile<2>, micro_tile<3>,
                                                 micro_tile<4>, micro_tile<5>, micro_tile<6>,
                                                 micro_tile<7>, micro_tile<8>};
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
  static const bool amd = __builtin_cpu_is("amd");
  return amd && packed_gemm_supported();
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
                 int64_t size, float* tile) {
#if PK_HAVE_PACKED_GEMM
  TORCH_CHECK(packed_gemm_supported(), "packed_gemm: this CPU lacks AVX-512F");
  // Prototypes outermost: a micro-tile's 8 prototypes (8 x size floats) stay in L1 while every
  // panel of the task streams past them.
  for (int64_t c0 = 0; c0 < columns; c0 += kTileColumns) {
    const MicroTile micro = kMicroTiles[std::min(kTileColumns, columns - c0) - 1];
    for (int64_t r0 = 0; r0 < count; r0 += kPanelRows)
      micro(panels + r0 * size, prototypes + c0 * size, size, tile + r0 * columns + c0, columns,
            std::min(kPanelRows, count - r0));
  }
#else
  (void)panels, (void)count, (void)prototypes, (void)columns, (void)size, (void)tile;
  TORCH_CHECK(false, "packed_gemm: not built for this CPU");
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(protokern_cpu, m) {
  m.def("set_gemm(str choice) -> str", &set_gemm_op);
  m.def("gemm_in_use() -> str", &gemm_in_use_op);
}

}  // namespace protokern::cpu
