"""Tolerances and comparisons of DESIGN.md §5, for the test suite and `protokern demo`."""

import torch
from torch import Tensor

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
"""Relative error allowed against a float64 oracle (float64 itself: rounding noise only)."""

TF32_TOLERANCE = 3e-3
"""Relative error allowed for float32 where TF32 tensor cores may run the GEMM."""


def relative_error(out: Tensor, ref: Tensor) -> float:
    """``max |out - ref| / max |ref|``: norm-wise, so entries near zero do not explode."""
    out, ref = out.double(), ref.double()
    if ref.numel() == 0:
        return 0.0
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def near_tie_ok(indices: Tensor, distances: Tensor, tol: float) -> Tensor:
    """Which chosen positions are acceptable, ``(B, M)`` bool: those whose true distance is
    within ``tol * max(max |min|, 1)`` of the true minimum (DESIGN §5: near-ties may move).

    ``indices`` ``(B, M)`` from a backend, ``distances`` ``(B, M, L')`` from an oracle.
    """
    minimum = distances.amin(-1)
    chosen = distances.gather(-1, indices[..., None])[..., 0]
    return chosen - minimum <= tol * minimum.abs().max().clamp_min(1.0)
