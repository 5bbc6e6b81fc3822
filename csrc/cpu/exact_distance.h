// Exact distances of one (window, prototype) pair, shared by the forward kernel (the value at a
// shortlisted position) and the backward kernel (cosine's a.p and |a|^2 at the selected one).
// A fixed summation order: identical windows give identical values. The sums are reductions the
// compiler may vectorise (omp simd): still one fixed order, but in vector registers, not a serial
// chain. PK_INLINE, so each vector clone of a caller gets them in its own instruction set.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/cpu_utils.h"
#include "cpu/min_distance_kernels.h"
#include "metric.h"

namespace protokern::cpu {

template <typename acc_t>
PK_INLINE double exact_squared_distance(const acc_t* a, const acc_t* p, int64_t size) {
  double total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t k = 0; k < size; ++k) {
    const double d = static_cast<double>(a[k]) - static_cast<double>(p[k]);
    total += d * d;
  }
  return total;
}

// The sum of a vector's lanes by a fixed tree (pairs of halves): one order, in registers.
template <typename Vec>
PK_INLINE auto lane_sum(const Vec& v) {
  using T = std::remove_cv_t<std::remove_reference_t<decltype(v[0])>>;
  constexpr int64_t kLanes = sizeof(Vec) / sizeof(T);
  T lanes[kLanes];
  std::memcpy(lanes, &v, sizeof lanes);
  for (int64_t width = kLanes / 2; width >= 1; width /= 2)
    for (int64_t i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  return lanes[0];
}

// Returns a.p and stores |a|^2 in *a_squared. Vector accumulators in a fixed order that does not
// depend on where a and p lie (an omp simd loop may peel to align one of them, which moves the
// lanes): so exact_dot(p, p) gives bit for bit the |a|^2 and a.p of a copy a of p, which
// cosine_from turns into exactly 0.
// Two accumulators of each sum (even and odd vectors), added at the end: one chain of vector adds
// held the recompute to the add's latency (perf, cosine top-4 forward at B 16, M 2000, D 128 on
// AVX-512: the accumulating vaddpd was the reduction's hottest instruction).
template <typename acc_t>
PK_INLINE double exact_dot(const acc_t* a, const acc_t* p, int64_t size, double* a_squared) {
  using Vec = typename VectorOf<double>::Values;
  constexpr int64_t kLanes = sizeof(Vec) / sizeof(double);
  Vec dots[2] = {Vec{}, Vec{}}, squares[2] = {Vec{}, Vec{}};
  // (by reference: a lambda returning a 256-bit vector draws GCC's ABI warning in the baseline
  // clone, though it is always inlined)
  auto load = [](const acc_t* v, Vec& out) PK_LAMBDA_INLINE {
    for (int64_t j = 0; j < kLanes; ++j) out[j] = static_cast<double>(v[j]);
  };
  Vec av = Vec{}, pv = Vec{};
  int64_t k = 0;
  for (; k + 2 * kLanes <= size; k += 2 * kLanes)
    for (int half = 0; half < 2; ++half) {
      load(a + k + half * kLanes, av);
      load(p + k + half * kLanes, pv);
      dots[half] += av * pv;
      squares[half] += av * av;
    }
  if (k + kLanes <= size) {
    load(a + k, av);
    load(p + k, pv);
    dots[0] += av * pv;
    squares[0] += av * av;
    k += kLanes;
  }
  double dot = lane_sum(dots[0] + dots[1]), squared = lane_sum(squares[0] + squares[1]);
  for (; k < size; ++k) {
    const double av = static_cast<double>(a[k]);
    dot += av * static_cast<double>(p[k]);
    squared += av * av;
  }
  *a_squared = squared;
  return dot;
}

// max(|a|, floor) max(|p|, floor) as sqrt(|a|^2 |p|^2) (floored squares): at a copy (a == p, so
// a.p, |a|^2 and |p|^2 are one sum) it is exactly a.p, since sqrt(fl(v * v)) == v, and the distance
// is 0 (|a| |p| is off by an ulp for about a quarter of random vectors); the product of the norms
// where the product overflows. As reference.cosine_denominator.
PK_INLINE double cosine_from(double dot, double a_squared, double p_squared) {
  const double floor_squared = kNormFloor * kNormFloor;
  // std::max keeps a NaN first argument, so NaN propagates.
  const double a2 = std::max(a_squared, floor_squared), p2 = std::max(p_squared, floor_squared);
  const double product = a2 * p2;
  const double denominator =
      std::isfinite(product) ? std::sqrt(product) : std::sqrt(a2) * std::sqrt(p2);
  return std::min(std::max(1.0 - dot / denominator, 0.0), 2.0);
}

// sum((a - p)^2) in the working precision: for rows and prototypes whose squared norms are below
// the forward kernel's huge_norm it cannot overflow, and its rounding (~K eps relative, no
// cancellation: the differences are taken first) is far below the tolerances; identical windows
// still give identical values. Several times the speed of the double version.
// Two vector accumulators, then a tree over their lanes: one fixed order, as an omp simd
// reduction, but that one summed the lanes one after another from the stack (perf at cub on
// AVX-512: a 16-deep chain of scalar adds per distance, longer than the sum itself at K = 128).
template <typename acc_t>
PK_INLINE acc_t squared_distance(const acc_t* a, const acc_t* p, int64_t size) {
  using Vec = typename VectorOf<acc_t>::Values;
  constexpr int64_t kLanes = sizeof(Vec) / sizeof(acc_t);
  Vec even = Vec{}, odd = Vec{};
  int64_t k = 0;
  for (; k + 2 * kLanes <= size; k += 2 * kLanes) {
    Vec a0, p0, a1, p1;
    std::memcpy(&a0, a + k, sizeof a0);
    std::memcpy(&p0, p + k, sizeof p0);
    std::memcpy(&a1, a + k + kLanes, sizeof a1);
    std::memcpy(&p1, p + k + kLanes, sizeof p1);
    const Vec d0 = a0 - p0, d1 = a1 - p1;
    even += d0 * d0;
    odd += d1 * d1;
  }
  if (k + kLanes <= size) {
    Vec a0, p0;
    std::memcpy(&a0, a + k, sizeof a0);
    std::memcpy(&p0, p + k, sizeof p0);
    const Vec d0 = a0 - p0;
    even += d0 * d0;
    k += kLanes;
  }
  acc_t total = lane_sum(even + odd);
  for (; k < size; ++k) {
    const acc_t d = a[k] - p[k];
    total += d * d;
  }
  return total;
}

// The distance the forward kernel returns: |a - p|^2, cosine's or dot's -a.p, the dot products
// in double. `trusted`: both squared norms are below huge_norm.
template <typename acc_t>
PK_INLINE double exact_distance(const acc_t* a, const acc_t* p, int64_t size, Metric metric,
                                double p_squared, bool trusted) {
  if (metric == Metric::kSqEuclidean)
    return trusted ? static_cast<double>(squared_distance(a, p, size))
                   : exact_squared_distance(a, p, size);
  double a_squared;
  const double dot = exact_dot(a, p, size, &a_squared);
  if (metric == Metric::kDot) return -dot;
  return cosine_from(dot, a_squared, p_squared);
}

// exact_dot and exact_distance compiled per ISA and called out of line (exact_distance.cpp), for
// callers that are not vector clones: the same bits, in the host's vector width.
template <typename acc_t>
double dispatched_exact_dot(const acc_t* a, const acc_t* p, int64_t size, double* a_squared);
template <typename acc_t>
double dispatched_exact_distance(const acc_t* a, const acc_t* p, int64_t size, Metric metric,
                                 double p_squared, bool trusted);

}  // namespace protokern::cpu
