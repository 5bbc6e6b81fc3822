// What the backward CPU kernels share (min_distance_backward_kernel.cpp,
// nearest_prototypes_backward_kernel.cpp): each selected (window, prototype) pair's gradient
// terms, aligned per-thread buffers, and folding window gradients back onto the map.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>

#include "cpu/cpu_utils.h"
#include "cpu/min_distance_kernels.h"
#include "metric.h"

namespace protokern::cpu {

// A zeroed array of n values starting on a 64-byte boundary in every thread. The vectorised
// loops then split their elements between vector and scalar steps the same way whichever
// thread runs them, so sums round alike and results do not depend on the thread count.
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t n)
      : data_(static_cast<T*>(std::aligned_alloc(64, rounded_bytes(n)))) {
    if (data_ == nullptr) throw std::bad_alloc();
    std::memset(data_.get(), 0, rounded_bytes(n));
  }
  T* data() { return data_.get(); }

 private:
  static size_t rounded_bytes(int64_t n) { return (n * sizeof(T) + 63) / 64 * 64; }
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
};

// Gradient of one selected (window a, prototype p) pair. sqeuclidean: d/da = 2g (a - p) =
// -d/dp (the difference is taken first, as in the reference, so there is no cancellation when a
// is close to p). cosine, as reference.distance_at_grad (the norm floor passes gradient where
// |v| >= floor): d/da = a_term a - scale p, d/dp = p_term p - scale a.
struct CosineGradient {
  double a_term, p_term, scale;
};

PK_INLINE CosineGradient cosine_gradient(double grad, double dot, double a_squared,
                                         double p_squared) {
  const double a_norm = std::sqrt(a_squared), p_norm = std::sqrt(p_squared);
  const double a_bound = std::max(a_norm, kNormFloor), p_bound = std::max(p_norm, kNormFloor);
  const double scale = grad / (a_bound * p_bound);
  const double a_term = a_norm >= kNormFloor ? scale * dot / (a_bound * a_bound) : 0.0;
  const double p_term = p_norm >= kNormFloor ? scale * dot / (p_bound * p_bound) : 0.0;
  return {a_term, p_term, scale};
}

// y += alpha * (a - p)
template <typename acc_t>
PK_INLINE void add_scaled_difference(acc_t* y, acc_t alpha, const acc_t* a, const acc_t* p,
                                     int64_t size) {
  for (int64_t k = 0; k < size; ++k) y[k] += alpha * (a[k] - p[k]);
}

// y += alpha * v, the products in double: cosine's coefficients (~ grad / |v|^2) underflow
// float32 for inputs with norms past ~1e19 while the products stay in range.
template <typename acc_t>
PK_INLINE void add_scaled(acc_t* y, double alpha, const acc_t* v, int64_t size) {
  for (int64_t k = 0; k < size; ++k) y[k] += static_cast<acc_t>(alpha * v[k]);
}

// y += alpha * a + beta * p, the products in double (as add_scaled)
template <typename acc_t>
PK_INLINE void add_combination(acc_t* y, double alpha, const acc_t* a, double beta,
                               const acc_t* p, int64_t size) {
  for (int64_t k = 0; k < size; ++k) y[k] += static_cast<acc_t>(alpha * a[k] + beta * p[k]);
}

// Sums the gradient of image-local rows (L x K) back into the image's (D, H, W) gradient.
template <typename acc_t>
inline void fold_rows(const acc_t* grad_rows, const FeatureMap& map, acc_t* grad_image) {
  const int64_t out_w = map.out_w(), size = map.row_size();
  const int64_t plane = map.height * map.width;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (map.patch_h == 1 && map.patch_w == 1) {  // one window per pixel: the rows transposed
      transpose(grad_rows, plane, map.channels, size, grad_image, plane);
      return;
    }
  }
  std::fill(grad_image, grad_image + map.channels * plane, acc_t(0));
  for (int64_t d = 0; d < map.channels; ++d)
    for (int64_t i = 0; i < map.patch_h; ++i)
      for (int64_t j = 0; j < map.patch_w; ++j) {
        const int64_t k = (d * map.patch_h + i) * map.patch_w + j;
        for (int64_t h = 0; h < map.out_h(); ++h) {
          acc_t* dst = grad_image + d * plane + (h + i) * map.width + j;
          const acc_t* src = grad_rows + h * out_w * size + k;
          for (int64_t w = 0; w < out_w; ++w) dst[w] += src[w * size];
        }
      }
}

}  // namespace protokern::cpu
