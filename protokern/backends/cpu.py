"""The ``cpu`` backend: protokern's fused C++ kernels (``csrc/cpu/``) for CPU tensors.

`min_distance` never holds more than a tile of distances: per task (tasks handed to the threads
from a shared counter), the windows of a few images against a block of prototypes, one GEMM per
tile (see `gemm` for which), the min over positions reduced right after it, and the chosen value
recomputed exactly; with one position per image, where every pair is an output, the tile's value
where the expansion's bound certifies it and the rest recomputed directly (see ``csrc/cpu/``).
Its backward reads only the saved indices, computes only the gradients asked for, and is
deterministic whatever the thread count (with one position per image, where every pair is
selected, it is two dense products instead: deterministic for a given thread count). Parallel
over ``torch.get_num_threads()`` threads. float32 and float64 natively; float16 and bfloat16 are
upcast to float32 while packing.

`nearest_prototypes` (the reduction over prototypes) streams GEMM tiles of rows against the
bank, keeping per row the k smallest upper bounds and a shortlist of the prototypes whose lower
bound is below them, then recomputes only the shortlist directly (``csrc/cpu/``); its backward
is deterministic (each prototype sums its pairs in row order).

`distance_map` and its backward (explanations, not a training hot path) are the reference's
blocked GEMM code: one BLAS GEMM per block of prototypes, as a fused map would be on a CPU.

`topk_distance` is `min_distance`'s tile reduction keeping the k smallest exact distances per
(image, prototype) (``csrc/cpu/topk_distance_forward_kernel.cpp``); its backward is the fused
min backward on k copies of each prototype. `mean_distance` is the reference's closed form (no
map to fuse). Every kernel runs the three kernel metrics: ``"dot"`` (TesNet's ``-<x, p>``)
shortlists with its own bound, ``g |x| |p| + tau`` (Cauchy-Schwarz on the GEMM's K-term sums, as
`reference.expansion_bound`), and recomputes the shortlisted products directly in double.

The float32 tiles of the three forward kernels, and the two dense products of the one-position
backward, run protokern's own register-blocked AVX-512 GEMM (``csrc/cpu/packed_gemm.h``) on AMD
Zen 5 (family 26) and later, where torch's MKL runs at a third of its speed, and PyTorch's BLAS
elsewhere (and always for float64); `gemm` overrides the choice. Results do not depend on it
beyond the GEMM's rounding, which the bounds cover: indices, and every value recomputed exactly,
are the same either way.

Available when ``protokern._C`` was built (``pip install --no-build-isolation -e .``); it is then
the default for CPU tensors.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from protokern.backends import reference
from protokern.backends.registry import Backend, native_ops_error, register_backend

_LOAD_ERROR = native_ops_error("protokern_cpu", "min_distance",
                               "where a C++ compiler is available")


GEMM_CHOICES = ("auto", "blas", "packed")


@contextmanager
def gemm(choice: str) -> Iterator[None]:
    """Inside the block the cpu kernels' float32 GEMM tiles run on ``choice``: ``"packed"``
    (protokern's AVX-512 kernel; ValueError on a CPU without AVX-512F), ``"blas"`` (PyTorch's
    BLAS) or ``"auto"`` (the default: packed on AMD CPUs of family 26, Zen 5, and later, where
    it was measured faster, BLAS elsewhere). The choice is process-wide, not per thread, and the
    previous one comes back on exit."""
    if choice not in GEMM_CHOICES:
        raise ValueError(f"gemm: choice must be one of {GEMM_CHOICES}, got {choice!r}")
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    previous = torch.ops.protokern_cpu.set_gemm(choice)
    try:
        yield
    finally:
        torch.ops.protokern_cpu.set_gemm(previous)


def gemm_in_use() -> str | None:
    """``"packed"`` or ``"blas"``: what the float32 tiles run now; None without the extension."""
    return None if _LOAD_ERROR is not None else torch.ops.protokern_cpu.gemm_in_use()


def packed_gemm_supported() -> bool:
    """Whether this CPU runs the packed GEMM (AVX-512F) and the extension is built."""
    return _LOAD_ERROR is None and torch.ops.protokern_cpu.packed_gemm_supported()


def _gemm_rounding(x: Tensor) -> float:
    """Rounding the float32 GEMM may apply to its inputs (half inputs are upcast to float32)."""
    return reference.input_rounding(torch.float64 if x.dtype == torch.float64 else torch.float32,
                                    x.device)


def min_distance(x: Tensor, prototypes: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """``(values (B, M), indices (B, M) int64)``; canonical inputs as in
    `protokern.backends.reference`."""
    values, indices = torch.ops.protokern_cpu.min_distance(x, prototypes, metric,
                                                           _gemm_rounding(x))
    return values, indices


def min_distance_backward(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor, metric: str,
    needs_x: bool = True, needs_prototypes: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_x (B, D, H, W), grad_prototypes (M, D, ph, pw))`` through the saved indices; a
    gradient not asked for is None and is not computed."""
    grad_x, grad_prototypes = torch.ops.protokern_cpu.min_distance_backward(
        grad_values, x, prototypes, indices, metric, needs_x, needs_prototypes)
    return (grad_x if needs_x else None), (grad_prototypes if needs_prototypes else None)


def nearest_prototypes(x: Tensor, prototypes: Tensor, metric: str, k: int
                       ) -> tuple[Tensor, Tensor]:
    """``(values (B, L', k), indices (B, L', k))``: the k nearest prototypes of every window."""
    values, indices = torch.ops.protokern_cpu.nearest_prototypes(x, prototypes, metric, k,
                                                                 _gemm_rounding(x))
    return values, indices


def nearest_prototypes_backward(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor, metric: str,
    needs_x: bool = True, needs_prototypes: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients through the chosen pairs; one not asked for is None and is not computed."""
    grad_x, grad_prototypes = torch.ops.protokern_cpu.nearest_prototypes_backward(
        grad_values, x, prototypes, indices, metric, needs_x, needs_prototypes)
    return (grad_x if needs_x else None), (grad_prototypes if needs_prototypes else None)


def topk_distance(x: Tensor, prototypes: Tensor, metric: str, k: int) -> tuple[Tensor, Tensor]:
    """``(values (B, M, k), indices (B, M, k))``: the k smallest distances over positions, by
    min_distance's tile reduction with k survivors per (image, prototype)."""
    values, indices = torch.ops.protokern_cpu.topk_distance(x, prototypes, metric, k,
                                                            _gemm_rounding(x))
    return values, indices


def _topk_distance_rule(x: Tensor, prototypes: Tensor, metric: str, k: int) -> str | None:
    if not hasattr(torch.ops.protokern_cpu, "topk_distance"):
        return "protokern._C was built without the topk_distance kernel; rebuild it"
    return None


register_backend(
    Backend(
        name="cpu",
        kernels={
            "min_distance": min_distance,
            "min_distance_backward": min_distance_backward,
            "distance_map": reference.distance_map,
            "distance_map_backward": reference.distance_map_backward,
            "nearest_prototypes": nearest_prototypes,
            "nearest_prototypes_backward": nearest_prototypes_backward,
            "topk_distance": topk_distance,
            "topk_distance_backward": reference.topk_backward_through(min_distance_backward),
            # a closed form of a few reductions (no map, no GEMM over positions): nothing to
            # fuse, the reference's code is the CPU kernel
            "mean_distance": reference.mean_distance,
            "mean_distance_backward": reference.mean_distance_backward,
        },
        rules={"topk_distance": _topk_distance_rule},
        device_types=frozenset({"cpu"}),
        priority=20,
        unavailable_reason=lambda: _LOAD_ERROR,
    )
)
