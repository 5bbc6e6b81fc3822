"""The ``cuda`` backend: protokern's fused CUDA C++ kernels (``csrc/cuda/``) for CUDA tensors.

The default for CUDA tensors once built (priority 15, above ``triton``'s 10), as DESIGN §3
says. **Not yet run on a GPU**: the kernels were written on a machine without one and checked
there by compiling them with nvcc for sm_80 and sm_90 (warnings as errors), by compiling the
glue against torch's and CUDA's headers (``csrc/cuda/compile_check.sh``, in CI), and by running
the kernel sources through a CPU emulation of threads, warps, atomics and WMMA against the
float64 brute force (not part of the repository). The first GPU session should run
``tests/test_cuda_kernel.py`` and the benchmarks; until then ``pk.use_backend("triton")`` or
``PROTOKERN_BACKEND=triton`` chooses the Triton kernels instead.

What runs where (inputs in the canonical forms of `protokern.reference`):

- 1x1 prototypes (and ``(B, L, D)`` tokens) in float32, float16 or bfloat16: the CUDA kernels,
  through ``torch.ops.protokern_cuda`` (registered by ``csrc/cuda/min_distance_cuda.cpp`` when
  ``protokern._C`` loads).

  - forward: float32 squared norms, then one kernel that runs the GEMM ``prototypes . x^T``
    tile by tile (WMMA tensor cores for float16/bfloat16; for float32 TF32 tensor cores when
    PyTorch's float32 matmul precision allows TF32, exact float32 FMAs otherwise), turns each
    tile into distances with the norms and keeps the min/argmin over positions (lowest index on
    ties, NaN first), and a last kernel that recomputes the distance at the chosen position
    directly in float32. Pairs with an inf or NaN entry are computed directly, never by the
    expansion. Deterministic.
  - backward, from the saved indices: a gather over images for ``grad_prototypes``; for
    ``grad_x`` a scatter, deterministic (a stable counting sort of each image's prototypes by
    position, then fixed-order sums) when ``torch.are_deterministic_algorithms_enabled()``, float
    atomics otherwise.

- ``ph x pw`` prototypes: the ``triton`` backend (looked up by name on each call; a clear error
  if it is not available).
- float64: the ``reference`` backend (exact; cuBLAS through PyTorch).
- `distance_map` and its backward (explanations, not the training hot path): the reference's
  GEMM code.

Known limits: where every distance of an (image, prototype) pair exceeds the float32 range, the
value is inf (as the float64 truth cast to float32 is) but the index is the first position, not
the float64 argmin; and, as in the reference's float32 backward, cosine gradients lose the
``x`` term where ``|x|^2`` overflows float32.

Available when ``protokern._C`` was built with its CUDA kernels (a CUDA PyTorch and nvcc at
install time, ``pip install --no-build-isolation -e .``) and a GPU is visible.
"""

import functools

import torch
from torch import Tensor

from protokern import reference
from protokern.backends import Backend, backend_named, native_ops_error, register_backend


@functools.cache
def _build_error() -> str | None:
    return native_ops_error("protokern_cuda", "min_distance_forward",
                            "where PyTorch has CUDA and nvcc exists")


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here, or None."""
    error = _build_error()
    if error is None and not torch.cuda.is_available():
        error = "no CUDA GPU is visible"
    return error


def _fallback(x: Tensor, prototypes: Tensor) -> Backend | None:
    """The backend that runs inputs the kernels do not take, or None for the kernels."""
    if x.dtype == torch.float64:
        return backend_named("reference", "protokern cuda backend (float64)")
    ph, pw = prototypes.shape[-2:]
    if (ph, pw) == (1, 1):
        return None
    try:
        return backend_named("triton", "protokern cuda backend")
    except (ValueError, RuntimeError) as error:
        raise RuntimeError(
            f"protokern cuda backend: prototypes {tuple(prototypes.shape)} have a {ph}x{pw} "
            "window; the CUDA kernels take 1x1 prototypes only and hand larger windows to the "
            f"triton backend, which is not available here ({error}). Use "
            "pk.use_backend('reference') or install triton."
        ) from error


def tf32_allowed(device: torch.device) -> bool:
    """Whether PyTorch's float32 matmul precision lets float32 GEMMs on ``device`` use TF32."""
    return reference.input_rounding(torch.float32, device) > 0


def min_distance(x: Tensor, prototypes: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """``(values (B, M), indices (B, M) int64)`` for ``x`` ``(B, D, H, W)`` and
    ``prototypes`` ``(M, D, ph, pw)``."""
    fallback = _fallback(x, prototypes)
    if fallback is not None:
        return fallback.min_distance(x, prototypes, metric)
    return torch.ops.protokern_cuda.min_distance_forward(
        x, prototypes, metric, tf32_allowed(x.device))


def min_distance_backward(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor, metric: str
) -> tuple[Tensor, Tensor]:
    """``(grad_x (B, D, H, W), grad_prototypes (M, D, ph, pw))`` through the saved indices."""
    fallback = _fallback(x, prototypes)
    if fallback is not None:
        return fallback.min_distance_backward(grad_values, x, prototypes, indices, metric)
    return torch.ops.protokern_cuda.min_distance_backward(
        grad_values, x, prototypes, indices, metric,
        torch.are_deterministic_algorithms_enabled())


register_backend(
    Backend(
        name="cuda",
        min_distance=min_distance,
        min_distance_backward=min_distance_backward,
        distance_map=reference.distance_map,
        device_types=frozenset({"cuda"}),
        priority=15,  # the CUDA default, above triton (10): DESIGN §3
        unavailable_reason=unavailable_reason,
    )
)
