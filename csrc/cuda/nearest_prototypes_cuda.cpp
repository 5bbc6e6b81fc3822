// PyTorch glue of protokern's CUDA nearest_prototypes kernels (compiled only in CUDA builds).
//
// Registers, in the library `protokern_cuda` of the extension protokern._C:
//   nearest_prototypes(x, prototypes, metric, k, allow_tf32) -> (values, indices), (B, L, k)
//   nearest_prototypes_backward(grad_values, x, prototypes, indices, metric, needs_x,
//                               needs_prototypes, deterministic) -> (grad_x, grad_prototypes)
// for canonical inputs (x (B, D, H, W), prototypes (M, D, 1, 1); protokern/backends/cuda.py
// calls them once protokern.ops has validated the user's shapes and k, and refuses what the
// kernels do not take). As min_distance_cuda.cpp: checks (ValueError, TypeError), rows with
// contiguous channels, launches on PyTorch's current stream, CUDA errors as RuntimeErrors
// naming the kernel and the shapes.
#include <cstdint>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/glue.h"
#include "cuda/nearest_prototypes_kernels.h"
#include "metric.h"

namespace protokern::cuda {
namespace {

void check_k_and_bank(const char* op, int64_t k, int64_t num_protos, const std::string& shapes) {
  TORCH_CHECK_VALUE(num_protos <= kMaxInt32, op, ": at most 2^31 - 1 prototypes are supported, "
                    "got ", shapes);
  TORCH_CHECK_VALUE(1 <= k && k <= num_protos && k <= kNearestMaxK, op, ": k=", k,
                    " must be between 1 and min(M, ", kNearestMaxK, ") for ", shapes);
}

std::tuple<at::Tensor, at::Tensor> nearest_prototypes_op(const at::Tensor& x,
                                                         const at::Tensor& prototypes,
                                                         c10::string_view metric_name,
                                                         int64_t k, bool allow_tf32) {
  constexpr const char* op = "protokern_cuda::nearest_prototypes";
  const std::string shapes = describe(x, prototypes);
  const Metric metric = parse_metric(metric_name, op);
  check_inputs(op, x, prototypes, shapes);
  const int64_t num_protos = prototypes.size(0);
  check_k_and_bank(op, k, num_protos, shapes);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t batch = x.size(0);
  const int64_t length = x.size(2) * x.size(3);
  at::Tensor values = at::empty({batch, length, k}, x.options());
  at::Tensor indices = at::empty({batch, length, k}, x.options().dtype(at::kLong));
  if (batch * length == 0) {
    return {values, indices};
  }
  const Rows x_rows = rows_of_map(x);
  const Rows proto_rows = rows_of_prototypes(prototypes);
  at::Tensor searched = at::empty({batch * length}, x.options().dtype(at::kByte));
  const ScalarKind kind = scalar_kind_of(x);
  const GemmPath path = gemm_path(x, allow_tf32, shapes);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const SquaredNorms norms = squared_norms(kind, x_rows, proto_rows, stream, shapes);
  check_cuda(launch_nearest_prototypes_search(
                 kind, path, metric, x_rows.view, proto_rows.view, norms.rows.data_ptr<float>(),
                 norms.prototypes.data_ptr<float>(), k, values.data_ptr(),
                 indices.data_ptr<int64_t>(), searched.data_ptr<uint8_t>(), stream),
             path == GemmPath::kTensorCore ? "nearest_prototypes_search_kernel (tensor cores)"
                                           : "nearest_prototypes_search_kernel (SIMT)",
             shapes);
  check_cuda(launch_nearest_prototypes_direct_search(kind, metric, x_rows.view, proto_rows.view,
                                                     k, searched.data_ptr<uint8_t>(),
                                                     values.data_ptr(),
                                                     indices.data_ptr<int64_t>(), stream),
             "nearest_prototypes_direct_search_kernel", shapes);
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> nearest_prototypes_backward_op(
    const at::Tensor& grad_values, const at::Tensor& x, const at::Tensor& prototypes,
    const at::Tensor& indices, c10::string_view metric_name, bool needs_x, bool needs_prototypes,
    bool deterministic) {
  constexpr const char* op = "protokern_cuda::nearest_prototypes_backward";
  const std::string shapes = describe(x, prototypes);
  const Metric metric = parse_metric(metric_name, op);
  check_inputs(op, x, prototypes, shapes);
  const int64_t batch = x.size(0);
  const int64_t dim = x.size(1);
  const int64_t height = x.size(2);
  const int64_t width = x.size(3);
  const int64_t length = height * width;
  const int64_t num_protos = prototypes.size(0);
  TORCH_CHECK_VALUE(indices.dim() == 3 && grad_values.sizes() == indices.sizes() &&
                        indices.size(0) == batch && indices.size(1) == length &&
                        indices.size(2) >= 1,
                    op, ": grad_values ", grad_values.sizes(), " and indices ", indices.sizes(),
                    " must both be (B, L, k) with (B, L) = (", batch, ", ", length, ") for ",
                    shapes);
  const int64_t k = indices.size(2);
  check_k_and_bank(op, k, num_protos, shapes);
  check_backward_inputs(op, grad_values, indices, x, shapes);
  const c10::cuda::CUDAGuard device_guard(x.device());

  const Rows x_rows = rows_of_map(x);
  const Rows proto_rows = rows_of_prototypes(prototypes);
  const at::Tensor grad_values_c = grad_values.contiguous();
  // indices come from the forward (every entry in [0, M)), as min_distance's backward assumes
  const at::Tensor indices_c = indices.contiguous();
  const auto float_options = x.options().dtype(at::kFloat);
  static_assert(sizeof(PairCoefficients) == 3 * sizeof(double));
  at::Tensor coeffs = at::empty({batch * length, k, 3}, x.options().dtype(at::kDouble));
  auto* coeffs_data = reinterpret_cast<PairCoefficients*>(coeffs.data_ptr<double>());
  // A gradient nobody asked for is not computed: an empty tensor stands for it.
  at::Tensor grad_rows = at::empty({needs_x ? batch * length : 0, dim}, float_options);
  at::Tensor grad_protos = at::empty({needs_prototypes ? num_protos : 0, dim}, float_options);
  const ScalarKind kind = scalar_kind_of(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  check_cuda(launch_nearest_pair_coefficients(kind, metric, x_rows.view, proto_rows.view, k,
                                              indices_c.data_ptr<int64_t>(),
                                              grad_values_c.data_ptr(), coeffs_data, stream),
             "nearest_pair_coefficients_kernel", shapes);
  if (needs_x) {
    check_cuda(launch_nearest_row_gradient(kind, metric, x_rows.view, proto_rows.view, k,
                                           indices_c.data_ptr<int64_t>(), coeffs_data,
                                           grad_rows.data_ptr<float>(), stream),
               "nearest_row_gradient_kernel", shapes);
  }
  if (needs_prototypes) {
    // deterministic: the pairs bucketed by prototype with a stable sort (its result is unique,
    // so it does not depend on the run), each bucket in increasing pair order
    at::Tensor order, starts, workspace;
    if (deterministic) {
      workspace = at::empty({indices_c.numel()}, indices_c.options());
      auto [sorted, sorted_order] = at::sort(indices_c.view({-1}), /*stable=*/true, 0, false);
      order = sorted_order.contiguous();
      starts = at::searchsorted(sorted, at::arange(num_protos + 1, indices_c.options()))
                   .contiguous();
    }
    check_cuda(launch_nearest_prototype_gradient(
                   kind, metric, deterministic, x_rows.view, proto_rows.view, k,
                   indices_c.data_ptr<int64_t>(), coeffs_data,
                   deterministic ? order.data_ptr<int64_t>() : nullptr,
                   deterministic ? starts.data_ptr<int64_t>() : nullptr,
                   deterministic ? workspace.data_ptr<int64_t>() : nullptr,
                   grad_protos.data_ptr<float>(), stream),
               deterministic ? "bucketed_row_offsets_kernel/nearest_prototype_gradient_kernel"
                             : "nearest_prototype_gradient_atomic_kernel",
               shapes);
  }
  return input_gradients(grad_rows, grad_protos, x, prototypes, needs_x, needs_prototypes);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(protokern_cuda, m) {
  m.def("nearest_prototypes(Tensor x, Tensor prototypes, str metric, int k, bool allow_tf32) "
        "-> (Tensor values, Tensor indices)");
  m.def("nearest_prototypes_backward(Tensor grad_values, Tensor x, Tensor prototypes, "
        "Tensor indices, str metric, bool needs_x, bool needs_prototypes, bool deterministic) "
        "-> (Tensor grad_x, Tensor grad_prototypes)");
}

TORCH_LIBRARY_IMPL(protokern_cuda, CUDA, m) {
  m.impl("nearest_prototypes", &nearest_prototypes_op);
  m.impl("nearest_prototypes_backward", &nearest_prototypes_backward_op);
}

}  // namespace protokern::cuda
