// PyTorch glue of protokern's CPU min_distance kernels.
//
// Registers, in the library `protokern_cpu` of the extension protokern._C:
//   min_distance(x, prototypes, metric, input_rounding) -> (values, indices)
//   topk_distance(x, prototypes, metric, k, input_rounding) -> (values, indices), (B, M, k)
//   min_distance_backward(grad_values, x, prototypes, indices, metric, needs_x, needs_prototypes)
//     -> (grad_x, grad_prototypes)
// for canonical inputs (x (B, D, H, W), prototypes (M, D, ph, pw); protokern/backends/cpu.py
// calls them once protokern.ops has validated the user's shapes). This file reads and checks the
// tensors (bad input raises ValueError or TypeError), allocates the outputs and picks the
// instantiation; the kernels (min_distance_*_kernel.cpp) see raw pointers only (see
// min_distance_kernels.h for where they call ATen themselves, and why).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "cpu/glue.h"
#include "cpu/huge_pages.h"
#include "cpu/min_distance_kernels.h"
#include "metric.h"

namespace protokern::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> min_distance_op(const at::Tensor& x,
                                                   const at::Tensor& prototypes,
                                                   c10::string_view metric_name,
                                                   double input_rounding) {
  constexpr const char* op = "protokern_cpu::min_distance";
  const Metric metric = parse_metric(metric_name, op);
  check_inputs(op, x, prototypes);
  const FeatureMap map = describe(op, x, prototypes);
  const at::Tensor protos = flat_prototypes(prototypes);
  const int64_t num = prototypes.size(0);
  at::Tensor values = empty_huge({map.batch, num}, x.options().dtype(protos.scalar_type()));
  // One position per image: every index is 0, and the kernel writes only the values.
  const bool single_position = map.positions() == 1;
  at::Tensor indices = single_position
                           ? zeros_untouched({map.batch, num}, x.options().dtype(at::kLong))
                           : empty_huge({map.batch, num}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (single_position)
      single_position_forward<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), map,
                                               protos.const_data_ptr<acc_t>(), num, metric,
                                               input_rounding, values.mutable_data_ptr<acc_t>());
    else
      min_distance_forward<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), map,
                                            protos.const_data_ptr<acc_t>(), num, metric,
                                            input_rounding, values.mutable_data_ptr<acc_t>(),
                                            indices.mutable_data_ptr<int64_t>());
  });
  return {values.to(x.scalar_type()), indices};
}

std::tuple<at::Tensor, at::Tensor> topk_distance_op(const at::Tensor& x,
                                                    const at::Tensor& prototypes,
                                                    c10::string_view metric_name, int64_t k,
                                                    double input_rounding) {
  constexpr const char* op = "protokern_cpu::topk_distance";
  const Metric metric = parse_metric(metric_name, op);
  check_inputs(op, x, prototypes);
  const FeatureMap map = describe(op, x, prototypes);
  TORCH_CHECK_VALUE(1 <= k && k <= map.positions(), op, ": k=", k,
                    " must be between 1 and the number of positions ", map.positions());
  const at::Tensor protos = flat_prototypes(prototypes);
  const int64_t num = prototypes.size(0);
  at::Tensor values = empty_huge({map.batch, num, k}, x.options().dtype(protos.scalar_type()));
  at::Tensor indices = empty_huge({map.batch, num, k}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    topk_distance_forward<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), map,
                                           protos.const_data_ptr<acc_t>(), num, metric,
                                           input_rounding, k, values.mutable_data_ptr<acc_t>(),
                                           indices.mutable_data_ptr<int64_t>());
  });
  return {values.to(x.scalar_type()), indices};
}

std::tuple<at::Tensor, at::Tensor> min_distance_backward_op(
    const at::Tensor& grad_values, const at::Tensor& x, const at::Tensor& prototypes,
    const at::Tensor& indices, c10::string_view metric_name, bool needs_x,
    bool needs_prototypes) {
  constexpr const char* op = "protokern_cpu::min_distance_backward";
  const Metric metric = parse_metric(metric_name, op);
  check_inputs(op, x, prototypes);
  const FeatureMap map = describe(op, x, prototypes);
  const int64_t num = prototypes.size(0);
  TORCH_CHECK_VALUE(grad_values.sizes() == indices.sizes() && indices.dim() == 2 &&
                        indices.size(0) == map.batch && indices.size(1) == num,
                    op, ": grad_values ", grad_values.sizes(), " and indices ", indices.sizes(),
                    " must both be (B, M) = (", map.batch, ", ", num, ")");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ",
                   indices.scalar_type());
  const at::Tensor index = indices.contiguous();
  check_indices(op, index, map.positions());
  const at::Tensor protos = flat_prototypes(prototypes);
  const at::ScalarType acc = protos.scalar_type();
  const at::Tensor grad = grad_values.to(acc).contiguous();
  if (!needs_x && !needs_prototypes) {
    return {gradient_or_empty({}, x), gradient_or_empty({}, prototypes)};
  }
  at::Tensor grad_x, grad_protos;
  if (needs_x)
    grad_x = empty_huge({map.batch, map.channels, map.height, map.width}, x.options().dtype(acc));
  if (needs_prototypes) grad_protos = empty_huge(protos.sizes(), protos.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    min_distance_backward<scalar_t, acc_t>(
        grad.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), map,
        protos.const_data_ptr<acc_t>(), num, index.const_data_ptr<int64_t>(), metric,
        needs_x ? grad_x.mutable_data_ptr<acc_t>() : nullptr,
        needs_prototypes ? grad_protos.mutable_data_ptr<acc_t>() : nullptr);
  });
  return {gradient_or_empty(grad_x, x), gradient_or_empty(grad_protos, prototypes)};
}

}  // namespace

// Each op's glue registers its fragment of the library.
TORCH_LIBRARY_FRAGMENT(protokern_cpu, m) {
  m.def("min_distance(Tensor x, Tensor prototypes, str metric, float input_rounding) "
        "-> (Tensor values, Tensor indices)");
  m.def("topk_distance(Tensor x, Tensor prototypes, str metric, int k, float input_rounding) "
        "-> (Tensor values, Tensor indices)");
  m.def("min_distance_backward(Tensor grad_values, Tensor x, Tensor prototypes, "
        "Tensor indices, str metric, bool needs_x, bool needs_prototypes) "
        "-> (Tensor grad_x, Tensor grad_prototypes)");
}

TORCH_LIBRARY_IMPL(protokern_cpu, CPU, m) {
  m.impl("min_distance", &min_distance_op);
  m.impl("topk_distance", &topk_distance_op);
  m.impl("min_distance_backward", &min_distance_backward_op);
}

}  // namespace protokern::cpu
