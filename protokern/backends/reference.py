"""The oracle: plain, unfused PyTorch implementations of protokern's ops.

Every fast backend is tested against these functions run in float64. They take the canonical
forms that `protokern.ops` produces from the public API:

- ``x``: ``(B, D, H, W)`` with any strides (tokens ``(B, L, D)`` arrive as ``(B, D, L, 1)``),
- ``prototypes``: ``(M, D, ph, pw)``,
- windows are valid and stride 1: ``H' = H - ph + 1``, ``W' = W - pw + 1``, ``L' = H' * W'``.

`min_distance` (and `topk_distance`, its k smallest) is exact: the GEMM expansion (``|x|^2 - 2
x.p + |p|^2``, how every fused kernel computes distances) only shortlists positions, which are
then recomputed directly in float64 (see `exact_shortlist`). `distance_map` is the expansion
itself, so in float32 its absolute error is about ``eps * (|x_patch|^2 + |p|^2)``. Work is done
one block of prototypes at a time, so that no more than about ``CHUNK_ELEMENTS`` distances are
alive at once. float16/bfloat16 inputs are computed in float32, float64 in float64.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from protokern.backends.registry import Backend, register_backend

EPS = 1e-8
"""Lower bound of a norm in the cosine metric: ``max(|v|, EPS)``."""

CHUNK_ELEMENTS = 1 << 22
"""About how many distances one block of prototypes may hold (a few such tensors are alive)."""


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


def input_rounding(dtype: torch.dtype, device: torch.device) -> float:
    """Relative rounding PyTorch may apply to the inputs of a ``dtype`` GEMM on ``device``
    (float32 under the TF32/bfloat16 matmul settings; 0 otherwise)."""
    if dtype != torch.float32:
        return 0.0
    matmul = torch.backends.cuda.matmul if device.type == "cuda" else torch.backends.mkldnn.matmul
    precision = matmul.fp32_precision
    if precision == "none":  # inherits the global setting
        precision = torch.backends.fp32_precision
    return {"none": 0.0, "ieee": 0.0, "tf32": 2.0**-10, "bf16": 2.0**-7}[precision]


def expansion(rows: Tensor, protos: Tensor, metric: str) -> Tensor:
    """Distances ``(B, c, L')`` between rows ``(B, L', K)`` and ``(c, K)`` by the GEMM expansion:
    ``|r|^2 - 2 r.p + |p|^2`` (clamped at 0), ``1 - r.p / (max(|r|, EPS) max(|p|, EPS))``
    (clamped to [0, 2]) or ``-r.p``."""
    dots = torch.matmul(protos, rows.transpose(1, 2))
    if metric == "dot":
        return -dots
    if metric == "sqeuclidean":
        magnitude = rows.square().sum(-1)[:, None, :] + protos.square().sum(-1)[None, :, None]
        return (magnitude - 2 * dots).clamp_min(0)
    row_norm = rows.norm(dim=-1)[:, None, :]
    proto_norm = protos.norm(dim=-1)[None, :, None]
    return (1 - dots / (proto_norm.clamp_min(EPS) * row_norm.clamp_min(EPS))).clamp(0, 2)


def expanded_distance(rows: Tensor, protos: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """The `expansion`'s distances ``(B, c, L')`` between rows ``(B, L', K)`` and ``(c, K)``,
    and a bound on their rounding error (`expansion_bound`)."""
    return expansion(rows, protos, metric), expansion_bound(rows, protos, metric)


def expansion_bound(rows: Tensor, protos: Tensor, metric: str) -> Tensor:
    """A bound on the rounding error of the GEMM expansion's distances between rows
    ``(B, L', K)`` and ``(c, K)``, broadcastable to ``(B, c, L')`` (``inf`` where an
    intermediate overflowed).

    The worst case of a K-term float sum (``~K eps`` relative to the sum of the magnitudes,
    plus an absolute term for subnormal products), plus the rounding of the GEMM inputs where
    TF32/bfloat16 matmuls are allowed.
    """
    size = rows.shape[-1]
    finfo = torch.finfo(rows.dtype)
    eps = finfo.eps
    rounding = input_rounding(rows.dtype, rows.device)
    if metric == "dot":
        # |sum r_i p_i| <= sum |r_i p_i| <= |r| |p| (Cauchy-Schwarz), so the K-term sum's
        # bound is relative to the product of the norms (inf where a norm overflowed)
        magnitude = rows.norm(dim=-1)[:, None, :] * protos.norm(dim=-1)[None, :, None]
        bound = ((size + 4) * eps + 2 * rounding) * magnitude + 4 * (size + 1) * finfo.tiny
        return torch.where(magnitude.isfinite(), bound, float("inf"))
    if metric == "sqeuclidean":
        magnitude = rows.square().sum(-1)[:, None, :] + protos.square().sum(-1)[None, :, None]
        return ((size + 4) * eps + 2 * rounding) * magnitude + 4 * (size + 1) * finfo.tiny
    finite = (rows.norm(dim=-1)[:, None, :] * protos.norm(dim=-1)[None, :, None]).isfinite()
    return torch.where(finite, (2 * size + 8) * eps + 4 * rounding, float("inf"))


def fixed_order_sum(terms: Tensor) -> Tensor:
    """Pairwise sum over the last dim by elementwise adds only.

    Its result depends on the values alone, bit for bit: not on how many rows are summed at
    once nor on the thread count, unlike `torch.sum`, whose reduction order does. Identical
    windows therefore get identical exact distances, so ties are real ties.
    """
    while terms.shape[-1] > 1:
        if terms.shape[-1] % 2:
            terms = F.pad(terms, (0, 1))  # + 0.0 is exact
        terms = terms[..., 0::2] + terms[..., 1::2]
    return terms[..., 0] if terms.shape[-1] else terms.sum(-1)


def distance_at(selected: Tensor, protos: Tensor, metric: str,
                total: Callable[[Tensor], Tensor] = fixed_order_sum) -> Tensor:
    """Direct (non-expanded) distances between matching rows ``(..., K)`` of both arguments,
    their sums over ``K`` taken by ``total``."""
    if metric == "sqeuclidean":
        return total((selected - protos).square())
    dots = total(selected * protos)
    if metric == "dot":
        return -dots
    return (1 - dots / cosine_denominator(total(selected.square()), total(protos.square()))
            ).clamp(0, 2)


def cosine_denominator(selected_squared: Tensor, proto_squared: Tensor) -> Tensor:
    """``max(|s|, EPS) max(|p|, EPS)`` from the squared norms, as ``sqrt(|s|^2 |p|^2)`` (floored
    squares): at a copy (``s == p``, so ``s.p``, ``|s|^2`` and ``|p|^2`` are the same sum) it is
    exactly ``s.p``, since ``sqrt(fl(v * v)) == v``, and the distance is 0 on every host, where
    ``|s| |p|`` is off by an ulp in about a quarter of the vectors. Where the product overflows,
    the product of the norms."""
    selected_squared = selected_squared.clamp_min(EPS * EPS)
    proto_squared = proto_squared.clamp_min(EPS * EPS)
    product = selected_squared * proto_squared
    return torch.where(product.isfinite(), product.sqrt(),
                       selected_squared.sqrt() * proto_squared.sqrt())


def exact_shortlist(rows: Tensor, protos: Tensor, metric: str, k: int,
                    expanded: Tensor | None = None) -> Tensor:
    """Exact float64 distances ``(B, c, L')`` at every position that may be among the ``k``
    smallest of its (image, prototype), ``inf`` elsewhere. ``expanded``: the expansion's
    distances ``(B, c, L')`` where already computed (a distance map), else computed here.

    The expansion only shortlists: every position whose lower bound is at most the ``k``-th
    smallest upper bound (and every position where it overflowed or gave NaN) is recomputed
    directly in float64. So ties go to the lowest position whatever the GEMM's rounding, and
    small distances next to large norms are not lost to cancellation.
    """
    if expanded is None:
        dist, bound = expanded_distance(rows, protos, metric)
    else:
        dist, bound = expanded.to(rows.dtype), expansion_bound(rows, protos, metric)
    suspect = dist.isnan() | bound.isinf()
    upper = torch.where(suspect, float("inf"), dist + bound)
    kth_upper = (upper.amin(-1, keepdim=True) if k == 1
                 else upper.kthvalue(k, dim=-1, keepdim=True).values)
    image, proto, position = (suspect | (dist - bound <= kth_upper)).nonzero(as_tuple=True)
    exact = torch.full(dist.shape, float("inf"), dtype=torch.float64, device=dist.device)
    step = max(1, CHUNK_ELEMENTS // (8 * max(1, rows.shape[-1])))  # float64 rows, a few copies
    for s in range(0, image.numel(), step):
        i, m, pos = image[s:s + step], proto[s:s + step], position[s:s + step]
        exact[i, m, pos] = distance_at(rows[i, pos].double(), protos[m].double(), metric)
    return exact


def exact_min(rows: Tensor, protos: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Min over positions of the exact distance and the first position attaining it, ``(B, c)``
    (`exact_shortlist` with ``k = 1``); a NaN input makes the value NaN at the first NaN
    position, as `torch.min` does."""
    return exact_shortlist(rows, protos, metric, 1).min(-1)


def dot_refusal(kernels: str):
    """A `protokern.backends.registry.Rule` refusing the ``"dot"`` metric, for a backend whose
    ``kernels`` (named in the reason) shortlist with the sqeuclidean and cosine rounding
    bounds only: a dot product's bound is relative to ``|x| |p|`` instead."""

    def rule(x: Tensor, prototypes: Tensor, metric: str, **options) -> str | None:
        if metric == "dot":
            return (f"{kernels} have no rounding bound for the 'dot' metric (relative to "
                    f"|x| |p|); the reference runs it")
        return None

    return rule


def write_exact_minima(dmap: Tensor, x: Tensor, prototypes: Tensor, metric: str) -> None:
    """Overwrite, in place, each (image, prototype)'s minimum of a distance map ``dmap``
    ``(B, M, H', W')`` (any backend's expansion of ``x``, ``prototypes``) with the exact
    distance there: the map's own shortlist (`exact_shortlist` on it), recomputed directly in
    float64, the first exact minimum winning, as `min_distance`. No GEMM: the map is the
    expansion."""
    rows, protos = rows_and_protos(x, prototypes)
    flat = dmap.view(dmap.shape[0], dmap.shape[1], -1)
    for block in prototype_blocks(protos.shape[0], 6 * rows.shape[0] * rows.shape[1]):
        exact = exact_shortlist(rows, protos[block], metric, 1, expanded=flat[:, block])
        values, indices = exact.min(-1)
        flat[:, block] = flat[:, block].scatter(2, indices[..., None],
                                                values[..., None].to(flat.dtype))


def prototype_blocks(num_prototypes: int, elements_per_prototype: int,
                     budget: int = CHUNK_ELEMENTS) -> list[slice]:
    """Slices of the prototype axis holding about ``budget`` entries each."""
    step = max(1, budget // max(1, elements_per_prototype))
    return [slice(s, min(s + step, num_prototypes)) for s in range(0, num_prototypes, step)]


def rows_and_protos(x: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """Canonical ``x`` ``(B, D, H, W)`` and ``prototypes`` ``(M, D, ph, pw)`` as `patches` rows
    ``(B, L', K)`` and flat prototypes ``(M, K)``, ``K = D ph pw``, in the `compute_dtype`."""
    dtype = compute_dtype(x.dtype)
    _, _, ph, pw = prototypes.shape
    return patches(x.to(dtype), ph, pw), prototypes.flatten(1).to(dtype)


def min_distance(x: Tensor, prototypes: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """Min over positions of the distance, and the first position attaining it.

    Returns ``values`` ``(B, M)`` in ``x.dtype`` and ``indices`` ``(B, M)`` int64, flat over
    ``H' x W'``. Exact: see `exact_min`.
    """
    rows, protos = rows_and_protos(x, prototypes)
    batch, length, _ = rows.shape
    num = protos.shape[0]
    values = torch.empty(batch, num, dtype=x.dtype, device=x.device)
    indices = torch.empty(batch, num, dtype=torch.int64, device=x.device)
    # exact_min keeps about six (B, block, L') tensors alive
    for block in prototype_blocks(num, 6 * batch * length):
        block_values, indices[:, block] = exact_min(rows, protos[block], metric)
        values[:, block] = block_values.to(x.dtype)
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
    if metric == "dot":  # d = -<s, p>
        return -grad[..., None] * protos.expand_as(selected), -grad[..., None] * selected
    # In float64: in float32, |v|^2 overflows past |v| ~ 1.8e19 (NaN gradients) and the
    # coefficients ~ grad / |v|^2 underflow; the forward handles such magnitudes, so must this.
    dtype = selected.dtype
    grad_selected, grad_protos = _cosine_grad(selected.double(), protos.double(), grad.double())
    return grad_selected.to(dtype), grad_protos.to(dtype)


def _cosine_grad(selected: Tensor, protos: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
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
    grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor, metric: str,
    needs_x: bool = True, needs_prototypes: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``sum(grad_values * values)`` w.r.t. ``x`` and ``prototypes`` (None for one
    not asked for by ``needs_x``/``needs_prototypes``, which is then not computed).

    Only the position in ``indices`` contributes (a subgradient of the min). Deterministic:
    the scatter into ``x`` is an accumulating ``index_put_``, which PyTorch runs
    deterministically on every device when deterministic algorithms are enabled.
    """
    rows, protos = rows_and_protos(x, prototypes)
    batch, length, size = rows.shape
    grad_rows = grad_protos = None
    if needs_x:
        grad_rows = torch.zeros(batch, length, size, dtype=rows.dtype, device=rows.device)
    if needs_prototypes:
        grad_protos = torch.empty_like(protos)
    image = torch.arange(batch, device=x.device)[:, None]
    for block in prototype_blocks(protos.shape[0], batch * size):
        chosen = indices[:, block]
        grad_selected, grad_block = distance_at_grad(
            rows[image, chosen], protos[block], grad_values[:, block].to(rows.dtype), metric
        )
        if needs_x:
            grad_rows.index_put_((image.expand_as(chosen), chosen), grad_selected,
                                 accumulate=True)
        if needs_prototypes:
            grad_protos[block] = grad_block.sum(0)
    return _fold_grads(grad_rows, grad_protos, x, prototypes)


def _fold_grads(
    grad_rows: Tensor | None, grad_protos: Tensor | None, x: Tensor, prototypes: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """Row and flat-prototype gradients (or None) back to the shapes and dtypes of the inputs."""
    _, _, ph, pw = prototypes.shape
    grad_x = None
    if grad_rows is not None:
        grad_x = fold_patches(grad_rows, x.shape[-2], x.shape[-1], ph, pw).to(x.dtype)
    if grad_protos is not None:
        grad_protos = grad_protos.reshape(prototypes.shape).to(prototypes.dtype)
    return grad_x, grad_protos


def distance_map(x: Tensor, prototypes: Tensor, metric: str) -> Tensor:
    """Every distance, ``(B, M, H', W')`` in ``x.dtype`` (for explanations)."""
    rows, protos = rows_and_protos(x, prototypes)
    batch, length, _ = rows.shape
    _, _, ph, pw = prototypes.shape
    out_h, out_w = x.shape[-2] - ph + 1, x.shape[-1] - pw + 1
    out = torch.empty(batch, protos.shape[0], out_h, out_w, dtype=x.dtype, device=x.device)
    for block in prototype_blocks(protos.shape[0], batch * length):
        dist, _ = expanded_distance(rows, protos[block], metric)
        out[:, block] = dist.unflatten(-1, (out_h, out_w))
    return out


def distance_map_backward(
    grad_map: Tensor, x: Tensor, prototypes: Tensor, metric: str,
    needs_x: bool = True, needs_prototypes: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``sum(grad_map * distance_map(x, prototypes))`` w.r.t. both inputs (None for
    one not asked for, which is then not computed).

    GEMMs over one block of prototypes at a time (of the unclamped formulas: where a clamp
    bites, the true gradient is zero up to rounding anyway).
    """
    rows, protos = rows_and_protos(x, prototypes)
    batch, length, _ = rows.shape
    grad_rows = grad_protos = None
    if needs_x:
        grad_rows = torch.zeros_like(rows, memory_format=torch.contiguous_format)
    if needs_prototypes:
        grad_protos = torch.empty_like(protos)
    if metric == "cosine":
        row_norm = rows.norm(dim=-1)
        row_bound = row_norm.clamp_min(EPS)
    for block in prototype_blocks(protos.shape[0], batch * length):
        grad = grad_map[:, block].flatten(2).to(rows.dtype)  # (B, c, L')
        block_protos = protos[block]
        if metric == "sqeuclidean":
            # d = |r|^2 - 2 p.r + |p|^2  =>  dd/dr = 2 (r - p), dd/dp = 2 (p - r)
            if needs_x:
                grad_rows += 2 * (grad.sum(1)[..., None] * rows
                                  - grad.transpose(1, 2) @ block_protos)
            if needs_prototypes:
                grad_protos[block] = 2 * (grad.sum((0, 2))[:, None] * block_protos
                                          - (grad @ rows).sum(0))
            continue
        if metric == "dot":  # d = -p.r  =>  dd/dr = -p, dd/dp = -r
            if needs_x:
                grad_rows -= grad.transpose(1, 2) @ block_protos
            if needs_prototypes:
                grad_protos[block] = -(grad @ rows).sum(0)
            continue
        # d = 1 - s / (a b), s = p.r, a = max(|r|, EPS), b = max(|p|, EPS)
        proto_norm = block_protos.norm(dim=-1)
        proto_bound = proto_norm.clamp_min(EPS)
        dots = torch.matmul(block_protos, rows.transpose(1, 2))
        scaled = grad / (proto_bound[None, :, None] * row_bound[:, None, :])
        weighted = scaled * dots
        if needs_x:
            row_term = torch.where(row_norm >= EPS, weighted.sum(1) / row_bound.square(), 0)
            grad_rows += row_term[..., None] * rows - scaled.transpose(1, 2) @ block_protos
        if needs_prototypes:
            proto_term = torch.where(proto_norm >= EPS,
                                     weighted.sum((0, 2)) / proto_bound.square(), 0)
            grad_protos[block] = proto_term[:, None] * block_protos - (scaled @ rows).sum(0)
    return _fold_grads(grad_rows, grad_protos, x, prototypes)


def nearest_candidates(rows: Tensor, protos: Tensor, metric: str, k: int) -> Tensor:
    """Which prototypes may be among the ``k`` nearest of each row, ``(n, M)`` bool, for rows
    ``(n, K)`` and ``protos`` ``(M, K)``: every prototype whose expanded distance's lower
    bound is at most the ``k``-th smallest upper bound of its row (and every pair the expansion
    cannot bound: NaN, inf, overflow). At least ``k`` per row, usually about ``k``."""
    dist, bound = expanded_distance(rows[None], protos, metric)
    dist, bound = dist[0].T, bound.expand_as(dist)[0].T  # (n, M)
    suspect = dist.isnan() | bound.isinf()
    upper = torch.where(suspect, float("inf"), dist + bound)
    kth_upper = upper.kthvalue(k, dim=1, keepdim=True).values
    return suspect | (dist - bound <= kth_upper)


def first_k(exact: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest of each row of ``exact`` ``(n, M)`` and their columns, ascending; NaN
    first (as `torch.min`, a NaN is the minimum), ties to the lowest column."""
    key = torch.where(exact.isnan(), float("-inf"), exact)
    order = key.argsort(dim=1, stable=True)[:, :k]
    return exact.gather(1, order), order


def nearest_prototypes(x: Tensor, prototypes: Tensor, metric: str, k: int
                       ) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest prototypes of every window: ``values`` ``(B, L', k)`` ascending in
    ``x.dtype`` and ``indices`` ``(B, L', k)`` int64 into the prototypes.

    Exact, as `min_distance`: the expansion only shortlists (`nearest_candidates`), the
    candidates are recomputed directly in float64 and the first ``k`` by (exact distance,
    index) win (`first_k`), so ties go to the lowest index and a NaN distance comes first.
    """
    rows, protos = rows_and_protos(x, prototypes)
    batch, length, size = rows.shape
    flat = rows.reshape(batch * length, size)
    num = protos.shape[0]
    values = torch.empty(batch * length, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(batch * length, k, dtype=torch.int64, device=x.device)
    # about six (block, M) tensors are alive at once, one of them float64
    step = max(1, CHUNK_ELEMENTS // (6 * max(1, num)))
    for start in range(0, flat.shape[0], step):
        block = flat[start:start + step]
        candidate_rows, candidate_protos = nearest_candidates(block, protos, metric, k).nonzero(
            as_tuple=True)
        exact = torch.full((block.shape[0], num), float("inf"), dtype=torch.float64,
                           device=x.device)
        pair_step = max(1, CHUNK_ELEMENTS // (8 * max(1, size)))
        for s in range(0, candidate_rows.numel(), pair_step):
            r, m = candidate_rows[s:s + pair_step], candidate_protos[s:s + pair_step]
            exact[r, m] = distance_at(block[r].double(), protos[m].double(), metric)
        block_values, indices[start:start + step] = first_k(exact, k)
        values[start:start + step] = block_values.to(x.dtype)
    return values.view(batch, length, k), indices.view(batch, length, k)


def nearest_prototypes_backward(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor, metric: str,
    needs_x: bool = True, needs_prototypes: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``sum(grad_values * values)`` of `nearest_prototypes` w.r.t. ``x`` and
    ``prototypes`` through the chosen pairs ``indices`` ``(B, L', k)`` (None for one not asked
    for, which is then not computed). Deterministic: the prototypes' sums are an accumulating
    ``index_put_``, deterministic on every device under deterministic algorithms."""
    rows, protos = rows_and_protos(x, prototypes)
    batch, length, size = rows.shape
    k = indices.shape[-1]
    flat_rows = rows.reshape(batch * length, size)
    flat_indices = indices.reshape(batch * length, k)
    flat_grad = grad_values.reshape(batch * length, k).to(rows.dtype)
    grad_rows = torch.zeros_like(flat_rows, memory_format=torch.contiguous_format) \
        if needs_x else None
    grad_protos = torch.zeros_like(protos) if needs_prototypes else None
    step = max(1, CHUNK_ELEMENTS // (4 * max(1, k * size)))  # a few (block, k, K) tensors
    for start in range(0, flat_rows.shape[0], step):
        chosen = flat_indices[start:start + step]
        block = flat_rows[start:start + step, None, :].expand(-1, k, -1)
        grad_selected, grad_chosen = distance_at_grad(block, protos[chosen],
                                                      flat_grad[start:start + step], metric)
        if needs_x:
            grad_rows[start:start + step] = grad_selected.sum(1)
        if needs_prototypes:
            grad_protos.index_put_((chosen.reshape(-1),), grad_chosen.reshape(-1, size),
                                   accumulate=True)
    if grad_rows is not None:
        grad_rows = grad_rows.view(batch, length, size)
    return _fold_grads(grad_rows, grad_protos, x, prototypes)


def topk_distance(x: Tensor, prototypes: Tensor, metric: str, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest distances over positions of every (image, prototype): ``values``
    ``(B, M, k)`` ascending in ``x.dtype`` and ``indices`` ``(B, M, k)`` int64, flat over
    ``H' x W'``. Exact, as `min_distance` (`exact_shortlist`); ties go to the lowest position
    and a NaN distance comes first (`first_k`)."""
    rows, protos = rows_and_protos(x, prototypes)
    batch, length, _ = rows.shape
    num = protos.shape[0]
    values = torch.empty(batch, num, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(batch, num, k, dtype=torch.int64, device=x.device)
    for block in prototype_blocks(num, 6 * batch * length):
        exact = exact_shortlist(rows, protos[block], metric, k)  # (B, c, L')
        block_values, block_indices = first_k(exact.flatten(0, 1), k)
        values[:, block] = block_values.view(batch, -1, k).to(x.dtype)
        indices[:, block] = block_indices.view(batch, -1, k)
    return values, indices


def topk_backward_through(min_distance_backward_kernel):
    """A ``topk_distance_backward`` kernel from a backend's ``min_distance_backward``: the
    ``k`` chosen positions of a prototype are ``k`` copies of it, each with one position, so
    the fused (deterministic) min_distance backward does the scatter and the copies' gradients
    are summed back in rank order."""

    def topk_distance_backward(
        grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor, metric: str,
        needs_x: bool = True, needs_prototypes: bool = True,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Gradients of ``sum(grad_values * values)`` (both ``(B, M, k)``) of `topk_distance`
        w.r.t. ``x`` and ``prototypes`` (None for one not asked for)."""
        batch, num, k = indices.shape
        copies = prototypes.repeat_interleave(k, 0) if k > 1 else prototypes  # (M k, D, ph, pw)
        grad_x, grad_copies = min_distance_backward_kernel(
            grad_values.reshape(batch, num * k), x, copies, indices.reshape(batch, num * k),
            metric, needs_x, needs_prototypes)
        grad_prototypes = None
        if grad_copies is not None:
            grad_prototypes = grad_copies.view(num, k, *prototypes.shape[1:]).sum(1)
        return grad_x, grad_prototypes

    return topk_distance_backward


def _mean_parts(x: Tensor, prototypes: Tensor, metric: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(rows (B, L', K), protos (M, K), centre (B, K))`` in the compute dtype, ``centre``
    being what the metric averages: the mean patch (sqeuclidean, dot) or the mean unit patch
    (cosine)."""
    rows, protos = rows_and_protos(x, prototypes)
    if metric == "cosine":
        return rows, protos, (rows / rows.norm(dim=-1, keepdim=True).clamp_min(EPS)).mean(1)
    return rows, protos, rows.mean(1)


def mean_distance(x: Tensor, prototypes: Tensor, metric: str) -> Tensor:
    """Mean over positions of the distance, ``(B, M)`` in ``x.dtype``, in closed form (no
    ``(B, M, L')`` map, no GEMM over positions: one ``(B, K) x (K, M)`` product).

    - sqeuclidean: ``mean|r|^2 - 2 p.mean(r) + |p|^2``, taken about ``o``, the mean over the
      batch of the images' mean patches: ``spread + |a|^2 - 2 a.q + |q|^2`` with ``a = mean(r)
      - o``, ``q = p - o`` and ``spread = mean_l |r_l - c|^2 - |mean(r) - c|^2`` about each
      image's rounded mean patch ``c``. Shifted so, the terms are as small as the features'
      spread, not their distance from the origin: the expansion stays accurate far from it.
    - dot: ``-<mean(r), p>``.
    - cosine: ``1 - <mean_l r_l / |r_l|, p / |p|>`` (norms floored at `EPS`), in [0, 2].
    """
    rows, protos, centre = _mean_parts(x, prototypes, metric)
    if metric == "dot":
        return (-(centre @ protos.T)).to(x.dtype)
    if metric == "cosine":
        unit = protos / protos.norm(dim=-1, keepdim=True).clamp_min(EPS)
        return (1 - centre @ unit.T).clamp(0, 2).to(x.dtype)
    spread, shifted_mean, shifted_protos = _shifted(rows, protos, centre)
    squares = (spread + shifted_mean.square().sum(-1))[:, None] + shifted_protos.square().sum(-1)
    return (squares - 2 * shifted_mean @ shifted_protos.T).clamp_min(0).to(x.dtype)


def _shifted(rows: Tensor, protos: Tensor, centre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """sqeuclidean's mean, about the batch's mean patch ``o``: ``(spread (B,), mean(r) - o
    (B, K), protos - o (M, K))`` (see `mean_distance`)."""
    residual = rows - centre[:, None]
    drift = residual.mean(1)  # (B, K): mean(r) - c, the rounding of c
    spread = residual.square().sum(-1).mean(1) - drift.square().sum(-1)
    origin = finite_mean(centre)
    return spread, (centre - origin) + drift, protos - origin


def finite_mean(points: Tensor) -> Tensor:
    """The mean ``(K,)`` of ``points`` ``(n, K)``, their non-finite entries as 0: a shift of the
    origin for an expansion (any shift is exact; a NaN point must not spread to the others).
    `_shifted` takes it over the images' mean patches, `protokern.decompositions` over the
    prototypes."""
    return torch.where(points.isfinite(), points, 0).mean(0)


def _unit_grad(v: Tensor, grad_unit: Tensor) -> Tensor:
    """Gradient w.r.t. ``v`` (``(..., K)``) of ``<grad_unit, v / max(|v|, EPS)>``."""
    norm = v.norm(dim=-1, keepdim=True)
    bound = norm.clamp_min(EPS)
    unit = v / bound
    radial = torch.where(norm >= EPS, (unit * grad_unit).sum(-1, keepdim=True), 0)
    return (grad_unit - radial * unit) / bound


def mean_distance_backward(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, metric: str,
    needs_x: bool = True, needs_prototypes: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``sum(grad_values * mean_distance(x, prototypes))`` (``grad_values``
    ``(B, M)``) w.r.t. both inputs (None for one not asked for, which is then not computed),
    in closed form: every position gets ``1 / L'`` of its image's gradient."""
    rows, protos, centre = _mean_parts(x, prototypes, metric)
    grad = grad_values.to(rows.dtype)
    length = rows.shape[1]
    grad_rows = grad_protos = None
    if metric == "sqeuclidean":
        # d/dr_l = 2 (r_l - p) / L' = 2 ((r_l - c) + (c - o) - (p - o)) / L', d/dp = 2 (p - mean(r))
        # = 2 ((p - o) - (mean(r) - o)): the forward's shifted terms, no cancellation
        _, shifted_mean, shifted_protos = _shifted(rows, protos, centre)
        if needs_x:
            total = grad.sum(1)  # (B,)
            pulls = total[:, None] * (centre - finite_mean(centre)) - grad @ shifted_protos
            grad_rows = (2 / length) * (total[:, None, None] * (rows - centre[:, None])
                                        + pulls[:, None, :])
        if needs_prototypes:
            grad_protos = 2 * (grad.sum(0)[:, None] * shifted_protos - grad.T @ shifted_mean)
    elif metric == "dot":
        if needs_x:
            grad_rows = (-(grad @ protos) / length)[:, None, :].expand_as(rows)
        if needs_prototypes:
            grad_protos = -(grad.T @ centre)
    else:  # d = 1 - <c, q>, c = mean_l unit(r_l), q = unit(p)
        unit = protos / protos.norm(dim=-1, keepdim=True).clamp_min(EPS)
        if needs_x:
            grad_centre = -(grad @ unit)  # (B, K)
            grad_rows = _unit_grad(rows, (grad_centre / length)[:, None, :].expand_as(rows))
        if needs_prototypes:
            grad_protos = _unit_grad(protos, -(grad.T @ centre))
    return _fold_grads(grad_rows, grad_protos, x, prototypes)


register_backend(Backend(
    name="reference",
    kernels={
        "min_distance": min_distance,
        "min_distance_backward": min_distance_backward,
        "distance_map": distance_map,
        "distance_map_backward": distance_map_backward,
        "nearest_prototypes": nearest_prototypes,
        "nearest_prototypes_backward": nearest_prototypes_backward,
        "topk_distance": topk_distance,
        "topk_distance_backward": topk_backward_through(min_distance_backward),
        "mean_distance": mean_distance,
        "mean_distance_backward": mean_distance_backward,
    },
))
