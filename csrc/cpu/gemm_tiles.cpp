// The one out-of-line helper of gemm_tiles.h: squared norms, compiled per ISA.
#include "cpu/gemm_tiles.h"

#include "cpu/cpu_utils.h"

namespace protokern::cpu {

template <typename acc_t>
PK_VECTOR_CLONES void squared_norms(const acc_t* rows, int64_t count, int64_t size, acc_t* out) {
  for (int64_t r = 0; r < count; ++r) {
    const acc_t* row = rows + r * size;
    acc_t partial[16] = {};
    int64_t k = 0;
    for (; k + 16 <= size; k += 16)
      for (int j = 0; j < 16; ++j) partial[j] += row[k + j] * row[k + j];
    acc_t total = 0;
    for (; k < size; ++k) total += row[k] * row[k];
    for (int j = 0; j < 16; ++j) total += partial[j];
    out[r] = total;
  }
}

template void squared_norms<float>(const float*, int64_t, int64_t, float*);
template void squared_norms<double>(const double*, int64_t, int64_t, double*);

}  // namespace protokern::cpu
