// PyTorch glue of protokern's CUDA min_distance kernels (compiled only in CUDA builds).
//
// Registers, in the library `protokern_cuda` of the extension protokern._C:
//   min_distance(x, prototypes, metric, allow_tf32) -> (values, indices)
//   min_distance_backward(grad_values, x, prototypes, indices, metric, needs_x, needs_prototypes,
//                         deterministic) -> (grad_x, grad_prototypes)
// for canonical inputs (x (B, D, H, W), prototypes (M, D, 1, 1); protokern/backends/cuda.py
// calls them once protokern.ops has validated the user's shapes, and refuses other windows).
// This file reads and checks the tensors (bad input raises ValueError or TypeError; the helpers
// are glue.h's), lays x out as rows with contiguous channels, picks the kernels and launches
// them on PyTorch's current stream; the kernels (*_kernel.cu) see raw pointers only. Every CUDA
// error raises a Python RuntimeError naming the kernel and the shapes.
#include <cstdint>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream is this c10 function
#include <torch/library.h>

#include "cuda/glue.h"
#include "cuda/min_distance_kernels.h"
#include "metric.h"

namespace protokern::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> min_distance_op(const at::Tensor& x,
                                                   const at::Tensor& prototypes,
                                                   c10::string_view metric_name,
                                                   bool allow_tf32) {
  constexpr const char* op = "protokern_cuda::min_distance";
  const std::string shapes = describe(x, prototypes);
  const Metric metric = parse_metric(metric_name, op);
  check_inputs(op, x, prototypes, shapes);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t batch = x.size(0);
  const int64_t num_protos = prototypes.size(0);
  at::Tensor values = at::empty({batch, num_protos}, x.options());
  at::Tensor indices = at::empty({batch, num_protos}, x.options().dtype(at::kLong));
  if (batch == 0 || num_protos == 0) {
    return {values, indices};
  }
  const Rows x_rows = rows_of_map(x);
  const Rows proto_rows = rows_of_prototypes(prototypes);
  at::Tensor best = at::empty({batch, num_protos}, x.options().dtype(at::kLong));  // packed uint64
  auto* best_data = reinterpret_cast<unsigned long long*>(best.data_ptr<int64_t>());

  const ScalarKind kind = scalar_kind_of(x);
  // float32 on tensor cores (TF32 allowed): the split TF32 products, so that the search's values
  // can stand and the recompute reads only the pairs whose expansion cancelled. TF32 alone
  // rounds the operands and every pair was recomputed, reading 2 K entries again (63 GB at
  // cil_vectors; at L > 1 a model of the H200 says the split's two extra MMAs cost less than that
  // pass below L ~ 160: benchmarks/NOTES.md, "CUDA's TF32 search split in three").
  GemmPath path = gemm_path(x, allow_tf32, shapes);
  if (path == GemmPath::kTensorCore && kind == ScalarKind::kFloat32)
    path = GemmPath::kTensorCoreSplit;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const SquaredNorms norms = squared_norms(kind, x_rows, proto_rows, stream, shapes);
  check_cuda(launch_min_distance_search(kind, path, metric, x_rows.view, proto_rows.view,
                                        norms.rows.data_ptr<float>(),
                                        norms.prototypes.data_ptr<float>(), best_data, stream),
             path == GemmPath::kSimt ? "min_distance_search_kernel (SIMT)"
                                     : "min_distance_search_kernel (tensor cores)",
             shapes);
  // exact products (16-bit operands, float32 FMAs) or the split TF32 ones: the search's value
  // stands where the expansion did not cancel (plain TF32 no longer reaches here)
  const bool from_search = path != GemmPath::kTensorCore || kind != ScalarKind::kFloat32;
  check_cuda(launch_min_distance_recompute(kind, metric, x_rows.view, proto_rows.view, best_data,
                                           from_search, norms.rows.data_ptr<float>(),
                                           norms.prototypes.data_ptr<float>(), values.data_ptr(),
                                           indices.data_ptr<int64_t>(), stream),
             "min_distance_recompute_kernel", shapes);
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> min_distance_backward_op(
    const at::Tensor& grad_values, const at::Tensor& x, const at::Tensor& prototypes,
    const at::Tensor& indices, c10::string_view metric_name, bool needs_x, bool needs_prototypes,
    bool deterministic) {
  constexpr const char* op = "protokern_cuda::min_distance_backward";
  const std::string shapes = describe(x, prototypes);
  const Metric metric = parse_metric(metric_name, op);
  check_inputs(op, x, prototypes, shapes);
  const int64_t batch = x.size(0);
  const int64_t dim = x.size(1);
  const int64_t height = x.size(2);
  const int64_t width = x.size(3);
  const int64_t num_protos = prototypes.size(0);
  TORCH_CHECK_VALUE(grad_values.sizes() == indices.sizes() && grad_values.dim() == 2 &&
                        grad_values.size(0) == batch && grad_values.size(1) == num_protos,
                    op, ": grad_values ", grad_values.sizes(), " and indices ",
                    indices.sizes(), " must be (B, M) = (", batch, ", ", num_protos, ") for ",
                    shapes);
  check_backward_inputs(op, grad_values, indices, x, shapes);
  TORCH_CHECK_VALUE(!deterministic || (num_protos <= kMaxInt32 && height * width <= kMaxInt32),
                    op, ": the deterministic scatter supports at most 2^31 - 1 prototypes "
                    "and positions, got ", shapes);
  const c10::cuda::CUDAGuard device_guard(x.device());

  const Rows x_rows = rows_of_map(x);
  const Rows proto_rows = rows_of_prototypes(prototypes);
  const at::Tensor grad_values_c = grad_values.contiguous();
  const at::Tensor indices_c = indices.contiguous();
  const auto float_options = x.options().dtype(at::kFloat);
  // PairCoefficients (three doubles) per (b, m)
  static_assert(sizeof(PairCoefficients) == 3 * sizeof(double));
  at::Tensor coeffs = at::empty({batch, num_protos, 3}, x.options().dtype(at::kDouble));
  auto* coeffs_data = reinterpret_cast<PairCoefficients*>(coeffs.data_ptr<double>());
  // A gradient nobody asked for is not computed: an empty tensor stands for it.
  at::Tensor grad_protos = at::empty({needs_prototypes ? num_protos : 0, dim}, float_options);
  at::Tensor grad_rows = at::empty({needs_x ? batch : 0, height * width, dim}, float_options);
  at::Tensor workspace;
  if (deterministic && needs_x) {
    workspace = at::empty({row_gradient_workspace_elements(batch, height * width, num_protos)},
                          x.options().dtype(at::kInt));
  }
  const ScalarKind kind = scalar_kind_of(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  check_cuda(launch_selected_pair_coefficients(kind, metric, x_rows.view, proto_rows.view,
                                               indices_c.data_ptr<int64_t>(),
                                               grad_values_c.data_ptr(), coeffs_data, stream),
             "selected_pair_coefficients_kernel", shapes);
  if (needs_prototypes) {
    check_cuda(launch_prototype_gradient(kind, metric, x_rows.view, proto_rows.view,
                                         indices_c.data_ptr<int64_t>(), coeffs_data,
                                         grad_protos.data_ptr<float>(), stream),
               "prototype_gradient_kernel", shapes);
  }
  if (needs_x) {
    check_cuda(launch_row_gradient(kind, metric, deterministic, x_rows.view, proto_rows.view,
                                   indices_c.data_ptr<int64_t>(), coeffs_data,
                                   deterministic ? workspace.data_ptr<int32_t>() : nullptr,
                                   grad_rows.data_ptr<float>(), stream),
               deterministic ? "sort_prototypes_by_position_kernel/gather_row_gradient_kernel"
                             : "scatter_row_gradient_atomic_kernel",
               shapes);
  }
  return input_gradients(grad_rows, grad_protos, x, prototypes, needs_x, needs_prototypes);
}

}  // namespace

TORCH_LIBRARY(protokern_cuda, m) {
  m.def("min_distance(Tensor x, Tensor prototypes, str metric, bool allow_tf32) "
        "-> (Tensor values, Tensor indices)");
  m.def("min_distance_backward(Tensor grad_values, Tensor x, Tensor prototypes, Tensor indices, "
        "str metric, bool needs_x, bool needs_prototypes, bool deterministic) "
        "-> (Tensor grad_x, Tensor grad_prototypes)");
}

TORCH_LIBRARY_IMPL(protokern_cuda, CUDA, m) {
  m.impl("min_distance", &min_distance_op);
  m.impl("min_distance_backward", &min_distance_backward_op);
}

}  // namespace protokern::cuda
