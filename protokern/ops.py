"""protokern's operators: validation, `torch.library` registration, autograd and dispatch.

Public functions (`min_distance`, `distance_map`, `nearest_prototypes`, `topk_distance`,
`mean_distance`) validate the user's shapes, apply autocast,
reshape them (views only) into the canonical forms ``x`` ``(B, D, H, W)`` and ``prototypes``
``(M, D, ph, pw)``, and call the custom ops

- ``protokern::min_distance(x, prototypes, metric, choice) -> (values, indices)``
- ``protokern::min_distance_backward(grad_values, x, prototypes, indices, metric, choice,
  needs_x, needs_prototypes) -> (grad_x, grad_prototypes)``
- ``protokern::distance_map(x, prototypes, metric, choice) -> (B, M, H', W')``
- ``protokern::distance_map_backward(grad_map, x, prototypes, metric, choice, needs_x,
  needs_prototypes) -> (grad_x, grad_prototypes)``
- ``protokern::nearest_prototypes`` / ``topk_distance(x, prototypes, metric, k, choice) ->
  (values, indices)`` and their ``_backward`` (as min_distance's, the indices ``(..., k)``)
- ``protokern::mean_distance(x, prototypes, metric, choice) -> (B, M)`` and its
  ``mean_distance_backward(grad_values, x, prototypes, metric, choice, needs_x,
  needs_prototypes)``

The custom ops take the `KERNEL_METRICS`; the public functions compute ``"euclidean"`` from
the sqeuclidean ops (`euclidean`).

``choice`` is the backend the user chose (`protokern.backends.explicit_choice`), or ``""`` for
the automatic one. Every op resolves its backend from the choice and its actual inputs
(`protokern.backends.resolve`) when it runs, so the backward pass, which sees the same inputs,
runs on its forward pass's backend, and a compiled graph asks each call's inputs. Under
`torch.compile` the explicit choice is a compile-time constant: a compiled function keeps the
choice it was compiled under (`torch.compiler.reset()` to choose again). The ops have fake
implementations, so they trace under `torch.compile` (no graph break). `torch.export` (and
``torch.onnx.export(..., dynamo=True)``) records each op's ATen formulation instead
(`call_op`, `protokern.decompositions`), so an exported program runs without protokern.

A backward op computes only the gradients autograd needs (``ctx.needs_input_grad``); one it
skips comes back as an empty ``(0,)`` tensor and autograd gets None.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from protokern.backends import explicit_choice, record_call, reference, resolve
from protokern.decompositions import DECOMPOSITIONS

METRICS = ("sqeuclidean", "cosine", "euclidean", "dot")
"""The metrics of the public functions. ``"euclidean"`` is ``sqrt(max(d, 0) + eps)`` of the
sqeuclidean ``d``, computed from the sqeuclidean ops (the root is monotone, so the minimum and
its position are the sqeuclidean one's); the custom ops and the backends see `KERNEL_METRICS`."""
KERNEL_METRICS = ("sqeuclidean", "cosine", "dot")
"""The metrics the custom ops and the backends' kernels take."""
EUCLIDEAN_EPS = 1e-14
"""The default ``eps`` of the ``"euclidean"`` metric, ProtoTree's ``sqrt(|d| + 1e-14)``."""
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class MinDistance(NamedTuple):
    """Result of `min_distance`, like `torch.min`'s: both ``(B, M)``."""

    values: Tensor
    """Minimum distance over positions, in the input dtype."""
    indices: Tensor
    """int64 flat row-major index into ``H' x W'`` (or ``L``) of the first position attaining it."""


class TopkDistance(NamedTuple):
    """Result of `topk_distance`, like `torch.topk`'s (smallest first): both ``(B, M, k)``."""

    values: Tensor
    """The ``k`` smallest distances over positions, ascending, in the input dtype (NaN first
    where a distance is NaN)."""
    indices: Tensor
    """int64 flat row-major indices into ``H' x W'`` (or ``L``) of their positions (ties: the
    lowest position)."""


class NearestPrototypes(NamedTuple):
    """Result of `nearest_prototypes`, like `torch.topk`'s (smallest first): both
    ``(..., k)``."""

    values: Tensor
    """The ``k`` smallest distances of each patch, token or vector, ascending, in the input
    dtype (NaN first where a distance is NaN)."""
    indices: Tensor
    """int64 indices of the prototypes they belong to (ties: the lowest index)."""


# ----------------------------------------------------------------------------------------------
# Validation


def check_metric(metric: object, where: str) -> None:
    """Raise ValueError unless ``metric`` names a supported metric."""
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"{where}: unknown metric {metric!r}; expected one of {METRICS}")


def check_k(k: object, num_prototypes: int, what: str, where: str) -> None:
    """Raise TypeError unless ``k`` is an int, ValueError unless ``1 <= k <= num_prototypes``
    (``what`` names what ``k`` counts and where the limit comes from)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{where}: k must be an int, got {type(k).__name__} {k!r}")
    if not 1 <= k <= num_prototypes:
        raise ValueError(f"{where}: k={k} must be between 1 and {what}")


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def canonicalize(
    x: Tensor, prototypes: Tensor, metric: str, where: str, vectors: bool = False
) -> tuple[Tensor, Tensor, str]:
    """Check the public inputs and view them as ``x`` ``(B, D, H, W)``, ``p`` ``(M, D, ph, pw)``.

    Returns ``(x4, p4, layout)``, ``layout`` saying what ``x`` was: ``"map"`` ``(B, D, H, W)``,
    ``"tokens"`` ``(B, L, D)`` (which becomes ``(B, D, L, 1)``) or, where ``vectors`` allows
    them, ``"vectors"`` ``(N, D)`` (which becomes ``(N, D, 1, 1)``). Raises TypeError/ValueError
    naming the argument and the shapes.
    """
    for name, t in (("x", x), ("prototypes", prototypes)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise TypeError(
                f"{where}: {name} must be float16, bfloat16, float32 or float64, "
                f"got {t.dtype} (shape {_shape(t)})"
            )
    check_metric(metric, where)
    if x.dtype != prototypes.dtype:
        raise TypeError(
            f"{where}: x and prototypes must share a dtype, got x {x.dtype} {_shape(x)} and "
            f"prototypes {prototypes.dtype} {_shape(prototypes)}"
        )
    if x.device != prototypes.device:
        raise ValueError(
            f"{where}: x and prototypes must be on one device, got x on {x.device} and "
            f"prototypes on {prototypes.device}"
        )

    if x.dim() == 2 and vectors:
        kind, x4, layout = "vectors", x[:, :, None, None], "(N, D)"
    elif x.dim() == 3:
        kind, x4, layout = "tokens", x.transpose(1, 2).unsqueeze(-1), "(B, L, D)"
    elif x.dim() == 4:
        kind, x4, layout = "map", x, "(B, D, H, W)"
    else:
        accepted = ("a (B, D, H, W) feature map, (B, L, D) tokens or (N, D) vectors" if vectors
                    else "a (B, D, H, W) feature map or (B, L, D) tokens")
        raise ValueError(
            f"{where}: x must be {accepted}, got a {x.dim()}-d tensor of shape {_shape(x)}"
        )
    tokens = kind != "map"
    if prototypes.dim() == 2:
        p4 = prototypes[:, :, None, None]
    elif prototypes.dim() == 4:
        p4 = prototypes
    else:
        raise ValueError(
            f"{where}: prototypes must be (M, D), (M, D, 1, 1) or (M, D, ph, pw), "
            f"got a {prototypes.dim()}-d tensor of shape {_shape(prototypes)}"
        )

    batch, dim, height, width = x4.shape
    num, proto_dim, ph, pw = p4.shape
    if proto_dim != dim:
        raise ValueError(
            f"{where}: x {_shape(x)} as {layout} has D={dim} but prototypes "
            f"{_shape(prototypes)} have D={proto_dim}"
        )
    if num == 0 and batch > 0:
        raise ValueError(
            f"{where}: prototypes {_shape(prototypes)} is empty (M = 0) but x {_shape(x)} "
            f"has B={batch} images; there is no minimum to return"
        )
    if tokens and (ph, pw) != (1, 1):
        raise ValueError(
            f"{where}: {kind} x {_shape(x)} as {layout} take prototypes (M, D) or "
            f"(M, D, 1, 1), got prototypes {_shape(prototypes)} with a {ph}x{pw} window"
        )
    if ph < 1 or pw < 1 or ph > height or pw > width:
        what = f"L={height} tokens" if tokens else f"the {height}x{width} feature map"
        raise ValueError(
            f"{where}: the prototype window {ph}x{pw} (prototypes {_shape(prototypes)}) does "
            f"not fit in {what} (x {_shape(x)} as {layout})"
        )
    return x4, p4, kind


# ----------------------------------------------------------------------------------------------
# Custom ops (canonical inputs; the public functions below validate)


# Every output is contiguous, in the fake and the real implementations alike, whatever the
# strides of the inputs: a layout that depends on shapes only cannot differ between the two.


def run_kernel(op: str, kernel: str, choice: str, x: Tensor, prototypes: Tensor,
               options: dict, *args):
    """``kernel(*args)`` (``kernel`` is ``op`` or its backward) of the backend that ``choice``
    and the canonical inputs ``x``, ``prototypes`` with ``options`` (the op's, e.g.
    ``{"metric": ...}``) resolve to (`protokern.backends.resolve`), recording which one ran.
    Autocast is off inside: the public functions have already cast the inputs, and a kernel's
    own float32 GEMMs must not be lowered."""
    backend = resolve(op, choice, x, prototypes, **options)
    record_call(kernel, backend.name)
    with torch.autocast(x.device.type, enabled=False):
        return backend.kernel(kernel)(*args)


def _gradient_or_empty(grad: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if grad is None else grad.contiguous()


def _fake_gradient(like: Tensor, needed: bool) -> Tensor:
    return like.new_empty(like.shape if needed else (0,))


@torch.library.custom_op("protokern::min_distance", mutates_args=())
def _min_distance_op(
    x: Tensor, prototypes: Tensor, metric: str, choice: str
) -> tuple[Tensor, Tensor]:
    values, indices = run_kernel("min_distance", "min_distance", choice, x, prototypes,
                                 {"metric": metric}, x, prototypes, metric)
    return values.contiguous(), indices.contiguous()


@_min_distance_op.register_fake
def _(x: Tensor, prototypes: Tensor, metric: str, choice: str) -> tuple[Tensor, Tensor]:
    torch._check(x.dim() == 4 and prototypes.dim() == 4, lambda: "canonical 4-d inputs expected")
    shape = (x.shape[0], prototypes.shape[0])
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("protokern::min_distance_backward", mutates_args=())
def _min_distance_backward_op(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor, metric: str,
    choice: str, needs_x: bool, needs_prototypes: bool,
) -> tuple[Tensor, Tensor]:
    grad_x, grad_prototypes = run_kernel(
        "min_distance", "min_distance_backward", choice, x, prototypes, {"metric": metric},
        grad_values, x, prototypes, indices, metric, needs_x, needs_prototypes)
    return _gradient_or_empty(grad_x, x), _gradient_or_empty(grad_prototypes, prototypes)


@_min_distance_backward_op.register_fake
def _(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor, metric: str,
    choice: str, needs_x: bool, needs_prototypes: bool,
) -> tuple[Tensor, Tensor]:
    return _fake_gradient(x, needs_x), _fake_gradient(prototypes, needs_prototypes)


@torch.library.custom_op("protokern::distance_map", mutates_args=())
def _distance_map_op(x: Tensor, prototypes: Tensor, metric: str, choice: str) -> Tensor:
    dmap = run_kernel("distance_map", "distance_map", choice, x, prototypes,
                      {"metric": metric}, x, prototypes, metric).contiguous()
    # The map is the GEMM expansion, off by ~eps (|x|^2 + |p|^2) (7.6e-6 at a pushed patch whose
    # distance is 0); each (image, prototype)'s minimum gets the exact distance, recomputed
    # from the map's own shortlist, so heatmaps and push see the forward pass's numbers.
    if dmap.numel():
        with torch.autocast(x.device.type, enabled=False):
            reference.write_exact_minima(dmap, x, prototypes, metric)
    return dmap


@_distance_map_op.register_fake
def _(x: Tensor, prototypes: Tensor, metric: str, choice: str) -> Tensor:
    torch._check(x.dim() == 4 and prototypes.dim() == 4, lambda: "canonical 4-d inputs expected")
    out_h = x.shape[2] - prototypes.shape[2] + 1
    out_w = x.shape[3] - prototypes.shape[3] + 1
    return x.new_empty((x.shape[0], prototypes.shape[0], out_h, out_w))


# An op rather than PyTorch code traced into the backward graph: traced, the reference's
# unfold/fold gave wrong conv-backbone gradients under Inductor's channels_last layout
# optimisation (tests/test_compile.py catches it). As an op, a backend can also fuse it.
@torch.library.custom_op("protokern::distance_map_backward", mutates_args=())
def _distance_map_backward_op(
    grad_map: Tensor, x: Tensor, prototypes: Tensor, metric: str, choice: str, needs_x: bool,
    needs_prototypes: bool,
) -> tuple[Tensor, Tensor]:
    grad_x, grad_prototypes = run_kernel(
        "distance_map", "distance_map_backward", choice, x, prototypes, {"metric": metric},
        grad_map, x, prototypes, metric, needs_x, needs_prototypes)
    return _gradient_or_empty(grad_x, x), _gradient_or_empty(grad_prototypes, prototypes)


@_distance_map_backward_op.register_fake
def _(
    grad_map: Tensor, x: Tensor, prototypes: Tensor, metric: str, choice: str, needs_x: bool,
    needs_prototypes: bool,
) -> tuple[Tensor, Tensor]:
    return _fake_gradient(x, needs_x), _fake_gradient(prototypes, needs_prototypes)


@torch.library.custom_op("protokern::nearest_prototypes", mutates_args=())
def _nearest_prototypes_op(
    x: Tensor, prototypes: Tensor, metric: str, k: int, choice: str
) -> tuple[Tensor, Tensor]:
    values, indices = run_kernel("nearest_prototypes", "nearest_prototypes", choice, x,
                                 prototypes, {"metric": metric, "k": k}, x, prototypes, metric, k)
    return values.contiguous(), indices.contiguous()


def _windows(x: Tensor, prototypes: Tensor) -> int:
    return (x.shape[2] - prototypes.shape[2] + 1) * (x.shape[3] - prototypes.shape[3] + 1)


@_nearest_prototypes_op.register_fake
def _(x: Tensor, prototypes: Tensor, metric: str, k: int, choice: str) -> tuple[Tensor, Tensor]:
    torch._check(x.dim() == 4 and prototypes.dim() == 4, lambda: "canonical 4-d inputs expected")
    shape = (x.shape[0], _windows(x, prototypes), k)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("protokern::nearest_prototypes_backward", mutates_args=())
def _nearest_prototypes_backward_op(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor, metric: str,
    choice: str, needs_x: bool, needs_prototypes: bool,
) -> tuple[Tensor, Tensor]:
    grad_x, grad_prototypes = run_kernel(
        "nearest_prototypes", "nearest_prototypes_backward", choice, x, prototypes,
        {"metric": metric, "k": indices.shape[-1]},
        grad_values, x, prototypes, indices, metric, needs_x, needs_prototypes)
    return _gradient_or_empty(grad_x, x), _gradient_or_empty(grad_prototypes, prototypes)


@_nearest_prototypes_backward_op.register_fake
def _(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor, metric: str,
    choice: str, needs_x: bool, needs_prototypes: bool,
) -> tuple[Tensor, Tensor]:
    return _fake_gradient(x, needs_x), _fake_gradient(prototypes, needs_prototypes)


@torch.library.custom_op("protokern::topk_distance", mutates_args=())
def _topk_distance_op(
    x: Tensor, prototypes: Tensor, metric: str, k: int, choice: str
) -> tuple[Tensor, Tensor]:
    values, indices = run_kernel("topk_distance", "topk_distance", choice, x, prototypes,
                                 {"metric": metric, "k": k}, x, prototypes, metric, k)
    return values.contiguous(), indices.contiguous()


@_topk_distance_op.register_fake
def _(x: Tensor, prototypes: Tensor, metric: str, k: int, choice: str) -> tuple[Tensor, Tensor]:
    torch._check(x.dim() == 4 and prototypes.dim() == 4, lambda: "canonical 4-d inputs expected")
    shape = (x.shape[0], prototypes.shape[0], k)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("protokern::topk_distance_backward", mutates_args=())
def _topk_distance_backward_op(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor, metric: str,
    choice: str, needs_x: bool, needs_prototypes: bool,
) -> tuple[Tensor, Tensor]:
    grad_x, grad_prototypes = run_kernel(
        "topk_distance", "topk_distance_backward", choice, x, prototypes,
        {"metric": metric, "k": indices.shape[-1]},
        grad_values, x, prototypes, indices, metric, needs_x, needs_prototypes)
    return _gradient_or_empty(grad_x, x), _gradient_or_empty(grad_prototypes, prototypes)


@torch.library.custom_op("protokern::mean_distance", mutates_args=())
def _mean_distance_op(x: Tensor, prototypes: Tensor, metric: str, choice: str) -> Tensor:
    return run_kernel("mean_distance", "mean_distance", choice, x, prototypes,
                      {"metric": metric}, x, prototypes, metric).contiguous()


@_mean_distance_op.register_fake
def _(x: Tensor, prototypes: Tensor, metric: str, choice: str) -> Tensor:
    torch._check(x.dim() == 4 and prototypes.dim() == 4, lambda: "canonical 4-d inputs expected")
    return x.new_empty((x.shape[0], prototypes.shape[0]))


@torch.library.custom_op("protokern::mean_distance_backward", mutates_args=())
def _mean_distance_backward_op(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, metric: str, choice: str,
    needs_x: bool, needs_prototypes: bool,
) -> tuple[Tensor, Tensor]:
    grad_x, grad_prototypes = run_kernel(
        "mean_distance", "mean_distance_backward", choice, x, prototypes, {"metric": metric},
        grad_values, x, prototypes, metric, needs_x, needs_prototypes)
    return _gradient_or_empty(grad_x, x), _gradient_or_empty(grad_prototypes, prototypes)


@_topk_distance_backward_op.register_fake
def _(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor, metric: str,
    choice: str, needs_x: bool, needs_prototypes: bool,
) -> tuple[Tensor, Tensor]:
    return _fake_gradient(x, needs_x), _fake_gradient(prototypes, needs_prototypes)


@_mean_distance_backward_op.register_fake
def _(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, metric: str, choice: str,
    needs_x: bool, needs_prototypes: bool,
) -> tuple[Tensor, Tensor]:
    return _fake_gradient(x, needs_x), _fake_gradient(prototypes, needs_prototypes)


# ----------------------------------------------------------------------------------------------
# Autograd


def _indices_carry_no_gradient(ctx, indices: Tensor) -> None:
    """The int64 indices output has no gradient: without this autograd hands the backward a
    zero tensor the indices' size for it, every step (82 MB at cil_vectors' (1024, 10000), a
    quarter of the op's backward on the 2-core host); the backward then gets None for it, and
    None for the values where nothing used them."""
    ctx.mark_non_differentiable(indices)
    ctx.set_materialize_grads(False)


def _save_for_min_distance(ctx, inputs: tuple, output: tuple) -> None:
    x, prototypes, ctx.metric, ctx.choice = inputs
    ctx.save_for_backward(x, prototypes, output[1])  # the chosen positions
    _indices_carry_no_gradient(ctx, output[1])


def _save_for_nearest_prototypes(ctx, inputs: tuple, output: tuple) -> None:
    x, prototypes, ctx.metric, _k, ctx.choice = inputs
    ctx.save_for_backward(x, prototypes, output[1])  # the chosen prototypes (or positions)
    _indices_carry_no_gradient(ctx, output[1])


def _save_for_distance_map(ctx, inputs: tuple, output: Tensor) -> None:
    x, prototypes, ctx.metric, ctx.choice = inputs
    ctx.save_for_backward(x, prototypes)


def _needed(ctx, grad_x: Tensor, grad_prototypes: Tensor) -> tuple[Tensor | None, ...]:
    """The gradients autograd asked for (the others were skipped: None), then None for every
    non-tensor input of the op."""
    needs_x, needs_prototypes = ctx.needs_input_grad[:2]
    options = (None,) * (len(ctx.needs_input_grad) - 2)
    return (grad_x if needs_x else None, grad_prototypes if needs_prototypes else None,
            *options)


def _no_gradients(ctx) -> tuple[None, ...]:
    return (None,) * len(ctx.needs_input_grad)


def _min_distance_grad(ctx, grad_values: Tensor | None, _grad_indices: None):
    if grad_values is None:
        return _no_gradients(ctx)
    x, prototypes, indices = ctx.saved_tensors
    needs_x, needs_prototypes = ctx.needs_input_grad[:2]
    grads = torch.ops.protokern.min_distance_backward(
        grad_values, x, prototypes, indices, ctx.metric, ctx.choice, needs_x, needs_prototypes)
    return _needed(ctx, *grads)


def _distance_map_grad(ctx, grad_map: Tensor):
    x, prototypes = ctx.saved_tensors
    needs_x, needs_prototypes = ctx.needs_input_grad[:2]
    grads = torch.ops.protokern.distance_map_backward(
        grad_map, x, prototypes, ctx.metric, ctx.choice, needs_x, needs_prototypes)
    return _needed(ctx, *grads)


def _topk_distance_grad(ctx, grad_values: Tensor | None, _grad_indices: None):
    if grad_values is None:
        return _no_gradients(ctx)
    x, prototypes, indices = ctx.saved_tensors
    needs_x, needs_prototypes = ctx.needs_input_grad[:2]
    grads = torch.ops.protokern.topk_distance_backward(
        grad_values, x, prototypes, indices, ctx.metric, ctx.choice, needs_x, needs_prototypes)
    return _needed(ctx, *grads)


def _mean_distance_grad(ctx, grad_values: Tensor):
    x, prototypes = ctx.saved_tensors
    needs_x, needs_prototypes = ctx.needs_input_grad[:2]
    grads = torch.ops.protokern.mean_distance_backward(
        grad_values, x, prototypes, ctx.metric, ctx.choice, needs_x, needs_prototypes)
    return _needed(ctx, *grads)


def _nearest_prototypes_grad(ctx, grad_values: Tensor | None, _grad_indices: None):
    if grad_values is None:
        return _no_gradients(ctx)
    x, prototypes, indices = ctx.saved_tensors
    needs_x, needs_prototypes = ctx.needs_input_grad[:2]
    grads = torch.ops.protokern.nearest_prototypes_backward(
        grad_values, x, prototypes, indices, ctx.metric, ctx.choice, needs_x, needs_prototypes)
    return _needed(ctx, *grads)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "protokern ops do not support double backward (second-order gradients through "
        "min_distance, distance_map, nearest_prototypes, topk_distance or mean_distance); "
        "call torch.autograd.grad/backward with create_graph=False."
    )


def _save_nothing(ctx, inputs: tuple, output) -> None:
    pass


_min_distance_op.register_autograd(_min_distance_grad, setup_context=_save_for_min_distance)
_distance_map_op.register_autograd(_distance_map_grad, setup_context=_save_for_distance_map)
_nearest_prototypes_op.register_autograd(_nearest_prototypes_grad,
                                         setup_context=_save_for_nearest_prototypes)
_topk_distance_op.register_autograd(_topk_distance_grad,
                                   setup_context=_save_for_nearest_prototypes)
_mean_distance_op.register_autograd(_mean_distance_grad, setup_context=_save_for_distance_map)
for _backward_op in (_min_distance_backward_op, _distance_map_backward_op,
                     _nearest_prototypes_backward_op, _topk_distance_backward_op,
                     _mean_distance_backward_op):
    _backward_op.register_autograd(_no_double_backward, setup_context=_save_nothing)


# ----------------------------------------------------------------------------------------------
# Public functions


@torch.compiler.assume_constant_result  # Dynamo cannot trace the ContextVar lookup
def _choice() -> str:
    return explicit_choice()


def call_op(op: str, x4: Tensor, p4: Tensor, metric: str, *options):
    """Custom op ``torch.ops.protokern.<op>`` on canonical inputs (then ``options``: ``k``
    where the op has one), with the user's backend choice. While `torch.export` traces
    (``torch.onnx.export(..., dynamo=True)`` too), the op's ATen formulation instead
    (`protokern.decompositions`): the exported program then holds no protokern op, and runs
    without protokern; eager and compiled code keep the fused kernels."""
    if torch.compiler.is_exporting():
        return DECOMPOSITIONS[op](x4, p4, metric, *options)
    return getattr(torch.ops.protokern, op)(x4, p4, metric, *options, _choice())


def autocast_inputs(x: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """Under `torch.autocast` for the inputs' device, both cast to the autocast dtype, as
    ``torch.matmul`` casts its inputs (float64 stays float64); otherwise unchanged."""
    if not (isinstance(x, Tensor) and isinstance(prototypes, Tensor)):
        return x, prototypes  # canonicalize names the culprit
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return x, prototypes
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: Tensor) -> Tensor:
        eligible = isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    return cast(x), cast(prototypes)


def kernel_metric(metric: str) -> str:
    """The metric the custom ops compute for a public ``metric``: euclidean is computed as the
    root of the sqeuclidean one (`euclidean`)."""
    return "sqeuclidean" if metric == "euclidean" else metric


def check_eps(eps: object, where: str) -> None:
    """Raise TypeError/ValueError unless ``eps`` is a finite float ``>= 0``."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{where}: eps must be a float, got {type(eps).__name__} {eps!r}")
    if not 0 <= eps < float("inf"):
        raise ValueError(f"{where}: eps must be finite and >= 0, got {eps!r}")


def euclidean(sqeuclidean: Tensor, eps: float) -> Tensor:
    """``sqrt(max(d, 0) + eps)`` of sqeuclidean distances ``d`` (any shape), computed in float32
    at least (a half ``eps = 1e-14`` would underflow) and returned in ``d``'s dtype;
    differentiable (``1 / (2 sqrt(d + eps))``, 0 where ``d < 0``)."""
    dtype = sqeuclidean.dtype
    wide = sqeuclidean.to(torch.promote_types(dtype, torch.float32))
    return wide.clamp_min(0).add(eps).sqrt().to(dtype)


def _finish(values: Tensor, metric: str, eps: float) -> Tensor:
    return euclidean(values, eps) if metric == "euclidean" else values


def _prepare(x: Tensor, prototypes: Tensor, metric: str, eps: float, where: str,
             vectors: bool = False) -> tuple[Tensor, Tensor, str]:
    """Autocast, validate (metric, eps, shapes) and canonicalize: `canonicalize`'s result."""
    x, prototypes = autocast_inputs(x, prototypes)
    check_eps(eps, where)
    return canonicalize(x, prototypes, metric, where, vectors)


_METRIC_DOC = """metric: ``"sqeuclidean"`` (``d = sum((patch - p)^2)``), ``"euclidean"``
            (``sqrt(max(d, 0) + eps)``, ProtoTree's), ``"cosine"``
            (``1 - <patch, p> / (max(|patch|, 1e-8) * max(|p|, 1e-8))``) or ``"dot"``
            (``-<patch, p>``: its minimum is the maximum similarity of a projection, TesNet's).
        eps: the ``"euclidean"`` metric's ``eps`` (default 1e-14, ProtoTree's); ignored by
            the others."""


def min_distance(x: Tensor, prototypes: Tensor, metric: str = "sqeuclidean", *,
                 eps: float = EUCLIDEAN_EPS) -> MinDistance:
    """Minimum over positions of the distance between every patch of ``x`` and every prototype.

    Args:
        x: ``(B, D, H, W)`` feature map (any strides, channels_last included) or ``(B, L, D)``
            tokens.
        prototypes: ``(M, D)``, ``(M, D, 1, 1)`` or ``(M, D, ph, pw)``; patches are the valid
            stride-1 windows of ``x`` (``H' = H - ph + 1``, ``W' = W - pw + 1``; tokens:
            ``ph = pw = 1``).
        METRIC

    Returns:
        `MinDistance` ``(values, indices)``, both ``(B, M)``: the minimum distance in the input
        dtype (recomputed exactly at the chosen position) and the int64 row-major flat index
        into ``H' x W'`` (or ``L``) of the first position attaining it. A NaN distance makes the
        value NaN and the index that of the first NaN position, as in `torch.min`.

    Gradients flow to ``x`` and ``prototypes`` through the selected position only; double
    backward raises RuntimeError. Computed in float32 for float16/bfloat16 inputs.
    """
    x4, p4, _ = _prepare(x, prototypes, metric, eps, "protokern.min_distance")
    values, indices = call_op("min_distance", x4, p4, kernel_metric(metric))
    return MinDistance(_finish(values, metric, eps), indices)


def distance_map(x: Tensor, prototypes: Tensor, metric: str = "sqeuclidean", *,
                 eps: float = EUCLIDEAN_EPS) -> Tensor:
    """Every patch-to-prototype distance (for explanations and similarity maps).

    Takes the inputs of `min_distance` and returns ``(B, M, H', W')`` for a feature map or
    ``(B, M, L)`` for tokens, in the input dtype. Differentiable once (double backward raises
    RuntimeError).

    The ``"euclidean"`` map is computed in float64 whatever the input dtype (twice the
    memory), so that its gradient stays accurate next to a zero distance.

    Off the minimum, the map is the GEMM expansion (float32 error about
    ``eps32 * (|patch|^2 + |p|^2)``); at each (image, prototype)'s minimum (its first
    position) it holds the exact distance, recomputed directly in float64 and rounded once:
    `min_distance`'s value there to its rounding (bit for bit on the ``reference``; the fused
    kernels sum a trusted pair in the working precision), and 0 at a pushed patch, where the
    expansion alone gives ~1e-5.
    """
    x4, p4, layout = _prepare(x, prototypes, metric, eps, "protokern.distance_map")
    if metric == "euclidean":
        dmap = _euclidean_map(x4, p4, eps).to(x4.dtype)
    else:
        dmap = call_op("distance_map", x4, p4, metric)
    return dmap.flatten(2) if layout == "tokens" else dmap


def _euclidean_map(x4: Tensor, p4: Tensor, eps: float) -> Tensor:
    """The euclidean map ``(B, M, H', W')`` of canonical inputs, in float64: the root's gradient
    ``1 / (2 sqrt(d + eps))`` reaches 5e6 at a pushed patch (``d = 0``, ``eps = 1e-14``), and
    the map's backward, a GEMM expansion, would lose the other positions' gradients to that
    weight's float32 rounding."""
    wide = call_op("distance_map", x4.double(), p4.double(), "sqeuclidean")
    return euclidean(wide, eps)


def nearest_prototypes(x: Tensor, prototypes: Tensor, k: int = 1,
                       metric: str = "sqeuclidean", *,
                       eps: float = EUCLIDEAN_EPS) -> NearestPrototypes:
    """The ``k`` nearest prototypes of every patch, token or vector of ``x``, without ever
    holding the ``(N, M)`` distance matrix (the second reduction: over prototypes).

    Args:
        x: ``(B, D, H, W)`` feature map (any strides, channels_last included), ``(B, L, D)``
            tokens or ``(N, D)`` vectors.
        prototypes: ``(M, D)``, ``(M, D, 1, 1)`` or ``(M, D, ph, pw)``; patches are the valid
            stride-1 windows of a map, as in `min_distance`.
        k: how many, ``1 <= k <= M``.
        METRIC

    Returns:
        `NearestPrototypes` ``(values, indices)``: ``(B, H', W', k)`` for a map, ``(B, L, k)``
        for tokens, ``(N, k)`` for vectors. Values ascend and are the exact distance at each
        returned pair, in the input dtype; indices are int64, ties going to the lowest
        prototype index. A NaN distance comes first (it is the minimum, as in `torch.min`), so
        a NaN in a patch makes all its values NaN.

    Gradients flow to ``x`` and ``prototypes`` through the chosen pairs; double backward
    raises RuntimeError.
    """
    where = "protokern.nearest_prototypes"
    x4, p4, layout = _prepare(x, prototypes, metric, eps, where, vectors=True)
    check_k(k, p4.shape[0], f"the number of prototypes M={p4.shape[0]} (prototypes "
            f"{_shape(prototypes)})", where)
    values, indices = call_op("nearest_prototypes", x4, p4, kernel_metric(metric), k)
    values = _finish(values, metric, eps)
    if layout == "vectors":
        shape = (x4.shape[0], k)
    elif layout == "tokens":
        shape = (x4.shape[0], x4.shape[2], k)
    else:
        shape = (x4.shape[0], x4.shape[2] - p4.shape[2] + 1, x4.shape[3] - p4.shape[3] + 1, k)
    return NearestPrototypes(values.view(shape), indices.view(shape))


def topk_distance(x: Tensor, prototypes: Tensor, k: int, metric: str = "sqeuclidean", *,
                  eps: float = EUCLIDEAN_EPS) -> TopkDistance:
    """The ``k`` smallest distances over positions of every (image, prototype), without a
    distance map (Deformable ProtoPNet's top-k pooling, without its offsets).

    Args:
        x, prototypes: as in `min_distance`.
        k: how many positions, ``1 <= k <= H' * W'`` (tokens: ``L``); a larger ``k`` is a
            ValueError.
        METRIC

    Returns:
        `TopkDistance` ``(values, indices)``, both ``(B, M, k)``: the exact distances in the
        input dtype, ascending over positions, and the int64 flat row-major indices of their
        positions, ties going to the lowest position; a NaN distance comes first. ``k = 1``
        equals `min_distance` (values and indices, unsqueezed).

    Gradients flow to ``x`` and ``prototypes`` through the chosen positions; double backward
    raises RuntimeError.
    """
    where = "protokern.topk_distance"
    x4, p4, layout = _prepare(x, prototypes, metric, eps, where)
    positions = _windows(x4, p4)
    what = (f"the number of tokens L={positions}" if layout == "tokens" else
            f"the number of positions H'*W'={positions} (x {_shape(x)}, prototypes "
            f"{_shape(prototypes)})")
    check_k(k, positions, what, where)
    values, indices = call_op("topk_distance", x4, p4, kernel_metric(metric), k)
    return TopkDistance(_finish(values, metric, eps), indices)


def mean_distance(x: Tensor, prototypes: Tensor, metric: str = "sqeuclidean", *,
                  eps: float = EUCLIDEAN_EPS) -> Tensor:
    """Mean over positions of the distance of every (image, prototype), ``(B, M)`` in the
    input dtype (ProtoPool's focal similarity ``sim(min) - sim(mean)``, ICICLE's with ``--focal``).

    Args:
        x, prototypes: as in `min_distance`.
        METRIC

    ``"sqeuclidean"``, ``"dot"`` and ``"cosine"`` are closed forms with no distance map and no
    GEMM over positions (``mean|x|^2 - 2 p.mean(x) + |p|^2``, taken about the mean patch so
    that it stays accurate far from the origin; see `protokern.backends.reference.mean_distance`).
    ``"euclidean"`` has none (the mean of roots is not a root of means): it averages the
    ``(B, M, H', W')`` euclidean `distance_map`, which it holds (in float64, see
    `distance_map`). Differentiable once.
    """
    where = "protokern.mean_distance"
    x4, p4, _ = _prepare(x, prototypes, metric, eps, where)
    if metric == "euclidean":
        return _euclidean_map(x4, p4, eps).flatten(2).mean(-1).to(x4.dtype)
    return call_op("mean_distance", x4, p4, metric)


for _function in (min_distance, distance_map, nearest_prototypes, topk_distance,
                  mean_distance):
    _function.__doc__ = _function.__doc__.replace("METRIC", _METRIC_DOC)
