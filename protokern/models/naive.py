"""ProtoPNet's own, unfused prototype layer (the authors' ``_l2_convolution`` and min-pool),
kept as the baseline the demo times protokern's fused op against.

It materialises the whole ``(B, M, H', W')`` distance tensor, through two convolutions, and
keeps it for autograd: exactly what protokern's fused op avoids.
"""

import torch
from torch import Tensor
from torch.nn import functional


def naive_distance_map(x: Tensor, prototypes: Tensor, metric: str = "sqeuclidean") -> Tensor:
    """``(B, M, H', W')`` distances of ``x`` ``(B, D, H, W)`` to ``prototypes``
    ``(M, D, ph, pw)`` by ProtoPNet's convolutions: ``relu(conv(x^2, 1) - 2 conv(x, p) + |p|^2)``
    (cosine: ``1 - conv(x, p) / (|patch| |p|)``)."""
    ones = torch.ones_like(prototypes)
    patch_sq = functional.conv2d(x * x, ones)  # |patch|^2 at every position, (B, M, H', W')
    dot = functional.conv2d(x, prototypes)
    proto_sq = (prototypes * prototypes).sum((1, 2, 3)).view(1, -1, 1, 1)
    if metric == "cosine":
        norms = patch_sq.sqrt().clamp_min(1e-8) * proto_sq.sqrt().clamp_min(1e-8)
        return 1 - dot / norms
    return functional.relu(patch_sq - 2 * dot + proto_sq)


def naive_min_distance(x: Tensor, prototypes: Tensor, metric: str = "sqeuclidean") -> Tensor:
    """``(B, M)`` min over positions of `naive_distance_map`, by ProtoPNet's ``-max_pool(-d)``."""
    distances = naive_distance_map(x, prototypes, metric)
    return -functional.max_pool2d(-distances, distances.shape[2:]).flatten(1)
