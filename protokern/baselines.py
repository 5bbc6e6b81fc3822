"""The naive formulations protokern is measured against: what users write without it.

Each takes ``x`` ``(B, D, H, W)`` and ``prototypes`` ``(M, D, ph, pw)`` and materialises the
whole ``(B, M, H', W')`` (or ``(B L', M)``) distance tensor, keeping it alive for autograd:

- `protopnet_distance_map` / `protopnet_min_distance`: ProtoPNet's ``_l2_convolution`` (a conv
  of ``x^2`` with a ones kernel of the prototypes' shape, a conv of ``x`` with the prototypes,
  add, relu) and its min-pool (``-max_pool2d(-d)``), the pool's indices as argmin; the demo's
  baseline and the benchmark's ``naive_conv``;
- `cdist_min`: ``torch.cdist(patches, prototypes) ** 2`` then ``min`` over positions
  (``naive_cdist``, ``protokern selfcheck``'s baseline);
- `loop_mm_min`: per image, ``torch.mm`` then ``min`` over positions, with a hand-written
  backward that gathers the chosen patch and scatters its gradient (``naive_loop``).

The reduction over prototypes (the k nearest prototypes of every window), as anomalib's
PatchCore and vector-quantize-pytorch write it:

- `cdist_topk`: ``torch.cdist(rows, prototypes) ** 2`` ``(N, M)`` then ``topk`` (``min`` for
  ``k = 1``);
- `chunked_cdist_topk`: the same a block of rows at a time, so only ``(chunk, M)`` is alive in
  the forward (autograd still keeps every block for the backward).
"""

import torch
from torch import Tensor
from torch.nn import functional

from protokern.backends.reference import EPS, patches


def protopnet_distance_map(x: Tensor, prototypes: Tensor, metric: str = "sqeuclidean"
                           ) -> Tensor:
    """``(B, M, H', W')`` distances by ProtoPNet's convolutions:
    ``relu(conv(x^2, 1) - 2 conv(x, p) + |p|^2)`` (cosine: ``1 - conv(x, p) / (|patch| |p|)``)."""
    # ProtoPNet keeps `ones` as a frozen parameter of the prototypes' full shape, so its x^2
    # conv has M identical output channels; that is the formulation users run.
    ones = torch.ones_like(prototypes, requires_grad=False)
    patch_sq = functional.conv2d(x * x, ones)  # |patch|^2 at every position, (B, M, H', W')
    dot = functional.conv2d(x, prototypes)
    proto_sq = (prototypes * prototypes).sum((1, 2, 3)).view(1, -1, 1, 1)
    if metric == "cosine":
        norms = patch_sq.sqrt().clamp_min(EPS) * proto_sq.sqrt().clamp_min(EPS)
        return 1 - dot / norms
    return functional.relu(patch_sq + (-2 * dot + proto_sq))  # ProtoPNet's order of additions


def protopnet_min_distance(x: Tensor, prototypes: Tensor, metric: str = "sqeuclidean"
                           ) -> tuple[Tensor, Tensor]:
    """Values and indices ``(B, M)``: the min over positions of `protopnet_distance_map` by
    ProtoPNet's ``-max_pool2d(-d)``, with the pool's indices (flat over ``H' x W'``)."""
    distances = protopnet_distance_map(x, prototypes, metric)
    negated, indices = functional.max_pool2d(-distances, kernel_size=distances.shape[-2:],
                                             return_indices=True)
    return -negated.flatten(1), indices.flatten(1)


def cdist_min(x: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.cdist(patches, prototypes) ** 2`` ``(B L', M)``, then min over positions."""
    rows = patches(x, prototypes.shape[2], prototypes.shape[3])
    batch, positions, size = rows.shape
    # 2-d cdist: a batched one with broadcast prototypes would copy them for every image
    dist = torch.cdist(rows.reshape(batch * positions, size), prototypes.flatten(1)) ** 2
    return dist.view(batch, positions, -1).min(1)


class _LoopMinDistance(torch.autograd.Function):
    """Per image ``torch.mm`` then ``min``; backward through the argmin by gather/scatter."""

    @staticmethod
    def forward(ctx, rows: Tensor, protos: Tensor) -> tuple[Tensor, Tensor]:
        # rows (B, L', K), protos (M, K)
        batch, num = rows.shape[0], protos.shape[0]
        proto_sq = protos.square().sum(1)[:, None]
        values = rows.new_empty(batch, num)
        indices = torch.empty(batch, num, dtype=torch.int64, device=rows.device)
        for b in range(batch):
            dots = torch.mm(protos, rows[b].t())  # (M, L')
            dist = (rows[b].square().sum(1)[None] + proto_sq - 2 * dots).clamp_min_(0)
            torch.min(dist, 1, out=(values[b], indices[b]))
        ctx.save_for_backward(rows, protos, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: Tensor, _grad_indices: Tensor) -> tuple[Tensor, Tensor]:
        rows, protos, indices = ctx.saved_tensors
        grad_rows = torch.zeros_like(rows, memory_format=torch.contiguous_format)
        grad_protos = torch.zeros_like(protos)
        for b in range(rows.shape[0]):
            # d(|r - p|^2) = 2 (r - p) dr - 2 (r - p) dp, at the chosen row only
            chosen = rows[b].index_select(0, indices[b])  # (M, K)
            grad = 2 * grad_values[b, :, None] * (chosen - protos)
            grad_rows[b].index_add_(0, indices[b], grad)
            grad_protos -= grad
        return grad_rows, grad_protos


def loop_mm_min(x: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """The plain loop: per image ``mm`` ``(M, K) @ (K, L')`` and min over ``L'``."""
    rows = patches(x, prototypes.shape[2], prototypes.shape[3])
    return _LoopMinDistance.apply(rows, prototypes.flatten(1))


def _rows(x: Tensor, prototypes: Tensor) -> Tensor:
    """Every window of ``x`` as a row, ``(B L', K)``."""
    rows = patches(x, prototypes.shape[2], prototypes.shape[3])
    return rows.reshape(-1, rows.shape[-1])


def _smallest(dist: Tensor, k: int) -> tuple[Tensor, Tensor]:
    if k == 1:
        values, indices = dist.min(1, keepdim=True)
        return values, indices
    return dist.topk(k, dim=1, largest=False)


def cdist_topk(x: Tensor, prototypes: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Values and indices ``(B, L', k)``: ``torch.cdist`` of every window with every prototype,
    squared, then the ``k`` smallest."""
    values, indices = _smallest(torch.cdist(_rows(x, prototypes), prototypes.flatten(1)) ** 2, k)
    shape = (x.shape[0], -1, k)
    return values.view(shape), indices.view(shape)


def chunked_cdist_topk(x: Tensor, prototypes: Tensor, k: int, chunk: int = 4096
                       ) -> tuple[Tensor, Tensor]:
    """`cdist_topk`, ``chunk`` rows at a time."""
    rows, protos = _rows(x, prototypes), prototypes.flatten(1)
    parts = [_smallest(torch.cdist(rows[s:s + chunk], protos) ** 2, k)
             for s in range(0, rows.shape[0], chunk)]
    shape = (x.shape[0], -1, k)
    return (torch.cat([v for v, _ in parts]).view(shape),
            torch.cat([i for _, i in parts]).view(shape))
