// PyTorch glue of protokern's CPU nearest_prototypes kernels.
//
// Registers, in the library `protokern_cpu` of the extension protokern._C:
//   nearest_prototypes(x, prototypes, metric, k, input_rounding) -> (values, indices)
//       both (B, L, k)
//   nearest_prototypes_backward(grad_values, x, prototypes, indices, metric, needs_x,
//                               needs_prototypes) -> (grad_x, grad_prototypes)
// for canonical inputs (protokern/backends/cpu.py calls them once protokern.ops has validated
// the user's shapes). This file checks the tensors (bad input raises ValueError or TypeError),
// allocates the outputs and picks the instantiation; the kernels see raw pointers only.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "cpu/glue.h"
#include "cpu/huge_pages.h"
#include "cpu/nearest_prototypes_kernels.h"
#include "metric.h"

namespace protokern::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> nearest_prototypes_op(const at::Tensor& x,
                                                         const at::Tensor& prototypes,
                                                         c10::string_view metric_name,
                                                         int64_t k, double input_rounding) {
  constexpr const char* op = "protokern_cpu::nearest_prototypes";
  const Metric metric = parse_metric(metric_name, op);
  check_inputs(op, x, prototypes);
  const FeatureMap map = describe(op, x, prototypes);
  const int64_t num = prototypes.size(0);
  TORCH_CHECK_VALUE(1 <= k && k <= num, op, ": k=", k, " must be between 1 and the number of "
                    "prototypes M=", num);
  const at::Tensor protos = flat_prototypes(prototypes);
  at::Tensor values =
      empty_huge({map.batch, map.positions(), k}, x.options().dtype(protos.scalar_type()));
  at::Tensor indices = empty_huge({map.batch, map.positions(), k}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    nearest_prototypes_forward<scalar_t, acc_t>(
        x.const_data_ptr<scalar_t>(), map, protos.const_data_ptr<acc_t>(), num, k, metric,
        input_rounding, values.mutable_data_ptr<acc_t>(), indices.mutable_data_ptr<int64_t>());
  });
  return {values.to(x.scalar_type()), indices};
}

std::tuple<at::Tensor, at::Tensor> nearest_prototypes_backward_op(
    const at::Tensor& grad_values, const at::Tensor& x, const at::Tensor& prototypes,
    const at::Tensor& indices, c10::string_view metric_name, bool needs_x,
    bool needs_prototypes) {
  constexpr const char* op = "protokern_cpu::nearest_prototypes_backward";
  const Metric metric = parse_metric(metric_name, op);
  check_inputs(op, x, prototypes);
  const FeatureMap map = describe(op, x, prototypes);
  const int64_t num = prototypes.size(0);
  TORCH_CHECK_VALUE(indices.dim() == 3 && grad_values.sizes() == indices.sizes() &&
                        indices.size(0) == map.batch && indices.size(1) == map.positions() &&
                        indices.size(2) >= 1,
                    op, ": grad_values ", grad_values.sizes(), " and indices ", indices.sizes(),
                    " must both be (B, L, k) with (B, L) = (", map.batch, ", ",
                    map.positions(), ")");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ",
                   indices.scalar_type());
  const at::Tensor index = indices.contiguous();
  check_indices(op, index, num);
  const at::Tensor protos = flat_prototypes(prototypes);
  const at::ScalarType acc = protos.scalar_type();
  const at::Tensor grad = grad_values.to(acc).contiguous();
  at::Tensor grad_x, grad_protos;
  if (needs_x)
    grad_x = empty_huge({map.batch, map.channels, map.height, map.width}, x.options().dtype(acc));
  if (needs_prototypes) grad_protos = empty_huge(protos.sizes(), protos.options());
  if (needs_x || needs_prototypes) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      nearest_prototypes_backward<scalar_t, acc_t>(
          grad.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), map,
          protos.const_data_ptr<acc_t>(), num, indices.size(2), index.const_data_ptr<int64_t>(),
          metric, needs_x ? grad_x.mutable_data_ptr<acc_t>() : nullptr,
          needs_prototypes ? grad_protos.mutable_data_ptr<acc_t>() : nullptr);
    });
  }
  return {gradient_or_empty(grad_x, x), gradient_or_empty(grad_protos, prototypes)};
}

}  // namespace

// Each op's glue registers its fragment of the library.
TORCH_LIBRARY_FRAGMENT(protokern_cpu, m) {
  m.def("nearest_prototypes(Tensor x, Tensor prototypes, str metric, int k, "
        "float input_rounding) -> (Tensor values, Tensor indices)");
  m.def("nearest_prototypes_backward(Tensor grad_values, Tensor x, Tensor prototypes, "
        "Tensor indices, str metric, bool needs_x, bool needs_prototypes) "
        "-> (Tensor grad_x, Tensor grad_prototypes)");
}

TORCH_LIBRARY_IMPL(protokern_cpu, CPU, m) {
  m.impl("nearest_prototypes", &nearest_prototypes_op);
  m.impl("nearest_prototypes_backward", &nearest_prototypes_backward_op);
}

}  // namespace protokern::cpu
