"""protokern's backends: one implementation of the ops each, behind one registry.

- `registry`: `Backend` (kernels per op, and what each call needs: `Backend.supports`), the
  choice (`use_backend`, `set_backend`, ``PROTOKERN_BACKEND``, automatic) and `recording`;
- `reference`: plain PyTorch, unfused, float64-capable; the oracle of every test;
- `cpu`: the fused C++ kernels of ``csrc/cpu/`` for CPU tensors;
- `cuda`: the fused CUDA C++ kernels of ``csrc/cuda/`` for CUDA tensors;
- `triton`: the fused Triton kernels for CUDA tensors (CPU tensors in Triton's interpreter).

Importing this package registers every backend; each is available only where it can run.
"""

# Importing a backend module registers it; the order does not matter (the choice goes by
# priority).
from protokern.backends import cpu, cuda, reference, triton  # noqa: F401
from protokern.backends.registry import (
    Backend,
    available_backends,
    backend_named,
    explicit_choice,
    get_backend,
    record_call,
    recording,
    register_backend,
    registered_backend,
    resolve,
    set_backend,
    use_backend,
)

__all__ = [
    "Backend",
    "available_backends",
    "backend_named",
    "explicit_choice",
    "get_backend",
    "record_call",
    "recording",
    "register_backend",
    "registered_backend",
    "reference",
    "resolve",
    "set_backend",
    "use_backend",
]
