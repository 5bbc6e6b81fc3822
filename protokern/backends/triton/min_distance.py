"""Fused forward of `protokern.ops.min_distance`: two kernels.

1. `_choose_kernel`, per (block of images, block of prototypes): streams tiles of windows and
   channels through ``tl.dot``, adds the norms (sqeuclidean) or divides by them (cosine), and
   keeps in registers, per pair and over positions, the smallest lower bound of the true
   distance (the expansion minus its rounding bound, the reference's), its position, the
   runner-up lower bound and the smallest upper bound. It writes the position when the bounds
   certify it (the runner-up is above every upper bound: no other position can be the minimum),
   else -1: ties, near-ties within the rounding and non-finite distances or norms (NaN, inf,
   overflow).
2. `_exact_kernel`, per (image, block of prototypes): recomputes the value at the chosen
   position directly (no expansion, accumulated in float32, float64 for float64), and for pairs
   marked -1 searches every position directly, the first exact minimum winning; NaN wins at its
   first position, as in `torch.min`.

So ties go to the lowest index and a prototype pushed onto a patch finds that patch, whatever
the GEMM's rounding (which differs between rows in Triton's interpreter, and may on a GPU).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from protokern.backends.triton import launch, tiles


def _config(rows, block_m, block_k, warps, stages):
    return triton.Config({"BLOCK_ROWS": rows, "BLOCK_M": block_m, "BLOCK_K": block_k},
                         num_warps=warps, num_stages=stages)


CONFIGS = [
    _config(*c)
    for c in [(64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3),
              (128, 128, 32, 8, 3), (64, 64, 64, 4, 3), (128, 128, 64, 8, 2),
              (32, 64, 64, 4, 3), (128, 256, 32, 8, 3)]
]
"""Autotuned on a GPU, keyed on the problem's shape, metric and dot precision."""

INTERPRETED = _config(128, 128, 128, 4, 1)
"""The one configuration run in the interpreter, whose cost is per operation, not per element:
large tiles, few programs."""

EXACT = launch.fixed_config({"BLOCK_M": 64, "BLOCK_K": 32}, {"BLOCK_M": 128, "BLOCK_K": 128})
"""`_exact_kernel`: gathers, no tuning."""


@launch.tuned(CONFIGS, key=["L", "K", "M", "METRIC", "PRECISION"], interpreted=INTERPRETED)
@launch.tile_rows
@triton.jit
def _choose_kernel(
    x_ptr, p_ptr, indices_ptr,
    B, M, L, K, OUT_W, PH, PW,
    sxb, sxd, sxh, sxw, spm, spd, sph, spw, GROWTH, FLOOR,
    METRIC: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, HUGE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr, IMAGES: tl.constexpr,
):
    first_image = tl.program_id(0) * IMAGES
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    p_ok = m < M
    p_rows = m.to(tl.int64) * spm
    p_sq = tiles.squared_norms(p_ptr, p_rows, p_ok, K, PH, PW, spd, sph, spw,
                               ACC, BLOCK_M, BLOCK_K)
    # NaN, inf or squares so large that sums overflow: the expansion cannot bound the pair
    p_bad = ~(p_sq <= HUGE)
    # tile row r is position r % BLOCK_L (plus the chunk's start) of image r // BLOCK_L
    row = tl.arange(0, BLOCK_ROWS)
    row_image = first_image + row // BLOCK_L
    slot = tl.arange(0, BLOCK_L)[None, :, None]
    # Per (image, prototype): the smallest lower bound of the true distance over positions, its
    # position, the smallest lower bound at any other position, the smallest upper bound.
    lowest = tl.full((IMAGES, BLOCK_M), float("inf"), ACC)
    lowest_at = tl.zeros((IMAGES, BLOCK_M), tl.int32)
    runner_up = tl.full((IMAGES, BLOCK_M), float("inf"), ACC)
    upper = tl.full((IMAGES, BLOCK_M), float("inf"), ACC)
    image_bad = tl.zeros((IMAGES,), tl.int32)
    for start in range(0, L, BLOCK_L):
        position = tiles.chunk_positions(start, row, BLOCK_L)
        x_ok = (row_image < B) & (position < L)
        x_rows = tiles.window_offsets(row_image, position, OUT_W, sxb, sxh, sxw)
        dots, x_sq = tiles.dot_products(
            x_ptr, x_rows, x_ok, p_ptr, p_rows, p_ok, K, PH, PW, sxd, sxh, sxw, spd, sph, spw,
            PRECISION, ACC, BLOCK_ROWS, BLOCK_M, BLOCK_K)
        x_bad = ~(x_sq <= HUGE) & x_ok
        image_bad = tl.maximum(image_bad, tl.max(tl.reshape(x_bad.to(tl.int32),
                                                            (IMAGES, BLOCK_L)), axis=1))
        low, high = tiles.distance_bounds(dots, x_sq, p_sq, GROWTH, FLOOR, METRIC)
        skip = (x_bad | ~x_ok)[:, None] | p_bad[None, :]
        low = tl.reshape(tl.where(skip, float("inf"), low), (IMAGES, BLOCK_L, BLOCK_M))
        high = tl.reshape(tl.where(skip, float("inf"), high), (IMAGES, BLOCK_L, BLOCK_M))
        chunk_low, chunk_at = tl.min(low, axis=1, return_indices=True,
                                     return_indices_tie_break_left=True)
        chunk_runner_up = tl.min(tl.where(slot == chunk_at[:, None, :], float("inf"), low), axis=1)
        runner_up = tl.minimum(tl.minimum(runner_up, chunk_runner_up),
                               tl.maximum(lowest, chunk_low))
        better = chunk_low < lowest  # strictly: on a tie the earlier chunk keeps its position
        lowest = tl.where(better, chunk_low, lowest)
        lowest_at = tl.where(better, start + chunk_at, lowest_at)
        upper = tl.minimum(upper, tl.min(high, axis=1))
    # Certified: every other position's lower bound is above the smallest upper bound, so the
    # true minimum can only be at `lowest_at`. Otherwise (ties, near-ties within the rounding,
    # non-finite or huge entries) -1 sends the pair to the direct search of _exact_kernel.
    certified = (image_bad == 0)[:, None] & ~p_bad[None, :] & (runner_up > upper)
    image = first_image + tl.arange(0, IMAGES)
    out = image.to(tl.int64)[:, None] * M + m[None, :]
    tl.store(indices_ptr + out, tl.where(certified, lowest_at, -1).to(tl.int64),
             mask=(image < B)[:, None] & p_ok[None, :])


@triton.jit
def _exact_kernel(
    x_ptr, p_ptr, values_ptr, indices_ptr,
    M, L, K, OUT_W, PH, PW,
    sxb, sxd, sxh, sxw, spm, spd, sph, spw,
    METRIC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    image = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = m < M
    out = image.to(tl.int64) * M + m
    p_rows = m.to(tl.int64) * spm
    chosen = tl.load(indices_ptr + out, mask=ok, other=0)
    value = tiles.direct_distances(
        x_ptr, tiles.window_offsets(image, chosen, OUT_W, sxb, sxh, sxw), p_ptr, p_rows,
        ok & (chosen >= 0), K, PH, PW, sxd, sxh, sxw, spd, sph, spw,
        METRIC, False, ACC, BLOCK_M, BLOCK_K)
    search = ok & (chosen < 0)
    if tl.max(search.to(tl.int32), axis=0) > 0:
        best = tl.full((BLOCK_M,), float("inf"), ACC)
        best_at = tl.zeros((BLOCK_M,), tl.int64)
        for position in range(0, L):
            x_rows = tl.zeros((BLOCK_M,), tl.int64) + tiles.window_offsets(
                image, position, OUT_W, sxb, sxh, sxw)
            dist = tiles.direct_distances(
                x_ptr, x_rows, p_ptr, p_rows, search, K, PH, PW, sxd, sxh, sxw, spd, sph, spw,
                METRIC, True, ACC, BLOCK_M, BLOCK_K)
            # the first minimum, or the first NaN, which then stays
            take = (dist < best) | ((dist != dist) & (best == best))
            best = tl.where(take, dist, best)
            best_at = tl.where(take, position, best_at)
        value = tl.where(search, best, value)
        chosen = tl.where(search, best_at, chosen)
        tl.store(indices_ptr + out, chosen, mask=search)
    tl.store(values_ptr + out, value.to(values_ptr.dtype.element_ty), mask=ok)


def rounding_bound(x: Tensor, size: int, metric: str) -> tuple[float, float]:
    """``(growth, floor)``: the expansion of a pair of ``size``-entry vectors is within
    ``growth * (|x|^2 + |p|^2) + floor`` of its exactly rounded inputs' truth (sqeuclidean;
    cosine: within ``growth``), the summation bound of
    `protokern.backends.reference.expanded_distance` plus a few eps for the kernel's own
    rearrangements (its norms, the clamp).

    TF32's rounding of the inputs is left out on purpose: it is the same for identical windows,
    so exact ties are still caught, and the contract lets near-ties within TF32's tolerance
    move; counting it would send most pairs to the slow direct search."""
    finfo = torch.finfo(launch.accumulator(x.dtype)[0])
    if metric == "sqeuclidean":
        return (size + 12) * finfo.eps, 4 * (size + 1) * finfo.tiny
    return (2 * size + 12) * finfo.eps, 0.0


def min_distance(x: Tensor, prototypes: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """`protokern.backends.reference.min_distance` on canonical inputs, fused (see the module
    doc)."""
    batch, dim, height, width = x.shape
    num, _, ph, pw = prototypes.shape
    out_w = width - pw + 1
    length = (height - ph + 1) * out_w
    launch.check_positions(length, "min_distance", x, prototypes)
    configs = [INTERPRETED] if launch.INTERPRET else CONFIGS
    launch.check_grid((batch, triton.cdiv(num, launch.smallest_block(configs, "BLOCK_M"))),
                      "min_distance", x, prototypes)
    launch.check_grid((batch, triton.cdiv(num, EXACT.kwargs["BLOCK_M"])), "min_distance", x,
                      prototypes)
    values = torch.empty(batch, num, dtype=x.dtype, device=x.device)
    indices = torch.empty(batch, num, dtype=torch.int64, device=x.device)
    if values.numel() == 0:
        return values, indices
    _, acc = launch.accumulator(x.dtype)
    shape = (length, dim * ph * pw, out_w, ph, pw, *x.stride(), *prototypes.stride())
    growth, floor = rounding_bound(x, dim * ph * pw, metric)

    def grid(meta):
        return triton.cdiv(batch, meta["IMAGES"]), triton.cdiv(num, meta["BLOCK_M"])

    with launch.on_device(x):
        _choose_kernel[grid](x, prototypes, indices, batch, num, *shape, growth, floor,
                             METRIC=metric, PRECISION=launch.dot_precision(x), ACC=acc,
                             HUGE=launch.huge(x.dtype))
        launch.Fixed(_exact_kernel, EXACT)[
            lambda meta: (batch, triton.cdiv(num, meta["BLOCK_M"]))
        ](x, prototypes, values, indices, num, *shape, METRIC=metric, ACC=acc)
    return values, indices
