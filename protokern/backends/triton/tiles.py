"""Device functions shared by the kernels: window addressing, the GEMM expansion over a tile,
and direct (non-expanded) distances.

Addressing is implicit im2col: the flat window entry ``k = (d, i, j)`` (channel, then window row,
then column, like ``prototypes.reshape(M, -1)``) of window ``(oh, ow)`` of image ``b`` lies at
``b s_b + (oh + i) s_h + (ow + j) s_w + d s_d``, which splits into a per-window part
(`window_offsets`) and a per-entry part (`entry_offsets`), so a tile's addresses are an outer sum
and nothing is unfolded in memory. Offsets are int64: ``B L D`` and ``B M`` may exceed 2**31.

``CONTIGUOUS`` (a constexpr of the functions that load tiles): the windows are 1x1 and channels
have stride 1 (`protokern.backends.triton.launch.contiguous_entries` makes them so), so entry
``k`` is at offset ``k``. The compiler then sees rows of contiguous entries and loads them as
vectors (``cp.async`` on sm_80+); through `entry_offsets`' divisions it must load every entry
alone, with one 64-bit address per entry, which spilled registers.
"""

import triton
import triton.language as tl

from protokern.backends import reference
from protokern.backends.triton import INTERPRET

EPS = tl.constexpr(reference.EPS)

# The interpreter multiplies bfloat16 operands of tl.dot as their raw uint16 bit patterns
# (triton 3.x), so there bfloat16 tiles go through the dot as float32 (exact: same products).
_UPCAST_BFLOAT16_DOT = tl.constexpr(INTERPRET)


@triton.jit
def window_offsets(image, position, OUT_W, s_b, s_h, s_w):
    """Offset of the top-left entry of window ``divmod(position, OUT_W)`` of ``image``."""
    oh = position // OUT_W
    ow = position - oh * OUT_W
    # tl.cast also takes the plain ints of interpreted loop counters
    return (tl.cast(image, tl.int64) * s_b + tl.cast(oh, tl.int64) * s_h
            + tl.cast(ow, tl.int64) * s_w)


@triton.jit
def chunk_positions(start, row, BLOCK_L: tl.constexpr):
    """Position ``start + row % BLOCK_L`` of each tile row, in int64: near the 2**31 - 1
    positions an image may have, the sum passes int32's range for the chunk's padding rows."""
    return tl.cast(start, tl.int64) + (row % BLOCK_L).to(tl.int64)


@triton.jit
def entry_offsets(k, PH, PW, s_d, s_h, s_w):
    """Offset of flat window entry ``k = (d, i, j)`` from the window's top-left entry."""
    area = PH * PW
    d = k // area
    rest = k - d * area
    i = rest // PW
    j = rest - i * PW
    return d.to(tl.int64) * s_d + i.to(tl.int64) * s_h + j.to(tl.int64) * s_w


@triton.jit
def entries(k, PH, PW, s_d, s_h, s_w, CONTIGUOUS: tl.constexpr):
    """Offsets of flat window entries ``k``: ``k`` itself where ``CONTIGUOUS`` (see the module
    doc), else `entry_offsets`."""
    if CONTIGUOUS:
        return k.to(tl.int64)  # one return type for both branches
    return entry_offsets(k, PH, PW, s_d, s_h, s_w)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    if _UPCAST_BFLOAT16_DOT:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    # out_dtype from the accumulator: Triton 3.6 (the device image's) defaults it to float32 and
    # rejects a float64 accumulator without it; 3.9 infers it.
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def squared_norms(p_ptr, p_rows, p_ok, K, PH, PW, s_d, s_h, s_w, CONTIGUOUS: tl.constexpr,
                  ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``|p|^2`` of the prototypes (or windows) at offsets ``p_rows`` ``(BLOCK_M,)``, summed
    per ``BLOCK_K`` entries in a fixed order."""
    total = tl.zeros((BLOCK_M,), ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        offsets = p_rows[:, None] + entries(k, PH, PW, s_d, s_h, s_w, CONTIGUOUS)[None, :]
        p = tl.load(p_ptr + offsets,
                    mask=p_ok[:, None] & (k < K)[None, :], other=0.0).to(ACC)
        total += tl.sum(p * p, axis=1)
    return total


@triton.jit
def inner_products(a_ptr, a_rows, a_ok, sad, sah, saw, b_ptr, b_rows, b_ok, sbd, sbh, sbw,
                   K, PH, PW, CONTIGUOUS: tl.constexpr, PRECISION: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Inner products ``(BLOCK_A, BLOCK_B)`` of the windows (or prototypes) at ``a_rows`` with
    those at ``b_rows`` (entry strides ``sad, sah, saw`` and ``sbd, sbh, sbw``), one ``tl.dot``
    per ``BLOCK_K`` entries; zero where ``a_ok``/``b_ok`` is false. Nothing but the dot uses
    the loaded tiles, so they stay in shared memory (pipelined) instead of registers."""
    dots = tl.zeros((BLOCK_A, BLOCK_B), ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(a_ptr + a_rows[:, None]
                    + entries(k, PH, PW, sad, sah, saw, CONTIGUOUS)[None, :],
                    mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[None, :]
                    + entries(k, PH, PW, sbd, sbh, sbw, CONTIGUOUS)[:, None],
                    mask=k_ok[:, None] & b_ok[None, :], other=0.0)
        dots = dot(a, b, dots, PRECISION)
    return dots


@triton.jit
def dot_products(x_ptr, x_rows, x_ok, p_ptr, p_rows, p_ok, K, PH, PW,
                 sxd, sxh, sxw, spd, sph, spw, CONTIGUOUS: tl.constexpr,
                 PRECISION: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Inner products ``(BLOCK_ROWS, BLOCK_M)`` of the windows at ``x_rows`` with the prototypes
    at ``p_rows`` (`inner_products`), and the windows' squared norms ``(BLOCK_ROWS,)``; zero
    where ``x_ok``/``p_ok`` is false."""
    dots = inner_products(x_ptr, x_rows, x_ok, sxd, sxh, sxw, p_ptr, p_rows, p_ok,
                          spd, sph, spw, K, PH, PW, CONTIGUOUS, PRECISION, ACC,
                          BLOCK_ROWS, BLOCK_M, BLOCK_K)
    x_sq = squared_norms(x_ptr, x_rows, x_ok, K, PH, PW, sxd, sxh, sxw, CONTIGUOUS, ACC,
                         BLOCK_ROWS, BLOCK_K)
    return dots, x_sq


@triton.jit
def expanded_distances(x_ptr, x_rows, x_ok, p_ptr, p_rows, p_ok, p_sq, K, PH, PW,
                       sxd, sxh, sxw, spd, sph, spw, CONTIGUOUS: tl.constexpr,
                       METRIC: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Distances ``(BLOCK_ROWS, BLOCK_M)`` between windows at ``x_rows`` and prototypes at
    ``p_rows`` (squared norms ``p_sq``) by the GEMM expansion.

    Clamps are ``where``s, not min/max, so that NaN stays NaN.
    """
    dots, x_sq = dot_products(x_ptr, x_rows, x_ok, p_ptr, p_rows, p_ok, K, PH, PW,
                              sxd, sxh, sxw, spd, sph, spw, CONTIGUOUS, PRECISION, ACC,
                              BLOCK_ROWS, BLOCK_M, BLOCK_K)
    if METRIC == "sqeuclidean":
        dist = x_sq[:, None] + p_sq[None, :] - 2 * dots
        return tl.where(dist < 0, 0.0, dist)
    x_norm = tl.sqrt(x_sq)
    p_norm = tl.sqrt(p_sq)
    x_norm = tl.where(x_norm < EPS, EPS, x_norm)
    p_norm = tl.where(p_norm < EPS, EPS, p_norm)
    dist = 1 - dots / (x_norm[:, None] * p_norm[None, :])
    return tl.where(dist < 0, 0.0, tl.where(dist > 2, 2.0, dist))


@triton.jit
def distance_bounds(dots, x_sq, p_sq, GROWTH, FLOOR, METRIC: tl.constexpr):
    """Lower and upper bounds ``(R, M)`` of the true distances, from the inner products
    ``dots`` and the squared norms ``x_sq`` ``(R,)``, ``p_sq`` ``(M,)``: the expansion minus /
    plus its rounding bound (`protokern.backends.triton.min_distance.rounding_bound`), folded
    into per-row and per-column terms so that only two tiles are made. Unclamped: valid
    bounds still (a true distance is never negative). Meaningful where both squared norms are
    finite and below ``max / 8`` (the caller skips the others)."""
    if METRIC == "sqeuclidean":
        low = ((1 - GROWTH) * x_sq - FLOOR)[:, None] + ((1 - GROWTH) * p_sq)[None, :] - 2 * dots
        high = ((1 + GROWTH) * x_sq + FLOOR)[:, None] + ((1 + GROWTH) * p_sq)[None, :] \
            - 2 * dots
    else:
        x_norm = tl.sqrt(x_sq)
        p_norm = tl.sqrt(p_sq)
        x_scale = 1 / tl.where(x_norm < EPS, EPS, x_norm)
        p_scale = 1 / tl.where(p_norm < EPS, EPS, p_norm)
        similarity = dots * x_scale[:, None] * p_scale[None, :]
        low = (1 - GROWTH) - similarity
        high = (1 + GROWTH) - similarity
    return low, high


@triton.jit
def bound_widths(x_sq, p_sq, GROWTH, FLOOR, METRIC: tl.constexpr):
    """``high - low`` ``(R, M)`` of `distance_bounds`, from the squared norms alone: with it a
    kernel keeps one bounds tile (and the inner products die early), not two."""
    if METRIC == "sqeuclidean":
        return (2 * GROWTH * x_sq + 2 * FLOOR)[:, None] + (2 * GROWTH * p_sq)[None, :]
    return (tl.zeros_like(x_sq)[:, None] + tl.zeros_like(p_sq)[None, :]) + 2 * GROWTH


@triton.jit
def _div(a, b):
    """IEEE-rounded division (float32 ``/`` may lower to a 2-ulp approximation)."""
    if a.dtype == tl.float32:
        return tl.div_rn(a, b)
    return a / b


@triton.jit
def _sqrt(a):
    """IEEE-rounded square root."""
    if a.dtype == tl.float32:
        return tl.sqrt_rn(a)
    return tl.sqrt(a)


@triton.jit
def load_pairs(x_ptr, x_rows, p_ptr, p_rows, ok, k0, K, PH, PW, sxd, sxh, sxw, spd, sph, spw,
               CONTIGUOUS: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """Entries ``k0 .. k0 + BLOCK_K`` of the windows at ``x_rows`` and of the prototypes at
    ``p_rows`` (both ``(BLOCK,)``, paired), as two ``(BLOCK, BLOCK_K)`` tiles in ``ACC``; zero
    where ``ok`` is false or past ``K``."""
    k = k0 + tl.arange(0, BLOCK_K)
    mask = ok[:, None] & (k < K)[None, :]
    x = tl.load(x_ptr + x_rows[:, None] + entries(k, PH, PW, sxd, sxh, sxw, CONTIGUOUS)[None, :],
                mask=mask, other=0.0)
    p = tl.load(p_ptr + p_rows[:, None] + entries(k, PH, PW, spd, sph, spw, CONTIGUOUS)[None, :],
                mask=mask, other=0.0)
    return x.to(ACC), p.to(ACC)


@triton.jit
def direct_distances(x_ptr, x_rows, p_ptr, p_rows, ok, K, PH, PW, sxd, sxh, sxw, spd, sph, spw,
                     CONTIGUOUS: tl.constexpr, METRIC: tl.constexpr, SCALED: tl.constexpr,
                     ACC: tl.constexpr,
                     BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Distances ``(BLOCK,)`` between the windows at ``x_rows`` and the prototypes at ``p_rows``
    (paired), computed directly (no expansion, so no cancellation) and accumulated in ``ACC``
    in a fixed order, so identical pairs give identical bits.

    ``SCALED`` (cosine only) first divides both vectors by their largest magnitude, so norms
    that overflow ``ACC`` still give the true value, at the cost of one more pass.
    """
    total = tl.zeros((BLOCK,), ACC)
    if METRIC == "sqeuclidean":
        for k0 in range(0, K, BLOCK_K):
            x, p = load_pairs(x_ptr, x_rows, p_ptr, p_rows, ok, k0, K, PH, PW,
                              sxd, sxh, sxw, spd, sph, spw, CONTIGUOUS, ACC, BLOCK_K)
            total += tl.sum((x - p) * (x - p), axis=1)
        return total
    x_floor = tl.full((BLOCK,), EPS, ACC)  # the norms' lower bound, scaled like the vectors
    p_floor = tl.full((BLOCK,), EPS, ACC)
    if SCALED:
        x_max = tl.zeros((BLOCK,), ACC)
        p_max = tl.zeros((BLOCK,), ACC)
        for k0 in range(0, K, BLOCK_K):
            x, p = load_pairs(x_ptr, x_rows, p_ptr, p_rows, ok, k0, K, PH, PW,
                              sxd, sxh, sxw, spd, sph, spw, CONTIGUOUS, ACC, BLOCK_K)
            x_max = tl.maximum(x_max, tl.max(tl.abs(x), axis=1))
            p_max = tl.maximum(p_max, tl.max(tl.abs(p), axis=1))
        # a zero vector keeps scale 1; a NaN entry stays NaN whatever the scale
        x_scale = tl.where(x_max > 0, x_max, 1.0)
        p_scale = tl.where(p_max > 0, p_max, 1.0)
        x_floor = _div(x_floor, x_scale)
        p_floor = _div(p_floor, p_scale)
    x_sq = tl.zeros((BLOCK,), ACC)
    p_sq = tl.zeros((BLOCK,), ACC)
    for k0 in range(0, K, BLOCK_K):
        x, p = load_pairs(x_ptr, x_rows, p_ptr, p_rows, ok, k0, K, PH, PW,
                          sxd, sxh, sxw, spd, sph, spw, CONTIGUOUS, ACC, BLOCK_K)
        if SCALED:
            x = _div(x, x_scale[:, None])
            p = _div(p, p_scale[:, None])
        total += tl.sum(x * p, axis=1)
        x_sq += tl.sum(x * x, axis=1)
        p_sq += tl.sum(p * p, axis=1)
    # max(|x|, floor) max(|p|, floor) as sqrt(|x|^2 |p|^2) of the floored squares: at a copy
    # (x == p: total, x_sq and p_sq are one sum) exactly total, so the distance is 0
    # (reference.cosine_denominator); the product of the norms where the product overflows.
    x_sq = tl.where(x_sq < x_floor * x_floor, x_floor * x_floor, x_sq)  # NaN stays NaN
    p_sq = tl.where(p_sq < p_floor * p_floor, p_floor * p_floor, p_sq)
    product = x_sq * p_sq
    overflow = product == float("inf")
    norms = tl.where(overflow, _sqrt(x_sq) * _sqrt(p_sq), _sqrt(tl.where(overflow, 1.0, product)))
    dist = 1 - _div(total, norms)
    return tl.where(dist < 0, 0.0, tl.where(dist > 2, 2.0, dist))
