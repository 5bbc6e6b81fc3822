"""An independent float64 brute force of protokern's contract (DESIGN.md §2), for the tests.

No GEMM expansion and no unfold: every window offset is compared directly, so it shares no
code path or rounding behaviour with `protokern.backends.reference`. Differentiable, for
gradient tests.
"""

import torch
from torch import Tensor

EPS = 1e-8


def as_map(x: Tensor) -> Tensor:
    """(B, L, D) tokens become a (B, D, L, 1) map; maps pass through."""
    return x.permute(0, 2, 1)[..., None] if x.dim() == 3 else x


def as_window(prototypes: Tensor) -> Tensor:
    return prototypes[:, :, None, None] if prototypes.dim() == 2 else prototypes


def distances(x: Tensor, prototypes: Tensor, metric: str, eps: float = 1e-14) -> Tensor:
    """All distances (B, M, L') in float64, L' row-major over the valid windows (``eps``: the
    euclidean metric's, ``sqrt(max(d, 0) + eps)``)."""
    x, p = as_map(x).double(), as_window(prototypes).double()
    _, _, height, width = x.shape
    _, _, ph, pw = p.shape
    out_h, out_w = height - ph + 1, width - pw + 1
    dot = sq_diff = x_sq = p_sq = 0
    for i in range(ph):
        for j in range(pw):
            xs = x[:, None, :, i:i + out_h, j:j + out_w]  # (B, 1, D, H', W')
            ps = p[None, :, :, i, j, None, None]  # (1, M, D, 1, 1)
            sq_diff = sq_diff + ((xs - ps) ** 2).sum(2)
            dot = dot + (xs * ps).sum(2)
            x_sq = x_sq + (xs ** 2).sum(2)
            p_sq = p_sq + (ps ** 2).sum(2)  # in x_sq's order: a copy's three sums are one
    if metric == "sqeuclidean":
        d = sq_diff
    elif metric == "euclidean":
        d = torch.sqrt(sq_diff.clamp_min(0) + eps)
    elif metric == "dot":
        d = -dot
    else:
        # max(|x|, EPS) max(|p|, EPS) as sqrt(|x|^2 |p|^2): exact at a copy (sqrt(fl(v v)) == v),
        # so a pushed patch is at 0, not 2e-16; the norms' product where the squares' overflows
        x_sq, p_sq = x_sq.clamp_min(EPS * EPS), p_sq.clamp_min(EPS * EPS)
        product = x_sq * p_sq
        d = 1 - dot / torch.where(product.isfinite(), product.sqrt(), x_sq.sqrt() * p_sq.sqrt())
        # 1 - cos lies in [0, 2]: outside it is the rounding of this float64 sum (-2e-16 where
        # D = 1 makes every same-signed pair 0), which would order exact ties by noise
        d = d.clamp(0, 2)
    return d.flatten(2)


def first_min(d: Tensor) -> tuple[Tensor, Tensor]:
    """Min over the last dim and the first index attaining it (ties: lowest index)."""
    values = d.amin(-1)
    indices = (d == values[..., None]).to(torch.int8).argmax(-1)
    return values, indices
