// The gradient of one selected (row, prototype) pair's term g * distance(x, p), shared by the
// backward kernels of min_distance and nearest_prototypes: its coefficients (PairCoefficients,
// the formulas of protokern.reference.distance_at_grad) and, per entry, the gradient they give.
//
// Two numeric choices (tests/backends/test_cuda.py):
// - sqeuclidean takes the difference first, 2 g (x - p): exact where x and p are close (a
//   prototype pushed onto its patch, ProtoPNet's state after push), where 2 g x - 2 g p, with
//   its products rounded (or FMA-contracted) apart, cancels.
// - cosine's coefficients are double: with norms past ~1.8e19, |v|^2 overflows float32 and
//   g / |v|^2 underflows it, though the gradients themselves are in range.
#pragma once

#include "cuda/device_utils.cuh"

namespace protokern::cuda {

// d = |x - p|^2: d/dx = 2 g (x - p) = -d/dp.
__device__ __forceinline__ PairCoefficients sqeuclidean_pair_coefficients(double grad) {
  return PairCoefficients{2.0 * grad, -2.0 * grad, 2.0 * grad};
}

// d = 1 - s / (a b), s = x.p, a = max(|x|, eps), b = max(|p|, eps), from the pair's sums
// (warp_pair_sums: of the power-of-two-scaled vectors, so float32 cannot overflow there); the
// rest in double. The norm bound passes gradient where |v| >= eps, as clamp_min does.
__device__ __forceinline__ PairCoefficients cosine_pair_coefficients(const PairSums& sums,
                                                                     double grad) {
  const double row_norm = static_cast<double>(sums.row_scale) * sqrt(double{sums.row_squared});
  const double proto_norm =
      static_cast<double>(sums.proto_scale) * sqrt(double{sums.proto_squared});
  const double dot = double{sums.dot} * sums.row_scale * sums.proto_scale;
  const double row_bound = row_norm < kNormFloor ? kNormFloor : row_norm;  // NaN stays
  const double proto_bound = proto_norm < kNormFloor ? kNormFloor : proto_norm;
  const double scale = grad / (row_bound * proto_bound);
  return PairCoefficients{
      row_norm >= kNormFloor ? scale * dot / (row_bound * row_bound) : 0.0, -scale,
      proto_norm >= kNormFloor ? scale * dot / (proto_bound * proto_bound) : 0.0};
}

// The gradient of a pair's term w.r.t. one entry u of a row or a prototype (v: the same entry
// of the other), given u's own coefficient `self` and the cross coefficient: sqeuclidean
// self (u - v) (self == -cross), cosine self u + cross v in double, rounded once to float32.
__device__ __forceinline__ float pair_gradient(Metric metric, double self, double cross, float u,
                                               float v) {
  if (metric == Metric::kSqEuclidean) {
    return static_cast<float>(self) * (u - v);
  }
  return static_cast<float>(fma(self, double{u}, cross * double{v}));
}

}  // namespace protokern::cuda
