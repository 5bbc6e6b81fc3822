"""The cases the tests share (DESIGN.md §5): metrics, dtypes, shapes, layouts and tolerances,
and the backends the contract tests run on, each with the device of its tensors.

One copy of each here; a test module keeps its own shapes only where they aim at one kernel's
blocks or tiles (and says so). Tensors are made on the default device, which the ``backend``
fixture (tests/conftest.py) sets to CUDA for the backends it runs on CUDA tensors.
"""

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch

import protokern as pk
from protokern import env
from protokern.testing import TF32_TOLERANCE, TOLERANCE  # noqa: F401  (the tolerances, here too)

# ----------------------------------------------------------------------------------------------
# Metrics, dtypes, tolerances (TOLERANCE and TF32_TOLERANCE: protokern.testing, DESIGN §5)

METRICS = ("sqeuclidean", "cosine")
"""Every metric of DESIGN §2; tests/brute_force.py computes exactly these (test_ops checks that
the ops accept no other)."""

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
"""Every input dtype of DESIGN §2."""

FULL_PRECISION = (torch.float32, torch.float64)
"""The dtypes whose indices must be exact where the winner is clear (helpers.py)."""

HALF_PRECISION = (torch.float16, torch.bfloat16)

# ----------------------------------------------------------------------------------------------
# Shapes

SHAPES = {
    # name -> (x shape, prototypes shape); a 3-d x is (B, L, D) tokens
    "map-MD": ((2, 5, 4, 6), (7, 5)),
    "map-MD11": ((2, 5, 4, 6), (7, 5, 1, 1)),
    "patch2x3-M37": ((3, 4, 5, 6), (37, 4, 2, 3)),
    "M1": ((2, 6, 3, 3), (1, 6)),
    "M37-D3": ((2, 3, 5, 5), (37, 3)),
    "D300-patch2x2": ((2, 300, 3, 4), (11, 300, 2, 2)),
    "L1-map": ((3, 8, 1, 1), (5, 8)),
    "L1-window-fills-map": ((2, 3, 2, 3), (4, 3, 2, 3)),
    "tokens": ((3, 9, 16), (10, 16)),
    "tokens-L1": ((2, 1, 8), (6, 8, 1, 1)),
}
"""The contract's shapes: maps and tokens, ``(M, D)``, ``(M, D, 1, 1)`` and windowed prototypes,
``M = 1`` and ``M`` not a multiple of any block, ``L = 1``, large ``D``."""

GRADCHECK_SHAPES = {
    # small enough for finite differences: (x shape, prototypes shape)
    "patch2x3": ((2, 3, 4, 5), (4, 3, 2, 3)),
    "tokens": ((2, 5, 4), (3, 4)),
    "L1-map": ((2, 4, 1, 1), (3, 4, 1, 1)),
}


def random_inputs(x_shape: tuple, p_shape: tuple, dtype: torch.dtype = torch.float32,
                  requires_grad: bool = False, device: str | torch.device | None = None):
    """``(x, prototypes)``: standard normal, on ``device`` (default: the default device)."""
    x = torch.randn(x_shape, dtype=dtype, device=device, requires_grad=requires_grad)
    p = torch.randn(p_shape, dtype=dtype, device=device, requires_grad=requires_grad)
    return x, p


def make(case: str, dtype: torch.dtype = torch.float32, requires_grad: bool = False,
         device: str | torch.device | None = None):
    """`random_inputs` of the shapes ``SHAPES[case]``."""
    return random_inputs(*SHAPES[case], dtype, requires_grad, device)


# ----------------------------------------------------------------------------------------------
# Layouts: the same values under other strides

MAP_LAYOUTS = ("contiguous", "channels_last", "permuted", "sliced", "expanded")
TOKEN_LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")
PROTOTYPE_LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


def map_layout(data: torch.Tensor, layout: str) -> torch.Tensor:
    """``data`` (B, D, H, W) in another memory layout (same values, except ``expanded``: every
    image is the first, with batch stride 0)."""
    b, d, h, w = data.shape
    if layout == "channels_last":
        return data.contiguous(memory_format=torch.channels_last)
    if layout == "permuted":
        return data.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)
    if layout == "sliced":  # every other channel and column, off the first image and row
        big = torch.zeros(b + 1, 2 * d, h + 2, 2 * w, dtype=data.dtype, device=data.device)
        big[1:, ::2, 1:h + 1, ::2] = data
        return big[1:, ::2, 1:h + 1, ::2]
    if layout == "expanded":
        return data[:1].expand(b, d, h, w)
    assert layout == "contiguous", layout
    return data.contiguous()


def token_layout(data: torch.Tensor, layout: str) -> torch.Tensor:
    """``data`` (B, L, D) in another layout (``expanded``: every token is the first, stride 0:
    all positions tie)."""
    b, length, d = data.shape
    if layout == "transposed":
        return data.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":
        big = torch.zeros(b, 2 * length, d + 3, dtype=data.dtype, device=data.device)
        big[:, ::2, 2:d + 2] = data
        return big[:, ::2, 2:d + 2]
    if layout == "expanded":
        return data[:, :1].expand(b, length, d)
    assert layout == "contiguous", layout
    return data.contiguous()


def prototype_layout(data: torch.Tensor, layout: str) -> torch.Tensor:
    """``data`` (M, ...) in another layout (``expanded``: every prototype is the first)."""
    if layout == "transposed":
        order = list(range(data.dim()))[::-1]
        return data.permute(order).contiguous().permute(order)
    if layout == "sliced":
        big = torch.zeros(2 * data.shape[0], *data.shape[1:], dtype=data.dtype,
                          device=data.device)
        big[::2] = data
        return big[::2]
    if layout == "expanded":
        return data[:1].expand(data.shape)
    assert layout == "contiguous", layout
    return data.contiguous()


# ----------------------------------------------------------------------------------------------
# Backends and devices

BIG = env.flag("PROTOKERN_BIG_TESTS")
big = pytest.mark.skipif(not BIG, reason="needs PROTOKERN_BIG_TESTS=1 (minutes or gigabytes)")


def backend_params(devices: tuple[str, ...] = ("cpu", "cuda"),
                   where: Callable[[str, str], bool] = lambda name, device: True) -> list:
    """pytest params ``(backend, device)``: every backend this install runs on CPU tensors
    (triton there only in its interpreter), then, where CUDA is present, every backend it runs
    on CUDA tensors, marked ``cuda``; only ``devices``, and only pairs for which ``where``
    holds. Ids: the backend's name for CPU tensors (``cpu``), ``name@cuda`` for CUDA tensors."""
    params = []
    if "cpu" in devices:
        params += [pytest.param((name, "cpu"), id=name)
                   for name in pk.available_backends("cpu") if where(name, "cpu")]
    if "cuda" in devices and torch.cuda.is_available():
        params += [pytest.param((name, "cuda"), id=f"{name}@cuda", marks=pytest.mark.cuda)
                   for name in pk.available_backends("cuda") if where(name, "cuda")]
    return params


def interpreted(name: str) -> bool:
    """Whether backend ``name`` runs its kernels in Triton's interpreter (slow: such runs take
    smaller shapes or fewer calls)."""
    return name == "triton" and env.flag("TRITON_INTERPRET")


@contextlib.contextmanager
def default_device(device: str | torch.device) -> Iterator[None]:
    """Make tensors on ``device`` when a factory is given none (`torch.set_default_device`;
    per thread). CPU, the default, changes nothing."""
    if torch.device(device).type == "cpu":
        yield
        return
    was = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(None if was.type == "cpu" else was)
