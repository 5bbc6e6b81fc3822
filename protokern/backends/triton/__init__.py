"""The ``triton`` backend: fused Triton kernels for CUDA tensors.

Under ``TRITON_INTERPRET=1`` (read when protokern is imported) the same kernels run on CPU tensors
in Triton's interpreter, which is how CI tests them; interpreted, the backend never becomes the
default (priority below ``reference``). Importing this package never imports triton: a missing or
broken triton only makes the backend unavailable, with the reason. The kernel modules load on
first use.

- `min_distance`: the fused forward (GEMM expansion, running min/argmin, exact value).
- `min_distance_backward`: gradients from the saved positions (gather; scatter with a
  deterministic path).
- `distance_map`: every distance, no reduction; its backward is the reference's GEMM code (one
  PyTorch GEMM per block of prototypes, on the GPU: explanations, not a training hot path).
- `nearest_prototypes`: the k nearest prototypes of every window (certified by the expansion's
  rounding bound, the candidates recomputed directly) and its deterministic backward; ``k`` up
  to `MAX_K`.
- `topk_distance`: the k smallest distances over positions (min_distance's tile loop with a
  running top-k per pair, `selection`, shared with nearest_prototypes; the candidates
  recomputed directly, a direct search where the bounds cannot decide; ``k = 1`` is
  min_distance); ``k`` up to `MAX_TOPK`. Its backward is min_distance's on ``k`` copies of each
  prototype (`reference.topk_backward_through`).
- `mean_distance` and its backward: the reference's closed form (a few reductions and one
  ``(B, K) x (K, M)`` product, no map over positions: nothing to fuse), every metric, ``dot``
  included.

The ``dot`` metric is refused by every kernel that shortlists (min_distance, distance_map,
nearest_prototypes, topk_distance): they have no rounding bound for it.
"""

import functools
import importlib

import torch

from protokern import env
from protokern.backends import reference
from protokern.backends.registry import Backend, register_backend

INTERPRET = env.flag("TRITON_INTERPRET")
"""Whether Triton runs kernels in its interpreter (on CPU tensors), as of import."""


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as error:  # a broken install raises more than ImportError
        return f"triton is not importable ({type(error).__name__}: {error})"
    return None


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here, or None."""
    error = _triton_import_error()
    if error is not None:
        return error
    if not INTERPRET and not torch.cuda.is_available():
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors, slowly)"
    return None


def _kernel_function(module: str, name: str):
    """``protokern.backends.triton.<module>.<name>``, imported on its first call."""

    def call(*args):
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)(*args)

    call.__name__ = name
    return call


MAX_K = 64
"""The largest ``k`` of `nearest_prototypes` (its per-row state lives in registers)."""


MAX_TOPK = 16
"""The largest ``k`` of `topk_distance` (per pair, its k upper bounds and up to 2 k lower bounds
with their positions live in registers)."""


_no_dot = reference.dot_refusal("its kernels")


def _k_rule(op: str, bound: int, kept: str):
    """The rule of an op with a ``k``: no ``dot``, and ``k`` at most ``bound`` (the kernel keeps
    its ``kept`` in registers)."""

    def rule(x, prototypes, metric: str, k: int) -> str | None:
        if metric == "dot":
            return _no_dot(x, prototypes, metric)
        if k > bound:
            return f"its {op} kernel keeps at most k={bound} {kept} in registers, got k={k}"
        return None

    return rule


_nearest_prototypes_rule = _k_rule("nearest_prototypes", MAX_K, "candidates per row")
_topk_distance_rule = _k_rule("topk_distance", MAX_TOPK, "distances per (image, prototype)")


register_backend(
    Backend(
        name="triton",
        kernels={
            "min_distance": _kernel_function("min_distance", "min_distance"),
            "min_distance_backward": _kernel_function("min_distance_backward",
                                                      "min_distance_backward"),
            "distance_map": _kernel_function("distance_map", "distance_map"),
            "distance_map_backward": reference.distance_map_backward,
            "nearest_prototypes": _kernel_function("nearest_prototypes", "nearest_prototypes"),
            "nearest_prototypes_backward": _kernel_function("nearest_prototypes_backward",
                                                            "nearest_prototypes_backward"),
            "topk_distance": _kernel_function("topk_distance", "topk_distance"),
            # min_distance's backward on k copies of each prototype: the copies are (M k, D ph
            # pw), a few times the prototypes, where reading the (B, M, k) positions in place
            # would take a second addressing (one prototype per k pairs) in each of the four
            # backward kernels, the deterministic buckets included
            "topk_distance_backward": reference.topk_backward_through(
                _kernel_function("min_distance_backward", "min_distance_backward")),
            # a closed form of a few reductions and one (B, K) x (K, M) product (no map, no
            # GEMM over positions): nothing to fuse, the reference's PyTorch is the GPU code
            "mean_distance": reference.mean_distance,
            "mean_distance_backward": reference.mean_distance_backward,
        },
        rules={"nearest_prototypes": _nearest_prototypes_rule, "min_distance": _no_dot,
               "distance_map": _no_dot, "topk_distance": _topk_distance_rule},
        device_types=frozenset({"cuda", "cpu"} if INTERPRET else {"cuda"}),
        # below cuda (15) on CUDA tensors; interpreted, below reference: never a CPU default
        priority=-10 if INTERPRET else 10,
        unavailable_reason=unavailable_reason,
    )
)
