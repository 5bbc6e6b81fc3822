"""The backend registry: which implementation runs protokern's ops for a given tensor.

A backend is a set of functions over the canonical forms of `protokern.reference`
(``x`` ``(B, D, H, W)``, ``prototypes`` ``(M, D, ph, pw)``). Kernel packages register one with
`register_backend`; the public functions in `protokern.ops` call `select_backend` on every
call, so a backend added later needs no change to any caller.

Choice, strongest first: `use_backend` (for the current thread or asyncio task), then
`set_backend` (process-wide), then the ``PROTOKERN_BACKEND`` environment variable, then the
available backend of highest priority that runs on the tensors' device type (CUDA: ``cuda`` >
``triton``; CPU: ``cpu`` > ``reference``). The backward pass runs on the backend its forward
pass ran on, whichever thread PyTorch runs it on.
"""

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

from protokern import reference

ENV_VAR = "PROTOKERN_BACKEND"


@dataclass(frozen=True)
class Backend:
    """One implementation of the ops.

    Attributes:
        name: the name users select it by.
        min_distance: ``(x, prototypes, metric) -> (values (B, M), indices (B, M) int64)``.
        min_distance_backward: ``(grad_values, x, prototypes, indices, metric)
            -> (grad_x, grad_prototypes)``.
        distance_map: ``(x, prototypes, metric) -> (B, M, H', W')``.
        distance_map_backward: ``(grad_map, x, prototypes, metric)
            -> (grad_x, grad_prototypes)``; by default the reference's GEMM formula, which
            runs on any device.
        device_types: device types it runs on (``{"cpu"}``, ``{"cuda"}``); None for any.
        priority: among available backends for a device type, the highest is the default.
        unavailable_reason: returns why it cannot run in this install, or None if it can.
    """

    name: str
    min_distance: Callable[[Tensor, Tensor, str], tuple[Tensor, Tensor]]
    min_distance_backward: Callable[[Tensor, Tensor, Tensor, Tensor, str], tuple[Tensor, Tensor]]
    distance_map: Callable[[Tensor, Tensor, str], Tensor]
    distance_map_backward: Callable[[Tensor, Tensor, Tensor, str], tuple[Tensor, Tensor]] = (
        reference.distance_map_backward
    )
    device_types: frozenset[str] | None = None
    priority: int = 0
    unavailable_reason: Callable[[], str | None] = lambda: None

    def runs_on(self, device_type: str) -> bool:
        return self.device_types is None or device_type in self.device_types


def native_ops_error(namespace: str, op: str, built_where: str) -> str | None:
    """Why ``torch.ops.<namespace>.<op>`` from the extension ``protokern._C`` cannot be used in
    this install, or None. ``built_where`` says where the install builds those kernels."""
    try:
        import protokern._C  # noqa: F401  (loading the library registers its torch ops)
    except ImportError as error:
        return (f"the native extension protokern._C is not built ({error}); reinstall with "
                f"`pip install --no-build-isolation -e .` {built_where}")
    if not hasattr(getattr(torch.ops, namespace), op):
        return f"protokern._C was built without these kernels (they build {built_where})"
    return None


_registry: dict[str, Backend] = {}
_process_choice: str | None = None
_UNSET = object()
_scoped_choice: ContextVar = ContextVar("protokern_backend", default=_UNSET)


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    _registry[backend.name] = backend


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Names of the backends this install can run, highest priority first.

    With ``device`` (``"cpu"``, ``"cuda"``, a `torch.device`), only those that run on it.
    """
    device_type = None if device is None else torch.device(device).type
    return [
        b.name
        for b in sorted(_registry.values(), key=lambda b: -b.priority)
        if b.unavailable_reason() is None and (device_type is None or b.runs_on(device_type))
    ]


def backend_named(name: str, source: str = "protokern") -> Backend:
    """The registered, available backend ``name``; ``source`` says who asked, in errors.

    Raises ValueError for an unknown name and RuntimeError for one this install cannot run.
    """
    if name not in _registry:
        known = ", ".join(sorted(_registry)) or "none"
        raise ValueError(f"{source}: unknown protokern backend {name!r}; known backends: {known}")
    reason = _registry[name].unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"{source}: protokern backend {name!r} is not available: {reason}")
    return _registry[name]


def set_backend(name: str | None) -> None:
    """Run every op on backend ``name`` from now on, in every thread; None: automatic choice.

    A `use_backend` block still takes precedence inside it. Raises ValueError for an unknown
    name and RuntimeError for one this install cannot run.
    """
    global _process_choice
    if name is not None:
        backend_named(name, "set_backend")
    _process_choice = name


def get_backend() -> str | None:
    """The backend chosen for this thread by `use_backend`/`set_backend`; None if automatic."""
    scoped = _scoped_choice.get()
    return _process_choice if scoped is _UNSET else scoped


@contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name``.

    Applies to the current thread (or asyncio task) only, so concurrent blocks in other
    threads do not interfere; threads started inside the block (thread pools included) do not
    see it, and a generator that yields inside the block leaks it to its caller until resumed.
    ``use_backend(None)`` restores the automatic choice inside the block, ignoring
    `set_backend` but not ``PROTOKERN_BACKEND``.
    """
    if name is not None:
        backend_named(name, "use_backend")
    token = _scoped_choice.set(name)
    try:
        yield
    finally:
        _scoped_choice.reset(token)


def select_backend(device: torch.device) -> Backend:
    """The backend that runs an op whose inputs live on ``device``."""
    chosen = get_backend()
    if chosen is not None:
        source = f"backend {chosen!r} chosen by use_backend/set_backend"
        backend = backend_named(chosen, source)
    elif os.environ.get(ENV_VAR):
        source = f"{ENV_VAR}={os.environ[ENV_VAR]}"
        backend = backend_named(os.environ[ENV_VAR], source)
    else:
        for name in available_backends(device):
            return _registry[name]
        raise RuntimeError(f"no protokern backend runs on {device.type} tensors")
    if not backend.runs_on(device.type):
        runs_on = ", ".join(sorted(backend.device_types or ()))
        raise RuntimeError(
            f"{source}: backend {backend.name!r} runs on {runs_on} tensors, "
            f"but the inputs are on {device.type}"
        )
    return backend


register_backend(
    Backend(
        name="reference",
        min_distance=reference.min_distance,
        min_distance_backward=reference.min_distance_backward,
        distance_map=reference.distance_map,
    )
)
