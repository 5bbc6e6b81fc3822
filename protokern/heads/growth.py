"""Shared plumbing of the growing heads: input checks and state_dict loading across growth."""

from collections.abc import Callable

import torch
from torch import Tensor, nn


def shape_of(t: object) -> str:
    """``(a, b, c)`` for a tensor, its type name otherwise (for error messages)."""
    if isinstance(t, Tensor):
        return "(" + ", ".join(str(s) for s in t.shape) + ")"
    return type(t).__name__


def check_features_labels(features: Tensor, labels: Tensor, dim: int, num_classes: int,
                          where: str) -> None:
    """Raise TypeError/ValueError unless ``features`` is ``(N, dim)`` float and ``labels`` is
    ``(N,)`` integer with every label in ``[0, num_classes)``."""
    check_features(features, dim, where)
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dim() != 1:
        raise TypeError(f"{where}: labels must be a (N,) integer tensor, got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)} {shape_of(labels)}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"{where}: features {shape_of(features)} and labels "
                         f"{shape_of(labels)} disagree on N")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where}: labels must lie in [0, {num_classes}) (the head has "
                         f"{num_classes} classes; call add_classes first), got labels in "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def check_features(features: Tensor, dim: int, where: str) -> None:
    """Raise TypeError/ValueError unless ``features`` is a floating ``(N, dim)`` tensor."""
    if not isinstance(features, Tensor) or not features.dtype.is_floating_point:
        raise TypeError(f"{where}: features must be a floating-point tensor, got "
                        f"{getattr(features, 'dtype', type(features).__name__)}")
    if features.dim() != 2 or features.shape[1] != dim:
        raise ValueError(f"{where}: features must be (N, {dim}), got {shape_of(features)}")


def check_count(value: object, name: str, where: str, low: int = 0) -> int:
    """``value`` as an int ``>= low``, else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where}: {name} must be an int >= {low}, got {value!r}")
    return value


def resize_buffers_for_load(module: nn.Module, state_dict: dict, prefix: str,
                            trailing: dict[str, tuple[int, ...]], where: str) -> None:
    """Give ``module``'s buffers the leading size of the incoming ones before loading.

    A head that grew (more classes, more stored samples) saves larger buffers; loading them
    into a head of another size must resize, not fail on a shape mismatch. Only the leading
    (growing) axis may differ: ``trailing[name]`` is the shape after it that must match (the
    feature dimension), else ValueError names the buffer and both shapes.
    """
    for name, tail in trailing.items():
        key = prefix + name
        if key not in state_dict:
            continue
        incoming, own = state_dict[key], module._buffers[name]
        if tuple(incoming.shape[1:]) != tail:
            raise ValueError(f"{where}: cannot load {key} of shape {shape_of(incoming)} into a "
                             f"head whose {name} is {shape_of(own)}: shapes after the first "
                             f"axis must be {tail}")
        if incoming.shape != own.shape:
            module._buffers[name] = torch.empty(incoming.shape, dtype=own.dtype,
                                                device=own.device)


def apply_keeping_dtypes(module: nn.Module, fn: Callable[[Tensor], Tensor], recurse: bool,
                         keep: tuple[str, ...]) -> None:
    """Run ``nn.Module._apply(fn)`` on ``module`` but keep the dtype of the buffers named in
    ``keep`` (they follow ``fn`` to its device only).

    For `.float()`, `.half()`, `.to(dtype)` on a model holding a head: the head's exact
    statistics must stay float64 (a float32 running sum is neither exact nor what `update`
    adds in). A buffer whose dtype ``fn`` changed is replaced by its value from *before* the
    call moved to the new device, so the cast loses nothing (casting float32 back to float64
    would keep the rounding); a buffer whose dtype ``fn`` kept (a device move,
    `share_memory`, `to_empty`) keeps what ``fn`` made of it.
    """
    before = {name: module._buffers[name] for name in keep if module._buffers.get(name)
              is not None}
    nn.Module._apply(module, fn, recurse)
    for name, old in before.items():
        new = module._buffers[name]
        if new is not None and new.dtype != old.dtype:
            module._buffers[name] = old.to(device=new.device, dtype=old.dtype)
