"""The ``cuda`` backend: protokern's fused CUDA C++ kernels (``csrc/cuda/``) for CUDA tensors.

The default for CUDA tensors once built (priority 15, above ``triton``'s 10), as DESIGN §3
says. Not yet run on a GPU: what has been checked without one, and how, is in
``benchmarks/NOTES.md``.

What it runs (inputs in the canonical forms of `protokern.backends.reference`), through
``torch.ops.protokern_cuda`` (registered by ``csrc/cuda/min_distance_cuda.cpp`` and
``csrc/cuda/nearest_prototypes_cuda.cpp`` when ``protokern._C`` loads), for 1x1 prototypes (and
``(B, L, D)`` tokens, ``(N, D)`` vectors) in float32, float16 or bfloat16:

- `min_distance` forward: float32 squared norms, then one kernel that runs the GEMM
  ``prototypes . x^T`` tile by tile (WMMA tensor cores for float16/bfloat16, its two stages
  double-buffered with cp.async where rows are 16-byte aligned; for float32 TF32 tensor cores
  when PyTorch's float32 matmul precision allows TF32, exact float32 FMAs otherwise; the tile
  is ``csrc/cuda/dot_tiles.cuh``), turns each tile into distances with the norms and keeps the
  min/argmin over positions (lowest index on ties, NaN first). Rows are the grid's fast index:
  the blocks running together share a prototype tile while the rows of ``x`` stream from L2,
  so the bank is read about once. A last kernel recomputes the distance at the chosen position
  directly in float32 where the search's value may be less exact (TF32 operands, or an
  expansion that cancelled more than one bit, e.g. a prototype on its patch); elsewhere it
  keeps the search's, reading two norms instead of two rows. Pairs with an inf or NaN entry
  are computed directly, never by the expansion. Deterministic.
- `min_distance` backward, from the saved indices, only the gradients asked for: per pair,
  coefficients in double (cosine's ~ g / |v|^2 underflows float32 where |v|^2 overflows it,
  norms past ~1.8e19) and, for sqeuclidean, ``2 g (x - p)`` with the difference taken first
  (exact for a prototype pushed onto its patch, where ``2 g x - 2 g p`` cancels); then a gather
  over images for ``grad_prototypes``; for ``grad_x`` a scatter, deterministic (a stable
  counting sort of each image's prototypes by position, then fixed-order sums) when
  ``torch.are_deterministic_algorithms_enabled()``, float atomics otherwise.
- `nearest_prototypes` forward, ``k <= MAX_K``: a block of 64 rows (windows) streams every
  prototype past it through the same GEMM tiles (memory: the outputs, one flag per row and the
  tiles; never the ``(N, M)`` matrix); per row a warp keeps, from the expansion minus / plus the
  Triton kernel's rounding bound, the k smallest upper bounds (the largest is T) and 32
  candidate slots; when every prototype outside the slots has a lower bound above T, the slots
  within T are recomputed directly and the first k by (exact distance, index) win, so values
  ascend, each is the exact float32 distance at its pair, and ties go to the lowest index. A
  row the bounds cannot settle (more near-ties than slots, an inf or NaN entry, squares that
  may overflow; a NaN or inf prototype sends every row) is searched directly against every
  prototype: a NaN in a row gives NaN values at indices 0 .. k-1, as the reference. TF32, when
  allowed, rounds the GEMM's operands only: near-ties within its tolerance may move, the
  values are recomputed all the same.
- `nearest_prototypes` backward, from the saved indices, only the gradients asked for: the
  same per-pair coefficients (double for cosine, ``2 g (x - p)``); ``grad_x`` sums each row's
  k pairs in order (deterministic); ``grad_prototypes`` gathers each prototype's pairs in the
  order of a stable sort by prototype when ``torch.are_deterministic_algorithms_enabled()``,
  float atomics otherwise.
- `distance_map` and its backward (explanations, not the training hot path): the reference's
  blocked GEMM code, on the GPU.

It refuses (`Backend.supports`) ``ph x pw`` windows, float64 and the ``"dot"`` metric, and
for `nearest_prototypes` ``k > MAX_K`` and banks past 2^31 - 1 prototypes: the automatic
choice then takes the next backend (``triton``, then ``reference``), and an explicit choice of
``cuda`` is a ValueError with that reason. `topk_distance` and `mean_distance` have no kernel
here (the automatic choice runs them elsewhere).

Known limit: where every distance of an (image, prototype) pair exceeds the float32 range,
the value is inf (as the float64 truth cast to float32 is) but the index is the first position,
not the float64 argmin.

Available when ``protokern._C`` was built with its CUDA kernels (a CUDA PyTorch and nvcc at
install time, ``pip install --no-build-isolation -e .``) and a GPU is visible.
"""

import functools

import torch
from torch import Tensor

from protokern.backends import reference
from protokern.backends.registry import Backend, native_ops_error, register_backend


@functools.cache
def _build_error() -> str | None:
    return native_ops_error("protokern_cuda", "min_distance",
                            "where PyTorch has CUDA and nvcc exists")


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here, or None."""
    error = _build_error()
    if error is None and not torch.cuda.is_available():
        error = "no CUDA GPU is visible"
    return error


def unsupported_reason(x: Tensor, prototypes: Tensor, **options) -> str | None:
    """Why the kernels cannot run ``min_distance`` on these canonical inputs, or None."""
    if options.get("metric") == "dot":
        return reference.dot_refusal("the CUDA kernels")(x, prototypes, **options)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return (f"the CUDA kernels take float32, float16 and bfloat16, not "
                f"{str(x.dtype).removeprefix('torch.')}")
    ph, pw = prototypes.shape[-2:]
    if (ph, pw) != (1, 1):
        return f"the CUDA kernels take 1x1 prototypes, not a {ph}x{pw} window"
    return None


MAX_K = 32
"""The largest ``k`` of `nearest_prototypes`: a row's k smallest upper bounds and its candidate
slots are spread over the 32 lanes of one warp (``csrc/cuda/nearest_prototypes_kernels.h``)."""

MAX_PROTOTYPES = 2**31 - 1
"""The largest bank of `nearest_prototypes`: its candidate slots hold int32 indices."""


def nearest_prototypes_reason(x: Tensor, prototypes: Tensor, metric: str, k: int
                              ) -> str | None:
    """Why the kernels cannot run ``nearest_prototypes`` on these canonical inputs, or None."""
    reason = unsupported_reason(x, prototypes, metric=metric)
    if reason is not None:
        return reason
    if k > MAX_K:
        return (f"the CUDA nearest_prototypes kernel keeps at most k={MAX_K} per row (one "
                f"upper bound and one candidate slot per lane of a warp), got k={k}")
    if prototypes.shape[0] > MAX_PROTOTYPES:
        return (f"the CUDA nearest_prototypes kernel takes at most {MAX_PROTOTYPES} "
                f"prototypes (int32 indices in its slots), got M={prototypes.shape[0]}")
    return None


def tf32_allowed(device: torch.device) -> bool:
    """Whether PyTorch's float32 matmul precision lets float32 GEMMs on ``device`` use TF32."""
    return reference.input_rounding(torch.float32, device) > 0


def min_distance(x: Tensor, prototypes: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """``(values (B, M), indices (B, M) int64)`` for ``x`` ``(B, D, H, W)`` and
    ``prototypes`` ``(M, D, 1, 1)``."""
    return torch.ops.protokern_cuda.min_distance(x, prototypes, metric, tf32_allowed(x.device))


def min_distance_backward(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor, metric: str,
    needs_x: bool = True, needs_prototypes: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_x (B, D, H, W), grad_prototypes (M, D, 1, 1))`` through the saved indices; a
    gradient not asked for is None and is not computed."""
    grad_x, grad_prototypes = torch.ops.protokern_cuda.min_distance_backward(
        grad_values, x, prototypes, indices, metric, needs_x, needs_prototypes,
        torch.are_deterministic_algorithms_enabled())
    return (grad_x if needs_x else None), (grad_prototypes if needs_prototypes else None)


def nearest_prototypes(x: Tensor, prototypes: Tensor, metric: str, k: int
                       ) -> tuple[Tensor, Tensor]:
    """``(values (B, L', k), indices (B, L', k) int64)``: the k nearest prototypes of every row
    of ``x`` ``(B, D, H, W)`` among ``prototypes`` ``(M, D, 1, 1)``."""
    return torch.ops.protokern_cuda.nearest_prototypes(x, prototypes, metric, k,
                                                       tf32_allowed(x.device))


def nearest_prototypes_backward(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor, metric: str,
    needs_x: bool = True, needs_prototypes: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_x (B, D, H, W), grad_prototypes (M, D, 1, 1))`` through the saved ``indices``
    ``(B, L', k)``; a gradient not asked for is None and is not computed."""
    grad_x, grad_prototypes = torch.ops.protokern_cuda.nearest_prototypes_backward(
        grad_values, x, prototypes, indices, metric, needs_x, needs_prototypes,
        torch.are_deterministic_algorithms_enabled())
    return (grad_x if needs_x else None), (grad_prototypes if needs_prototypes else None)


register_backend(
    Backend(
        name="cuda",
        kernels={
            "min_distance": min_distance,
            "min_distance_backward": min_distance_backward,
            "distance_map": reference.distance_map,
            "distance_map_backward": reference.distance_map_backward,
            "nearest_prototypes": nearest_prototypes,
            "nearest_prototypes_backward": nearest_prototypes_backward,
        },
        rules={"min_distance": unsupported_reason,
               "nearest_prototypes": nearest_prototypes_reason},
        device_types=frozenset({"cuda"}),
        priority=15,  # the CUDA default, above triton (10): DESIGN §3
        unavailable_reason=unavailable_reason,
    )
)
