"""The backend registry: which implementation runs each call of protokern's ops.

A `Backend` is a set of kernels over the canonical forms of `protokern.backends.reference`
(``x`` ``(B, D, H, W)``, ``prototypes`` ``(M, D, ph, pw)``), keyed by op name (``"min_distance"``
and its ``"min_distance_backward"``, ``"distance_map"`` ...), and says per call whether it can
run it: `Backend.supports` returns the reason it cannot, or None. Kernel packages register one
with `register_backend`; the ops in `protokern.ops` resolve a backend on every call
(`resolve`), so a backend or an op added later needs no change here.

Choice, strongest first: `use_backend` (for the current thread or asyncio task), then
`set_backend` (process-wide), then the ``PROTOKERN_BACKEND`` environment variable. An explicit
choice that cannot run a call raises ValueError naming the backend and its reason: a call never
moves silently to another backend. Without a choice, the first backend in priority order whose
`Backend.supports` accepts the call runs it (CUDA: ``cuda`` > ``triton`` > ``reference``; CPU:
``cpu`` > ``reference``). The backward pass resolves the same backend as its forward pass (the
same inputs and choice), whichever thread PyTorch runs it on.

`recording` collects which backend ran each call, for the benchmarks, ``protokern selfcheck``
and the tests.
"""

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from protokern import env

Kernel = Callable[..., Any]
"""A backend's implementation of one op (or of its backward), on canonical inputs."""

Rule = Callable[..., str | None]
"""``rule(x, prototypes, **options)``: why a backend cannot run an op on these inputs, or None."""


@dataclass(frozen=True)
class Backend:
    """One implementation of protokern's ops.

    Attributes:
        name: the name users select it by.
        kernels: op name -> kernel. An op ``op`` needs ``kernels[op]`` (the forward, e.g.
            ``min_distance(x, prototypes, metric) -> (values, indices)``) and
            ``kernels[op + "_backward"]`` (``(grad, x, prototypes, ..., needs_x,
            needs_prototypes) -> (grad_x or None, grad_prototypes or None)``); see
            `protokern.backends.reference` for every signature.
        rules: op name -> `Rule`, the per-call conditions beyond having the kernel (dtypes,
            window sizes, options such as ``k``).
        device_types: device types it runs on (``{"cpu"}``, ``{"cuda"}``); None for any.
        priority: the automatic choice tries backends in decreasing priority.
        unavailable_reason: why it cannot run in this install (not built, no GPU), or None.
    """

    name: str
    kernels: Mapping[str, Kernel]
    rules: Mapping[str, Rule] = field(default_factory=dict)
    device_types: frozenset[str] | None = None
    priority: int = 0
    unavailable_reason: Callable[[], str | None] = lambda: None

    def runs_on(self, device_type: str) -> bool:
        return self.device_types is None or device_type in self.device_types

    def supports(self, op: str, x: Tensor, prototypes: Tensor, **options: Any) -> str | None:
        """Why this backend cannot run ``op`` on ``x`` and ``prototypes`` (canonical forms) with
        ``options`` (``metric=...``, ``k=...``), or None when it can."""
        reason = self.unavailable_reason()
        if reason is not None:
            return f"it is not available in this install: {reason}"
        if not self.runs_on(x.device.type):
            runs_on = ", ".join(sorted(self.device_types or ()))
            return f"it runs on {runs_on} tensors, but the inputs are on {x.device.type}"
        if op not in self.kernels or f"{op}_backward" not in self.kernels:
            return f"it has no {op} kernel"
        rule = self.rules.get(op)
        return None if rule is None else rule(x, prototypes, **options)

    def kernel(self, name: str) -> Kernel:
        """The kernel ``name`` (an op or ``<op>_backward``)."""
        return self.kernels[name]


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


def registered_backend(name: str) -> Backend:
    """The backend registered as ``name``, available or not (KeyError if none)."""
    return _registry[name]


def _by_priority() -> list[Backend]:
    return sorted(_registry.values(), key=lambda b: -b.priority)


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Names of the backends this install can run, highest priority first.

    With ``device`` (``"cpu"``, ``"cuda"``, a `torch.device`), only those that run on it.
    """
    device_type = None if device is None else torch.device(device).type
    return [
        b.name
        for b in _by_priority()
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
    threads do not interfere. Threads started inside the block, thread pools and
    ``torch.nn.DataParallel``'s replica threads included, do not see it: they get `set_backend`'s
    choice, then ``PROTOKERN_BACKEND``'s, then the automatic one. A generator that yields inside
    the block leaks it to its caller until resumed. ``use_backend(None)`` restores the
    automatic choice inside the block, ignoring `set_backend` but not ``PROTOKERN_BACKEND``.
    """
    if name is not None:
        backend_named(name, "use_backend")
    token = _scoped_choice.set(name)
    try:
        yield
    finally:
        _scoped_choice.reset(token)


def explicit_choice() -> str:
    """The backend this thread's calls must run on (`use_backend`, `set_backend`, then
    ``PROTOKERN_BACKEND``), or ``""`` for the automatic choice."""
    return get_backend() or env.backend() or ""


def _describe(x: Tensor, prototypes: Tensor) -> str:
    return (f"x {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} on {x.device.type}, "
            f"prototypes {tuple(prototypes.shape)}")


def resolve(op: str, choice: str, x: Tensor, prototypes: Tensor, **options: Any) -> Backend:
    """The backend that runs ``op`` on these canonical inputs: ``choice`` (a backend name; ``""``
    for automatic) if it supports the call, else ValueError with its reason; automatically the
    first backend in priority order that supports the call."""
    if choice:
        backend = backend_named(choice, f"protokern.{op}")
        reason = backend.supports(op, x, prototypes, **options)
        if reason is not None:
            raise ValueError(
                f"protokern.{op}: the chosen backend {choice!r} cannot run this call "
                f"({_describe(x, prototypes)}): {reason}. Choose another with "
                f"pk.use_backend(...), or none for the automatic choice")
        return backend
    reasons = []
    for backend in _by_priority():
        reason = backend.supports(op, x, prototypes, **options)
        if reason is None:
            return backend
        if backend.unavailable_reason() is None and backend.runs_on(x.device.type):
            reasons.append(f"{backend.name}: {reason}")
    raise ValueError(f"protokern.{op}: no protokern backend runs this call "
                     f"({_describe(x, prototypes)}): " + ("; ".join(reasons) or "none runs on "
                                                          f"{x.device.type} tensors"))


_recorders: list[list[tuple[str, str]]] = []
_recorders_lock = threading.Lock()


def record_call(op: str, backend: str) -> None:
    """Note that ``backend`` ran ``op`` (a kernel name) for every active `recording`."""
    if _recorders:
        with _recorders_lock:
            for calls in _recorders:
                calls.append((op, backend))


@contextmanager
def recording() -> Iterator[list[tuple[str, str]]]:
    """Collect ``(kernel, backend)`` for every kernel protokern runs inside the block, in any
    thread (autograd's backward threads included): which backend actually ran each call."""
    calls: list[tuple[str, str]] = []
    with _recorders_lock:
        _recorders.append(calls)
    try:
        yield calls
    finally:
        with _recorders_lock:
            # by identity: list.remove compares by value, so a nested recording (both empty,
            # or equal) would take out the outer one's list
            del _recorders[next(i for i, r in enumerate(_recorders) if r is calls)]
