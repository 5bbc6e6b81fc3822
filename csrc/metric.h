// The metric and the cosine norm floor, shared by the CPU kernels (csrc/cpu) and the CUDA kernels
// (csrc/cuda). Plain C++ with no PyTorch header, so the .cu files can include it and still compile
// with bare nvcc. Each glue file turns the op's metric string into a Metric with metric_named and
// raises the ValueError itself (raising needs torch's headers).
#pragma once

#include <optional>
#include <string_view>

namespace protokern {

// kDot: -<a, p> (TesNet's projection; protokern.ops maps "euclidean" onto kSqEuclidean). The CPU
// kernels run all three; the CUDA glue refuses kDot (its kernels have no dot bound).
enum class Metric : int { kSqEuclidean = 0, kCosine = 1, kDot = 2 };

// For error messages: the names metric_named accepts.
inline constexpr const char* kMetricNames = "'sqeuclidean', 'cosine' or 'dot'";

inline std::optional<Metric> metric_named(std::string_view name) {
  if (name == "sqeuclidean") return Metric::kSqEuclidean;
  if (name == "cosine") return Metric::kCosine;
  if (name == "dot") return Metric::kDot;
  return std::nullopt;
}

// cosine: 1 - <a, p> / (max(|a|, kNormFloor) * max(|p|, kNormFloor)), as EPS in
// protokern/backends/reference.py. The CPU kernels work in double; the CUDA kernels compute in
// float32 and use the float nearest to it.
inline constexpr double kNormFloor = 1e-8;
inline constexpr float kNormFloorFloat = static_cast<float>(kNormFloor);
static_assert(kNormFloorFloat == 1e-8f);

}  // namespace protokern
