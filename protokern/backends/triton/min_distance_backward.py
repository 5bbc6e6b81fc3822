"""Backward of `protokern.ops.min_distance` from the saved positions.

With ``r`` the chosen window of image ``b`` for prototype ``m`` and ``g`` its incoming
gradient, the window gets ``a r - c p`` and the prototype ``e p - c r``, where ``(a, c, e)`` are
per-pair coefficients (sqeuclidean: all ``2 g``, and the differences are taken first; cosine:
`_cosine_coefficients_kernel`, the formulas of
`protokern.backends.reference.distance_at_grad`). Then:

- ``grad_prototypes``: `_prototype_gather_kernel`, each program sums over images in order, so it
  is deterministic;
- ``grad_x``: `_window_scatter_kernel` adds each pair's window gradient with atomics (fast, the
  order of additions varies), or, when ``torch.are_deterministic_algorithms_enabled()``,
  `_bucketed_gather_kernel` sums, for every pixel, over the windows covering it and the
  prototypes that chose each window (bucketed by position per image), in a fixed order.

Accumulated in float32 (float64 for float64 inputs), returned in the inputs' dtypes.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from protokern.backends.triton import launch, tiles

# gathers and scatters, memory-bound: one configuration each
PAIRS = launch.fixed_config({"BLOCK_M": 32, "BLOCK_K": 32}, {"BLOCK_M": 128, "BLOCK_K": 128})
PIXELS = launch.fixed_config({"BLOCK_D": 64}, {"BLOCK_D": 128}, num_warps=2)


@triton.jit
def _pair_gradient(u, v, a, c, METRIC: tl.constexpr):
    """Gradient ``a u - c v`` of a pair's distance w.r.t. ``u`` (a window or a prototype, ``v``
    the other; ``a``/``c`` per row). Sqeuclidean (``a == c``) takes the difference first, as
    the reference does: ``u - v`` is exact where ``u`` and ``v`` are close (a prototype pushed
    onto a patch), where ``a u - c v`` would cancel."""
    if METRIC == "sqeuclidean":
        return c[:, None] * (u - v)
    # cosine's a, c are float64 (see min_distance_backward); the products fit u's dtype
    return (a[:, None] * u - c[:, None] * v).to(u.dtype)


@triton.jit
def pair_coefficients(x_ptr, x_rows, p_ptr, p_rows, ok, grad_ptr, pair, a_ptr, c_ptr, e_ptr, K,
                      PH, PW, sxd, sxh, sxw, spd, sph, spw,
                      ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Stores the cosine coefficients ``(a, c, e)`` of ``BLOCK`` pairs (windows at ``x_rows``,
    prototypes at ``p_rows``, incoming gradients at ``grad_ptr + pair``) at ``pair``: the
    formulas of `protokern.backends.reference.distance_at_grad`, in ``ACC``."""
    dots = tl.zeros((BLOCK,), ACC)
    x_sq = tl.zeros((BLOCK,), ACC)
    p_sq = tl.zeros((BLOCK,), ACC)
    for k0 in range(0, K, BLOCK_K):
        x, p = tiles.load_pairs(x_ptr, x_rows, p_ptr, p_rows, ok, k0, K, PH, PW,
                                sxd, sxh, sxw, spd, sph, spw, False, ACC, BLOCK_K)
        dots += tl.sum(x * p, axis=1)
        x_sq += tl.sum(x * x, axis=1)
        p_sq += tl.sum(p * p, axis=1)
    # d = 1 - s / (u v), u = max(|r|, EPS), v = max(|p|, EPS); the bound passes no gradient
    x_norm = tl.sqrt(x_sq)
    p_norm = tl.sqrt(p_sq)
    x_bound = tl.where(x_norm < tiles.EPS, tiles.EPS, x_norm)
    p_bound = tl.where(p_norm < tiles.EPS, tiles.EPS, p_norm)
    scale = tl.load(grad_ptr + pair, mask=ok, other=0.0) / (x_bound * p_bound)
    a = tl.where(x_norm >= tiles.EPS, scale * dots / (x_bound * x_bound), 0.0)
    e = tl.where(p_norm >= tiles.EPS, scale * dots / (p_bound * p_bound), 0.0)
    tl.store(a_ptr + pair, a, mask=ok)
    tl.store(c_ptr + pair, scale, mask=ok)
    tl.store(e_ptr + pair, e, mask=ok)


@triton.jit
def _cosine_coefficients_kernel(
    x_ptr, p_ptr, indices_ptr, grad_ptr, a_ptr, c_ptr, e_ptr,
    M, K, OUT_W, PH, PW, sxb, sxd, sxh, sxw, spm, spd, sph, spw,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    image = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = m < M
    pair = image.to(tl.int64) * M + m
    chosen = tl.load(indices_ptr + pair, mask=ok, other=0)
    x_rows = tiles.window_offsets(image, chosen, OUT_W, sxb, sxh, sxw)
    p_rows = m.to(tl.int64) * spm
    pair_coefficients(x_ptr, x_rows, p_ptr, p_rows, ok, grad_ptr, pair, a_ptr, c_ptr, e_ptr, K,
                      PH, PW, sxd, sxh, sxw, spd, sph, spw, ACC, BLOCK_M, BLOCK_K)


@triton.jit
def _prototype_gather_kernel(
    x_ptr, p_ptr, indices_ptr, c_ptr, e_ptr, out_ptr,
    B, M, K, OUT_W, PH, PW, sxb, sxd, sxh, sxw, spm, spd, sph, spw,
    METRIC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = m < M
    mask = ok[:, None] & (k < K)[None, :]
    x_entries = tiles.entry_offsets(k, PH, PW, sxd, sxh, sxw)
    p = tl.load(p_ptr + m.to(tl.int64)[:, None] * spm
                + tiles.entry_offsets(k, PH, PW, spd, sph, spw)[None, :],
                mask=mask, other=0.0).to(ACC)
    total = tl.zeros((BLOCK_M, BLOCK_K), ACC)
    for image in range(0, B):
        pair = tl.cast(image, tl.int64) * M + m  # B M may pass 2**31
        chosen = tl.load(indices_ptr + pair, mask=ok, other=0)
        x_rows = tiles.window_offsets(image, chosen, OUT_W, sxb, sxh, sxw)
        x = tl.load(x_ptr + x_rows[:, None] + x_entries[None, :], mask=mask, other=0.0).to(ACC)
        total += _pair_gradient(p, x, tl.load(e_ptr + pair, mask=ok, other=0.0),
                                tl.load(c_ptr + pair, mask=ok, other=0.0), METRIC)
    # out is (M, K) contiguous
    tl.store(out_ptr + m.to(tl.int64)[:, None] * K + k[None, :], total, mask=mask)


@triton.jit
def _window_scatter_kernel(
    x_ptr, p_ptr, indices_ptr, a_ptr, c_ptr, out_ptr,
    M, K, OUT_W, PH, PW, sxb, sxd, sxh, sxw, spm, spd, sph, spw, sob, sod, soh, sow,
    METRIC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    image = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = m < M
    pair = image.to(tl.int64) * M + m
    chosen = tl.load(indices_ptr + pair, mask=ok, other=0)
    x_rows = tiles.window_offsets(image, chosen, OUT_W, sxb, sxh, sxw)
    out_rows = tiles.window_offsets(image, chosen, OUT_W, sob, soh, sow)
    a = tl.load(a_ptr + pair, mask=ok, other=0.0)
    c = tl.load(c_ptr + pair, mask=ok, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x, p = tiles.load_pairs(x_ptr, x_rows, p_ptr, m.to(tl.int64) * spm, ok, k0, K, PH, PW,
                                sxd, sxh, sxw, spd, sph, spw, False, ACC, BLOCK_K)
        target = out_rows[:, None] + tiles.entry_offsets(k, PH, PW, sod, soh, sow)[None, :]
        # relaxed: the adds only accumulate (nothing reads grad_x until the kernel ends), so
        # the default acq_rel ordering, B M K times, would buy nothing
        tl.atomic_add(out_ptr + target, _pair_gradient(x, p, a, c, METRIC),
                      mask=ok[:, None] & (k < K)[None, :], sem="relaxed")


@triton.jit
def _bucketed_gather_kernel(
    x_ptr, p_ptr, order_ptr, starts_ptr, a_ptr, c_ptr, out_ptr,
    M, D, H, W, L, OUT_H, OUT_W, PH, PW, sxb, sxd, sxh, sxw, spm, spd, sph, spw,
    METRIC: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pixel = tl.program_id(0)  # over (B, H, W), row-major
    image = pixel // (H * W)
    h = (pixel // W) % H
    w = pixel % W
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    x = tl.load(x_ptr + image.to(tl.int64) * sxb + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
                + d.to(tl.int64) * sxd, mask=d_ok, other=0.0).to(ACC)
    total = tl.zeros((1, BLOCK_D), ACC)
    # windows (h - i, w - j) cover the pixel with their entry (i, j); each window's bucket lists
    # the prototypes that chose it, in increasing order
    for i in range(0, PH):
        for j in range(0, PW):
            oh = h - i
            ow = w - j
            if (oh >= 0) & (oh < OUT_H) & (ow >= 0) & (ow < OUT_W):
                bucket = image.to(tl.int64) * (L + 1) + oh * OUT_W + ow
                first = tl.load(starts_ptr + bucket)
                last = tl.load(starts_ptr + bucket + 1)
                for slot in range(first, last):
                    m = tl.load(order_ptr + image.to(tl.int64) * M + slot)
                    pair = image.to(tl.int64) * M + m + tl.zeros((1,), tl.int64)
                    # i, j are 32-bit: widen before the stride products (i sph may pass 2**31)
                    p = tl.load(p_ptr + m * spm + d.to(tl.int64) * spd
                                + tl.cast(i, tl.int64) * sph + tl.cast(j, tl.int64) * spw,
                                mask=d_ok, other=0.0).to(ACC)
                    total += _pair_gradient(x[None, :], p[None, :], tl.load(a_ptr + pair),
                                            tl.load(c_ptr + pair), METRIC)
    # out is (B, D, H, W) contiguous
    out = ((image.to(tl.int64) * D + d) * H + h) * W + w
    tl.store(out_ptr + out, tl.reshape(total, (BLOCK_D,)), mask=d_ok)


def min_distance_backward(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor, metric: str,
    needs_x: bool = True, needs_prototypes: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """`protokern.backends.reference.min_distance_backward` on canonical inputs (see the module
    doc); a gradient not asked for is None and its kernel does not run."""
    batch, dim, height, width = x.shape
    num, _, ph, pw = prototypes.shape
    out_h, out_w = height - ph + 1, width - pw + 1
    size = dim * ph * pw
    launch.check_positions(out_h * out_w, "min_distance_backward", x, prototypes)
    pairs_m, pairs_k = PAIRS.kwargs["BLOCK_M"], PAIRS.kwargs["BLOCK_K"]
    grids = [(batch, triton.cdiv(num, pairs_m)),
             (triton.cdiv(num, pairs_m), triton.cdiv(size, pairs_k))]
    if torch.are_deterministic_algorithms_enabled():
        grids.append((batch * height * width, triton.cdiv(dim, PIXELS.kwargs["BLOCK_D"])))
    for grid in grids:
        launch.check_grid(grid, "min_distance_backward", x, prototypes)
    acc_dtype, acc = launch.accumulator(x.dtype)
    grad_x = torch.zeros(x.shape, dtype=acc_dtype, device=x.device) if needs_x else None
    grad_p = torch.zeros(num, size, dtype=acc_dtype, device=x.device) if needs_prototypes else None
    if batch > 0 and num > 0 and size > 0 and (needs_x or needs_prototypes):
        _launch_backward(grad_values, x, prototypes, indices, metric, grad_x, grad_p, acc)
    return (None if grad_x is None else grad_x.to(x.dtype),
            None if grad_p is None else grad_p.reshape(prototypes.shape).to(prototypes.dtype))


def _launch_backward(grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor,
                     metric: str, grad_x: Tensor | None, grad_p: Tensor | None, acc) -> None:
    """Fills ``grad_x`` and ``grad_p`` (each None when not wanted) for non-empty inputs."""
    batch, dim, height, width = x.shape
    num, _, ph, pw = prototypes.shape
    out_h, out_w = height - ph + 1, width - pw + 1
    size = dim * ph * pw
    grad = grad_values.to(grad_p.dtype if grad_p is not None else grad_x.dtype).contiguous()
    indices = indices.contiguous()
    addressing = (out_w, ph, pw, *x.stride(), *prototypes.stride())
    pair_blocks = triton.cdiv(num, PAIRS.kwargs["BLOCK_M"])
    with launch.on_device(x):
        if metric == "sqeuclidean":
            a = c = e = 2 * grad
        else:
            # In float64: for float32 inputs with norms past ~1e19, |v|^2 overflows float32 and
            # the coefficients (~ g / |v|^2) underflow it, though the gradients are in range.
            a, c, e = (torch.empty_like(grad, dtype=torch.float64) for _ in range(3))
            launch.Fixed(_cosine_coefficients_kernel, PAIRS)[(batch, pair_blocks)](
                x, prototypes, indices, grad, a, c, e, num, size, *addressing, ACC=tl.float64)
        if grad_p is not None:
            launch.Fixed(_prototype_gather_kernel, PAIRS)[
                (pair_blocks, triton.cdiv(size, PAIRS.kwargs["BLOCK_K"]))
            ](x, prototypes, indices, c, e, grad_p, batch, num, size, *addressing,
              METRIC=metric, ACC=acc)
        if grad_x is None:
            return
        if torch.are_deterministic_algorithms_enabled():
            order, starts = _buckets(indices, out_h * out_w)
            launch.Fixed(_bucketed_gather_kernel, PIXELS)[
                (batch * height * width, triton.cdiv(dim, PIXELS.kwargs["BLOCK_D"]))
            ](x, prototypes, order, starts, a, c, grad_x, num, dim, height, width,
              out_h * out_w, out_h, *addressing, METRIC=metric, ACC=acc)
        else:
            launch.Fixed(_window_scatter_kernel, PAIRS)[(batch, pair_blocks)](
                x, prototypes, indices, a, c, grad_x, num, size, *addressing, *grad_x.stride(),
                METRIC=metric, ACC=acc)


def _buckets(indices: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Prototypes bucketed by chosen position, per image: ``order`` ``(B, M)`` lists each
    image's prototypes by position (stable: increasing within a position), and bucket ``l`` is
    ``order[b, starts[b, l]:starts[b, l + 1]]``; ``starts`` ``(B, L + 1)``."""
    positions, order = torch.sort(indices, dim=1, stable=True)
    bounds = torch.arange(length + 1, device=indices.device).expand(indices.shape[0], -1)
    return order.contiguous(), torch.searchsorted(positions, bounds.contiguous())
