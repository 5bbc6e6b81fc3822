"""The oracle: plain, unfused PyTorch implementations of protokern's ops.

Every fast backend is tested against these functions run in float64. They take the canonical
forms that `protokern.ops` produces from the public API:

- ``x``: ``(B, D, H, W)`` with any strides (tokens ``(B, L, D)`` arrive as ``(B, D, L, 1)``),
- ``prototypes``: ``(M, D, ph, pw)``,
- windows are valid and stride 1: ``H' = H - ph + 1``, ``W' = W - pw + 1``, ``L' = H' * W'``.

Distances go through the GEMM expansion (``|x|^2 - 2 x.p + |p|^2``), which is how every fused
kernel computes them, one block of prototypes at a time so that no more than about
``CHUNK_ELEMENTS`` distances are alive at once. The value returned by `min_distance` is then
recomputed directly at the chosen position (``sum((x_patch - p)^2)``), so it carries no
cancellation error. float16/bfloat16 inputs are computed in float32, float64 in float64.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-8
"""Lower bound of a norm in the cosine metric: ``max(|v|, EPS)``."""

CHUNK_ELEMENTS = 1 << 24
"""About how many distance (or gathered patch) entries one block of prototypes may hold."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtype``: float64 stays, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def patches(x: Tensor, ph: int, pw: int) -> Tensor:
    """All valid ``ph x pw`` windows of ``x`` ``(B, D, H, W)`` as rows: ``(B, L', D*ph*pw)``.

    A row is ordered like ``prototypes.reshape(M, -1)`` (channel, then window row, then column),
    and rows run over positions in row-major order. 1x1 windows are a view, not a copy.
    """
    if ph == 1 and pw == 1:
        return x.flatten(2).transpose(1, 2)
    return F.unfold(x, (ph, pw)).transpose(1, 2)


def fold_patches(grad_rows: Tensor, height: int, width: int, ph: int, pw: int) -> Tensor:
    """Adjoint of `patches`: sums row gradients ``(B, L', D*ph*pw)`` back into ``(B, D, H, W)``."""
    if ph == 1 and pw == 1:
        batch, _, dim = grad_rows.shape
        return grad_rows.transpose(1, 2).reshape(batch, dim, height, width)
    return F.fold(grad_rows.transpose(1, 2), (height, width), (ph, pw))


def pairwise_distance(rows: Tensor, protos: Tensor, metric: str) -> Tensor:
    """Distances ``(B, c, L')`` between patch rows ``(B, L', K)`` and prototypes ``(c, K)``."""
    dots = torch.matmul(protos, rows.transpose(1, 2))
    if metric == "sqeuclidean":
        row_sq = rows.square().sum(-1)[:, None, :]
        proto_sq = protos.square().sum(-1)[None, :, None]
        return (row_sq - 2 * dots + proto_sq).clamp_min(0)
    row_norm = rows.norm(dim=-1).clamp_min(EPS)[:, None, :]
    proto_norm = protos.norm(dim=-1).clamp_min(EPS)[None, :, None]
    return 1 - dots / (proto_norm * row_norm)


def distance_at(selected: Tensor, protos: Tensor, metric: str) -> Tensor:
    """Direct (non-expanded) distances ``(B, c)`` between rows ``(B, c, K)`` and ``(c, K)``."""
    if metric == "sqeuclidean":
        return (selected - protos).square().sum(-1)
    dots = (selected * protos).sum(-1)
    return 1 - dots / (selected.norm(dim=-1).clamp_min(EPS) * protos.norm(dim=-1).clamp_min(EPS))


def first_argmin(distances: Tensor) -> Tensor:
    """Index of the first minimum along the last dim; a NaN counts as the minimum.

    So ties go to the lowest position, and a NaN distance selects (the first) NaN position,
    which makes the recomputed value NaN, as `torch.min` propagates NaN.
    """
    key = torch.where(distances.isnan(), float("-inf"), distances)
    is_min = key == key.amin(-1, keepdim=True)
    length = distances.shape[-1]
    positions = torch.arange(length, device=distances.device)
    return torch.where(is_min, positions, length).amin(-1)


def prototype_blocks(num_prototypes: int, elements_per_prototype: int) -> list[slice]:
    """Slices of the prototype axis holding about `CHUNK_ELEMENTS` entries each."""
    step = max(1, CHUNK_ELEMENTS // max(1, elements_per_prototype))
    return [slice(s, min(s + step, num_prototypes)) for s in range(0, num_prototypes, step)]


def _rows_and_protos(x: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
    dtype = compute_dtype(x.dtype)
    _, _, ph, pw = prototypes.shape
    return patches(x.to(dtype), ph, pw), prototypes.flatten(1).to(dtype)


def min_distance(x: Tensor, prototypes: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Min over positions of the distance, and the first position attaining it.

    Returns ``values`` ``(B, M)`` in ``x.dtype`` and ``indices`` ``(B, M)`` int64, flat over
    ``H' x W'``.
    """
    rows, protos = _rows_and_protos(x, prototypes)
    batch, length, size = rows.shape
    num = protos.shape[0]
    values = torch.empty(batch, num, dtype=x.dtype, device=x.device)
    indices = torch.empty(batch, num, dtype=torch.int64, device=x.device)
    image = torch.arange(batch, device=x.device)[:, None]
    for block in prototype_blocks(num, batch * (length + size)):
        dist = pairwise_distance(rows, protos[block], metric)
        chosen = first_argmin(dist)
        exact = distance_at(rows[image, chosen], protos[block], metric)
        # a NaN from the expansion (a NaN input, or inf - inf from an infinite one) stays NaN
        # even where the direct formula would give a number for that position
        seen_nan = dist.gather(-1, chosen[..., None])[..., 0].isnan()
        values[:, block] = torch.where(seen_nan, float("nan"), exact).to(x.dtype)
        indices[:, block] = chosen
    return values, indices


def distance_at_grad(
    selected: Tensor, protos: Tensor, grad: Tensor, metric: str
) -> tuple[Tensor, Tensor]:
    """Gradients of ``grad * distance_at(selected, protos)`` w.r.t. both, each ``(B, c, K)``.

    For cosine the norm's lower bound passes gradient where ``|v| >= EPS``, as
    ``clamp_min`` does in PyTorch.
    """
    if metric == "sqeuclidean":
        grad_selected = 2 * grad[..., None] * (selected - protos)
        return grad_selected, -grad_selected
    dots = (selected * protos).sum(-1)
    selected_norm = selected.norm(dim=-1)
    proto_norm = protos.norm(dim=-1)
    selected_bound = selected_norm.clamp_min(EPS)
    proto_bound = proto_norm.clamp_min(EPS)
    scale = grad / (selected_bound * proto_bound)
    selected_term = torch.where(selected_norm >= EPS, scale * dots / selected_bound.square(), 0)
    proto_term = torch.where(proto_norm >= EPS, scale * dots / proto_bound.square(), 0)
    grad_selected = selected_term[..., None] * selected - scale[..., None] * protos
    grad_protos = proto_term[..., None] * protos - scale[..., None] * selected
    return grad_selected, grad_protos


def min_distance_backward(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor, metric: str
) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(grad_values * values)`` w.r.t. ``x`` and ``prototypes``.

    Only the position in ``indices`` contributes (a subgradient of the min). Deterministic:
    the scatter into ``x`` is an accumulating ``index_put_``, which PyTorch runs
    deterministically on every device when deterministic algorithms are enabled.
    """
    rows, protos = _rows_and_protos(x, prototypes)
    batch, length, size = rows.shape
    grad_rows = torch.zeros(batch, length, size, dtype=rows.dtype, device=rows.device)
    grad_protos = torch.empty_like(protos)
    image = torch.arange(batch, device=x.device)[:, None]
    for block in prototype_blocks(protos.shape[0], batch * size):
        chosen = indices[:, block]
        grad_selected, grad_block = distance_at_grad(
            rows[image, chosen], protos[block], grad_values[:, block].to(rows.dtype), metric
        )
        grad_rows.index_put_((image.expand_as(chosen), chosen), grad_selected, accumulate=True)
        grad_protos[block] = grad_block.sum(0)
    return _fold_grads(grad_rows, grad_protos, x, prototypes)


def _fold_grads(
    grad_rows: Tensor, grad_protos: Tensor, x: Tensor, prototypes: Tensor
) -> tuple[Tensor, Tensor]:
    """Row and flat-prototype gradients back to the shapes and dtypes of the inputs."""
    _, _, ph, pw = prototypes.shape
    grad_x = fold_patches(grad_rows, x.shape[-2], x.shape[-1], ph, pw)
    return grad_x.to(x.dtype), grad_protos.reshape(prototypes.shape).to(prototypes.dtype)


def distance_map(x: Tensor, prototypes: Tensor, metric: str) -> Tensor:
    """Every distance, ``(B, M, H', W')`` in ``x.dtype`` (for explanations)."""
    rows, protos = _rows_and_protos(x, prototypes)
    batch, length, _ = rows.shape
    _, _, ph, pw = prototypes.shape
    out_h, out_w = x.shape[-2] - ph + 1, x.shape[-1] - pw + 1
    out = torch.empty(batch, protos.shape[0], out_h, out_w, dtype=x.dtype, device=x.device)
    for block in prototype_blocks(protos.shape[0], batch * length):
        out[:, block] = pairwise_distance(rows, protos[block], metric).unflatten(-1, (out_h, out_w))
    return out


def distance_map_backward(
    grad_map: Tensor, x: Tensor, prototypes: Tensor, metric: str
) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(grad_map * distance_map(x, prototypes))`` w.r.t. both inputs.

    Written with GEMMs over the whole map (the map's gradient is that large already).
    """
    rows, protos = _rows_and_protos(x, prototypes)
    grad = grad_map.flatten(2).to(rows.dtype)  # (B, M, L')
    if metric == "sqeuclidean":
        # d = |r|^2 - 2 p.r + |p|^2  =>  dd/dr = 2 (r - p), dd/dp = 2 (p - r)
        grad_rows = 2 * (grad.sum(1)[..., None] * rows - grad.transpose(1, 2) @ protos)
        grad_protos = 2 * (grad.sum((0, 2))[:, None] * protos - (grad @ rows).sum(0))
    else:
        # d = 1 - s / (a b), s = p.r, a = max(|r|, EPS), b = max(|p|, EPS)
        row_norm = rows.norm(dim=-1)
        proto_norm = protos.norm(dim=-1)
        row_bound = row_norm.clamp_min(EPS)
        proto_bound = proto_norm.clamp_min(EPS)
        dots = torch.matmul(protos, rows.transpose(1, 2))
        scaled = grad / (proto_bound[None, :, None] * row_bound[:, None, :])
        weighted = scaled * dots
        row_term = torch.where(row_norm >= EPS, weighted.sum(1) / row_bound.square(), 0)
        proto_term = torch.where(proto_norm >= EPS, weighted.sum((0, 2)) / proto_bound.square(), 0)
        grad_rows = row_term[..., None] * rows - scaled.transpose(1, 2) @ protos
        grad_protos = proto_term[:, None] * protos - (scaled @ rows).sum(0)
    return _fold_grads(grad_rows, grad_protos, x, prototypes)
