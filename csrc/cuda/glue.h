// Tensor-side helpers of the CUDA glue files (min_distance_cuda.cpp and
// nearest_prototypes_cuda.cpp, compiled only in CUDA builds): the checks every op makes before
// a kernel runs, x and the prototypes as the kernels' rows, the GEMM path, and CUDA errors as
// Python exceptions naming the kernel and the shapes.
#pragma once

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "cuda/min_distance_kernels.h"
#include "metric.h"

namespace protokern::cuda {

inline constexpr int64_t kMaxInt32 = 0x7fffffffLL;
inline constexpr int64_t kMaxPositions = 0xffffffffLL;  // positions are packed into 32 bits

inline std::string describe(const at::Tensor& x, const at::Tensor& prototypes) {
  std::ostringstream out;
  out << "x " << x.sizes() << " " << x.scalar_type() << " and prototypes " << prototypes.sizes()
      << " " << prototypes.scalar_type();
  return out.str();
}

inline void check_cuda(cudaError_t error, const char* kernel, const std::string& shapes) {
  TORCH_CHECK(error == cudaSuccess, "protokern_cuda: ", kernel, " failed for ", shapes, ": ",
              cudaGetErrorName(error), " (", cudaGetErrorString(error), ")");
}

inline Metric parse_metric(c10::string_view name, const char* op) {
  const std::optional<Metric> metric = metric_named(name);
  TORCH_CHECK_VALUE(metric.has_value(), op, ": unknown metric '", name, "'; expected ",
                    kMetricNames);
  // The backend's rule refuses it first (protokern/backends/cuda.py); a direct call must not
  // reach kernels that would take it for cosine.
  TORCH_CHECK_VALUE(*metric != Metric::kDot, op, ": the CUDA kernels have no rounding bound "
                    "for the 'dot' metric; expected 'sqeuclidean' or 'cosine'");
  return *metric;
}

inline ScalarKind scalar_kind_of(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? ScalarKind::kFloat32
         : t.scalar_type() == at::kHalf ? ScalarKind::kFloat16
                                        : ScalarKind::kBFloat16;
}

// The checks every op makes before any kernel runs.
inline void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& prototypes,
                  const std::string& shapes) {
  TORCH_CHECK_VALUE(x.is_cuda() && prototypes.is_cuda() && x.device() == prototypes.device(),
                    op, ": x and prototypes must be on one CUDA device, got x on ",
                    x.device(), " and prototypes on ", prototypes.device(), " (", shapes, ")");
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE((dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) &&
                       prototypes.scalar_type() == dtype,
                   op, ": x and prototypes must share a dtype among float32, float16 and "
                   "bfloat16, got ", shapes);
  TORCH_CHECK_VALUE(x.dim() == 4 && prototypes.dim() == 4 && prototypes.size(1) == x.size(1),
                    op, ": expected x (B, D, H, W) and prototypes (M, D, 1, 1), got ", shapes);
  TORCH_CHECK_VALUE(prototypes.size(2) == 1 && prototypes.size(3) == 1, op,
                    ": only 1x1 prototypes run natively (protokern/backends/cuda.py does not "
                    "take ph x pw windows), got ", shapes);
  TORCH_CHECK_VALUE(x.size(2) * x.size(3) <= kMaxPositions, op,
                    ": at most 2^32 - 1 positions per image are supported, got ", shapes);
}

// A tensor of rows with contiguous channels and its view for the kernels; the tensor keeps the
// memory alive (a copy is made only when channels are strided, e.g. a contiguous NCHW map).
struct Rows {
  at::Tensor tensor;
  RowsView view;
};

inline Rows rows_with_contiguous_channels(at::Tensor rows) {  // (images, rows, dim)
  if (rows.size(2) > 1 && rows.stride(2) != 1) {
    rows = rows.contiguous();
  }
  const RowsView view{rows.data_ptr(), rows.size(0), rows.size(1), rows.stride(0),
                      rows.stride(1), rows.size(2)};
  return {rows, view};
}

// x (B, D, H, W) as B images of L = H*W rows (row-major positions) of D channels.
inline Rows rows_of_map(const at::Tensor& x) {
  return rows_with_contiguous_channels(
      x.permute({0, 2, 3, 1}).reshape({x.size(0), x.size(2) * x.size(3), x.size(1)}));
}

// prototypes (M, D, 1, 1) as one image of M rows.
inline Rows rows_of_prototypes(const at::Tensor& prototypes) {
  return rows_with_contiguous_channels(
      prototypes.reshape({1, prototypes.size(0), prototypes.size(1)}));
}

// Tensor cores need sm_80 (bfloat16, TF32); float32 uses them (as TF32) only when PyTorch's
// float32 matmul precision allows it (allow_tf32, from protokern/backends/cuda.py).
inline GemmPath gemm_path(const at::Tensor& x, bool allow_tf32, const std::string& shapes) {
  int major = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()),
             "cudaDeviceGetAttribute (compute capability)", shapes);
  const bool tensor_cores =
      major >= 8 && (scalar_kind_of(x) != ScalarKind::kFloat32 || allow_tf32);
  return tensor_cores ? GemmPath::kTensorCore : GemmPath::kSimt;
}

// The float32 squared norms of x's rows and of the prototypes (launch_squared_norms).
struct SquaredNorms {
  at::Tensor rows;
  at::Tensor prototypes;
};

inline SquaredNorms squared_norms(ScalarKind kind, const Rows& x_rows, const Rows& proto_rows,
                                  cudaStream_t stream, const std::string& shapes) {
  const auto float_options = x_rows.tensor.options().dtype(at::kFloat);
  SquaredNorms norms{
      at::empty({x_rows.view.num_images * x_rows.view.rows_per_image}, float_options),
      at::empty({proto_rows.view.rows_per_image}, float_options)};
  check_cuda(launch_squared_norms(kind, x_rows.view, norms.rows.data_ptr<float>(), stream),
             "squared_norms_kernel (rows of x)", shapes);
  check_cuda(launch_squared_norms(kind, proto_rows.view, norms.prototypes.data_ptr<float>(),
                                  stream),
             "squared_norms_kernel (prototypes)", shapes);
  return norms;
}

// The dtype and device checks of a backward's grad_values and saved indices.
inline void check_backward_inputs(const char* op, const at::Tensor& grad_values,
                                  const at::Tensor& indices, const at::Tensor& x,
                                  const std::string& shapes) {
  TORCH_CHECK_TYPE(grad_values.scalar_type() == x.scalar_type() &&
                       indices.scalar_type() == at::kLong,
                   op, ": grad_values must have the dtype of x and indices int64, got ",
                   grad_values.scalar_type(), " and ", indices.scalar_type(), " for ", shapes);
  TORCH_CHECK_VALUE(grad_values.device() == x.device() && indices.device() == x.device(),
                    op, ": grad_values and indices must be on ", x.device(), " for ", shapes);
}

// The kernels' float32 gradients of x's rows (B * H * W rows of D, image-major) and of the
// prototypes (M, D), in the inputs' shapes and dtypes; an empty tensor stands for a gradient
// nobody asked for (protokern.ops maps it to None).
inline std::tuple<at::Tensor, at::Tensor> input_gradients(
    const at::Tensor& grad_rows, const at::Tensor& grad_protos, const at::Tensor& x,
    const at::Tensor& prototypes, bool needs_x, bool needs_prototypes) {
  at::Tensor grad_x = needs_x ? grad_rows.view({x.size(0), x.size(2), x.size(3), x.size(1)})
                                    .permute({0, 3, 1, 2})
                                    .to(x.scalar_type())
                              : at::empty({0}, x.options());
  at::Tensor grad_prototypes =
      needs_prototypes
          ? grad_protos.view({prototypes.size(0), prototypes.size(1), 1, 1})
                .to(prototypes.scalar_type())
          : at::empty({0}, prototypes.options());
  return {grad_x, grad_prototypes};
}

}  // namespace protokern::cuda
