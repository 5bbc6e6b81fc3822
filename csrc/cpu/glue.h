// Tensor-side helpers of the CPU glue files (min_distance_cpu.cpp,
// nearest_prototypes_cpu.cpp): the checks every op makes before a kernel runs, the kernels'
// view of x, and the prototypes flattened in the accumulation type.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include "cpu/cpu_utils.h"
#include "cpu/min_distance_kernels.h"
#include "metric.h"

namespace protokern::cpu {

inline Metric parse_metric(c10::string_view name, const char* op) {
  const std::optional<Metric> metric = metric_named(name);
  TORCH_CHECK_VALUE(metric.has_value(), op, ": unknown metric '", name, "'; expected ",
                    kMetricNames);
  return *metric;
}

inline void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& prototypes) {
  TORCH_CHECK_VALUE(x.dim() == 4 && prototypes.dim() == 4, op,
                    ": expects x (B, D, H, W) and prototypes (M, D, ph, pw), got x ", x.sizes(),
                    " and prototypes ", prototypes.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu() && prototypes.device().is_cpu(), op,
                    ": expects CPU tensors, got x on ", x.device(), " and prototypes on ",
                    prototypes.device());
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK_TYPE((dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                    dtype == at::kBFloat16) &&
                       prototypes.scalar_type() == dtype,
                   op, ": x and prototypes must share a dtype among float32, float64, float16 "
                   "and bfloat16, got ", dtype, " and ", prototypes.scalar_type());
  TORCH_CHECK_VALUE(x.size(1) == prototypes.size(1), op, ": x has ", x.size(1),
                    " channels but prototypes have ", prototypes.size(1), " (x ", x.sizes(),
                    ", prototypes ", prototypes.sizes(), ")");
  TORCH_CHECK_VALUE(prototypes.size(2) <= x.size(2) && prototypes.size(3) <= x.size(3), op,
                    ": the window ", prototypes.size(2), "x", prototypes.size(3),
                    " is larger than the map ", x.size(2), "x", x.size(3));
}

inline FeatureMap describe(const char* op, const at::Tensor& x, const at::Tensor& prototypes) {
  // The kernel stores positions within one image as int32 in its shortlist. A ValueError,
  // like every other limit, raised before anything is allocated.
  const int64_t positions =
      (x.size(2) - prototypes.size(2) + 1) * (x.size(3) - prototypes.size(3) + 1);
  TORCH_CHECK_VALUE(positions < std::numeric_limits<int32_t>::max(),
                    op, ": at most 2^31 - 2 window positions per image are supported, got ",
                    positions, " (x ", x.sizes(), ", prototypes ", prototypes.sizes(), ")");
  return FeatureMap{x.size(0),   x.size(1),   x.size(2),   x.size(3),
                    x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                    prototypes.size(2), prototypes.size(3)};
}

inline at::ScalarType accumulation_type(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

// (M, K) contiguous in the accumulation type: float16/bfloat16 prototypes are upcast once.
inline at::Tensor flat_prototypes(const at::Tensor& prototypes) {
  const int64_t size = prototypes.size(1) * prototypes.size(2) * prototypes.size(3);
  return prototypes.reshape({prototypes.size(0), size})
      .to(accumulation_type(prototypes.scalar_type()))
      .contiguous();
}

// An empty tensor stands for a gradient nobody asked for (protokern.ops maps it to None).
inline at::Tensor gradient_or_empty(const at::Tensor& grad, const at::Tensor& like) {
  return grad.defined() ? grad.reshape(like.sizes()).to(like.scalar_type())
                        : at::empty({0}, like.options());
}

// indices (contiguous) must lie in [0, limit): a bad index would read or write out of bounds in
// a kernel, so it is refused before one runs.
inline void check_indices(const char* op, const at::Tensor& index, int64_t limit) {
  const int64_t count = index.numel();
  if (count == 0) return;
  int64_t low = 0, high = 0;
  if (count >= kMinParallelElements) {  // one parallel pass (the (B, M) indices are G's size)
    const auto [min, max] = at::aminmax(index);
    low = min.item<int64_t>();
    high = max.item<int64_t>();
  } else {  // on this thread: no parallel region for a pass of well under a millisecond
    const int64_t* values = index.data_ptr<int64_t>();
    const auto [min, max] = std::minmax_element(values, values + count);
    low = *min;
    high = *max;
  }
  TORCH_CHECK_VALUE(low >= 0 && high < limit, op, ": indices must lie in [0, ", limit,
                    "), got values in [", low, ", ", high, "]");
}

}  // namespace protokern::cpu
