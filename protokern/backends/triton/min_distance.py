"""Fused forward of `protokern.ops.min_distance`: two kernels.

1. `_choose_kernel`, per (block of images, block of prototypes): streams tiles of windows and
   channels through ``tl.dot``, adds the norms (sqeuclidean) or divides by them (cosine), and
   keeps in registers, per pair and over positions, the smallest lower bound of the true
   distance (the expansion minus its rounding bound, the reference's), its position, the
   runner-up lower bound and the smallest upper bound. The bounds certify the position when the
   runner-up is above every upper bound (no other position can be the minimum); ties, near-ties
   within the rounding and non-finite distances or norms (NaN, inf, overflow) do not certify.
   A certified pair's value is the expansion's where the tile's products are exact (IEEE
   float32, bfloat16/float16 operands, ``tf32x3``) and the expansion lost at most one bit to
   cancellation (its rounding bound within twice the direct float32 sum's own); else it is
   marked for recomputation. With TF32 operands (L > 1) no value comes from the tile: every
   certified pair's value is computed directly at its position in this kernel's epilogue
   (`values_at_positions`), while its windows and prototypes are in L2.
2. `_exact_kernel`, per (image, block of prototypes), touches only the pairs the first did not
   finish: it recomputes the marked values directly at the chosen position (no expansion,
   accumulated in float32, float64 for float64), and for uncertified pairs searches every
   position directly, the first exact minimum winning; NaN wins at its first position, as in
   `torch.min`. (It was a pass over every pair, reading ``2 K`` entries each: 63 GB at
   cil_vectors. benchmarks/NOTES.md has the bytes per shape.)

So ties go to the lowest index and a prototype pushed onto a patch finds that patch (and its
value, recomputed, is exact), whatever the GEMM's rounding (which differs between rows in
Triton's interpreter, and may on a GPU).

With 1x1 prototypes the kernels read ``x`` as rows of contiguous channels (``CONTIGUOUS``,
`launch.contiguous_entries`: NCHW maps are copied to channels_last first), so tiles load as
vectors, asynchronously (the compile report, with registers and spills per configuration:
benchmarks/results/triton-compile-report.md, `protokern.backends.triton.offline`).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from protokern.backends.triton import launch, tiles


def _config(rows, block_m, block_k, warps, stages):
    return triton.Config({"BLOCK_ROWS": rows, "BLOCK_M": block_m, "BLOCK_K": block_k},
                         num_warps=warps, num_stages=stages)


_TABLE = {
    # (target, dot, L = 1): [(rows, prototypes, entries, warps, stages)], each commented with
    # the most registers any benchmark shape and metric needs (of 255; none spills). FMA dots
    # hold their operands' K slices in registers, TF32 ones twice 16-bit ones' bytes: smaller K.
    ("sm_90", "half", False): [(64, 64, 64, 4, 3), (64, 128, 64, 4, 3),  # 195, 252
                               (128, 128, 16, 8, 3)],  # 234 (K 64: 255, K 32: 255, spilled)
    ("sm_90", "half", True): [(64, 64, 64, 4, 3), (64, 128, 64, 8, 3),  # 183, 179
                              (128, 64, 64, 8, 3)],  # 158
    ("sm_90", "tf32", False): [(64, 64, 64, 4, 3), (64, 128, 32, 4, 3),  # 219, 255
                               (128, 64, 64, 8, 3)],  # 221 (128 x 128 x 16 w8: 245 before the
                                                      # epilogue's direct values, then 24 bytes
                                                      # of spill at large_bank)
    ("sm_90", "tf32x3", True): [(64, 64, 64, 4, 3), (64, 128, 64, 8, 3),  # 239, 202
                                (128, 64, 64, 8, 3)],  # 214
    ("sm_90", "ieee", False): [(64, 64, 32, 4, 3), (64, 128, 32, 8, 3),  # 214, 226
                               (128, 64, 32, 8, 3)],  # 218 (128 x 128 spills at K 16)
    ("sm_90", "ieee", True): [(64, 64, 32, 4, 3), (64, 128, 32, 8, 3),  # 210, 170
                              (128, 64, 32, 8, 3)],  # 196
    ("sm_80", "half", False): [(64, 64, 64, 4, 3), (64, 128, 64, 8, 3),  # 217, 218
                               (128, 128, 32, 8, 3)],  # 255
    ("sm_80", "half", True): [(64, 64, 64, 4, 3), (64, 128, 64, 8, 3),  # 152, 154
                              (128, 64, 64, 8, 3)],  # 158
    ("sm_80", "tf32", False): [(64, 64, 64, 4, 3), (64, 128, 32, 8, 3),  # 244, 228
                               (128, 128, 16, 8, 3)],  # 252
    ("sm_80", "tf32x3", True): [(64, 64, 32, 4, 3), (64, 128, 32, 8, 3),  # 183, 186
                                (128, 64, 32, 8, 3)],  # 247
    ("sm_80", "ieee", False): [(64, 64, 16, 4, 3), (64, 128, 32, 8, 3),  # 255, 255
                               (128, 64, 32, 8, 3)],  # 255
    ("sm_80", "ieee", True): [(64, 64, 32, 4, 3), (64, 128, 32, 8, 3),  # 168, 198
                              (128, 64, 32, 8, 3)],  # 198
}


DEFAULTS = launch.config_lists(_TABLE, _config)
"""Per (target, dot, L = 1): the configurations `_choose_kernel` may run with, the first the
one deterministic runs take (`launch.Tuned.first`). Sized from the offline compile
(benchmarks/results/triton-compile-report.md, `protokern.backends.triton.offline`): on sm_90
and sm_80, for every dot, metric and benchmark shape, none spills registers
(tests/backends/test_triton_offline.py compiles each once in CI). Before they depended on the
target and the dot (BLOCK_K 64 everywhere, the same tiles for every dot), 84 of the report's
192 kernels spilled: float32 without TF32 in all (up to 960 stack bytes on sm_90, 6392 on
sm_80), TF32 in some, bfloat16 cosine on sm_90 and bfloat16 on sm_80 in a few."""

CONFIGS = list({id(c): c for configs in DEFAULTS.values() for c in configs}.values())
"""Every default configuration, autotuned on a GPU among those `configs_for` the call (its L,
dot kind and GPU: `prune_configs`), keyed on the problem's shape, metric, dot precision and
dtype."""


def configs_for(length: int, dot: str, target: str) -> list[triton.Config]:
    """The configurations `_choose_kernel` may run with ``length`` positions per image, a
    ``dot`` (`launch.dot_kind`; ``tf32`` has L > 1 only, ``tf32x3`` L = 1: `gemm_precision`) and a
    GPU of ``target`` (`launch.target_of`)."""
    return DEFAULTS[target, dot, length == 1]


prune_configs = launch.pruning(configs_for, "L")
"""The autotuner's candidates for a launch: `configs_for` its L, dot and GPU."""


INTERPRETED = _config(128, 128, 128, 4, 1)
"""The one configuration run in the interpreter, whose cost is per operation, not per element:
large tiles, few programs."""

EXACT = launch.fixed_config({"BLOCK_M": 64, "BLOCK_K": 32}, {"BLOCK_M": 128, "BLOCK_K": 128})
"""`_exact_kernel`: gathers, no tuning."""


@triton.jit
def window_bounds(p_ptr, p_rows, p_ok, p_sq, p_bad, x_ptr, x_rows, x_ok, K, PH, PW,
                   sxd, sxh, sxw, spd, sph, spw, GROWTH, FLOOR, CONTIGUOUS: tl.constexpr,
                   METRIC: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                   HUGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Lower and upper bounds ``(BLOCK_M, BLOCK_ROWS)`` of the distances between the
    prototypes and the windows at ``x_rows`` (inf where a pair cannot be bounded: NaN, inf or
    huge norms, or outside the problem), and which windows are bad ``(BLOCK_ROWS,)`` int32.

    Prototypes are the MMA's rows, so that the reductions over positions run along the
    accumulator's columns, within threads and quads; along its rows they crossed warps and
    spilled registers. The upper bound is the lower plus `tiles.bound_widths`, so that the
    inner products die with the lower bound."""
    dots = tiles.inner_products(p_ptr, p_rows, p_ok, spd, sph, spw, x_ptr, x_rows, x_ok,
                                sxd, sxh, sxw, K, PH, PW, CONTIGUOUS, PRECISION, ACC,
                                BLOCK_M, BLOCK_ROWS, BLOCK_K)
    x_sq = tiles.squared_norms(x_ptr, x_rows, x_ok, K, PH, PW, sxd, sxh, sxw, CONTIGUOUS,
                               ACC, BLOCK_ROWS, BLOCK_K)
    x_bad = (~(x_sq <= HUGE) & x_ok).to(tl.int32)
    # distance_bounds is symmetric in its two operands: (prototypes, windows) bounds
    low, _ = tiles.distance_bounds(dots, p_sq, x_sq, GROWTH, FLOOR, METRIC)
    skip = p_bad[:, None] | (x_bad != 0)[None, :] | ~x_ok[None, :]
    low = tl.where(skip, float("inf"), low)
    high = low + tiles.bound_widths(p_sq, x_sq, GROWTH, FLOOR, METRIC)
    return low, high, x_bad


@triton.jit
def values_at_positions(x_ptr, p_ptr, p_rows, images, positions, ok, K, OUT_W, PH, PW,
                        sxb, sxd, sxh, sxw, spd, sph, spw, CONTIGUOUS: tl.constexpr,
                        METRIC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                        IMAGES: tl.constexpr, BLOCK_K: tl.constexpr):
    """Distances ``(BLOCK_M, IMAGES)`` between the prototypes at ``p_rows`` and the windows at
    ``positions`` ``(BLOCK_M, IMAGES)`` of ``images``, where ``ok``, computed directly by
    `tiles.direct_distances` as `_exact_kernel` recomputes them (the same bits). The pairs
    take ``BLOCK_K / IMAGES`` entries a step (at least 8): as many as one slice of the GEMM."""
    PAIRS: tl.constexpr = BLOCK_M * IMAGES
    STEP: tl.constexpr = BLOCK_K // IMAGES if BLOCK_K // IMAGES >= 8 else 8
    image_of = tl.reshape(tl.broadcast_to(images[None, :], (BLOCK_M, IMAGES)), (PAIRS,))
    p_of = tl.reshape(tl.broadcast_to(p_rows[:, None], (BLOCK_M, IMAGES)), (PAIRS,))
    x_rows = tiles.window_offsets(image_of, tl.reshape(positions, (PAIRS,)), OUT_W,
                                  sxb, sxh, sxw)
    flat = tiles.direct_distances(x_ptr, x_rows, p_ptr, p_of, tl.reshape(ok, (PAIRS,)), K, PH,
                                  PW, sxd, sxh, sxw, spd, sph, spw, CONTIGUOUS, METRIC, False,
                                  ACC, PAIRS, STEP)
    return tl.reshape(flat, (BLOCK_M, IMAGES))


@launch.tuned(CONFIGS, key=["L", "K", "M", "METRIC", "PRECISION"], interpreted=INTERPRETED,
              prune=prune_configs)
@launch.tile_rows
@triton.jit
def _choose_kernel(
    x_ptr, p_ptr, values_ptr, indices_ptr,
    B, M, L, K, OUT_W, PH, PW,
    sxb, sxd, sxh, sxw, spm, spd, sph, spw, GROWTH, FLOOR,
    CONTIGUOUS: tl.constexpr, METRIC: tl.constexpr, PRECISION: tl.constexpr,
    VALUES: tl.constexpr, ACC: tl.constexpr, HUGE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr, IMAGES: tl.constexpr,
):
    first_image = tl.program_id(0) * IMAGES
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    p_ok = m < M
    p_rows = m.to(tl.int64) * spm
    p_sq = tiles.squared_norms(p_ptr, p_rows, p_ok, K, PH, PW, spd, sph, spw, CONTIGUOUS,
                               ACC, BLOCK_M, BLOCK_K)
    # NaN, inf or squares so large that sums overflow: the expansion cannot bound the pair
    p_bad = ~(p_sq <= HUGE)
    # tile column r is position r % BLOCK_L (plus the chunk's start) of image r // BLOCK_L
    row = tl.arange(0, BLOCK_ROWS)
    row_image = first_image + row // BLOCK_L
    if BLOCK_L == 1:
        # one position per image (L = 1): every tile column is a pair's only candidate
        x_ok = row_image < B
        x_rows = tiles.window_offsets(row_image, 0, OUT_W, sxb, sxh, sxw)
        lowest, upper, image_bad = window_bounds(
            p_ptr, p_rows, p_ok, p_sq, p_bad, x_ptr, x_rows, x_ok, K, PH, PW, sxd, sxh, sxw,
            spd, sph, spw, GROWTH, FLOOR, CONTIGUOUS, METRIC, PRECISION, ACC, HUGE,
            BLOCK_M, BLOCK_ROWS, BLOCK_K)
        lowest_at = tl.zeros((BLOCK_M, IMAGES), tl.int32)
        runner_up = tl.full((BLOCK_M, IMAGES), float("inf"), ACC)
    else:
        # Per (prototype, image): the smallest lower bound of the true distance over
        # positions, its position, the smallest lower bound at any other position, the
        # smallest upper bound.
        lowest = tl.full((BLOCK_M, IMAGES), float("inf"), ACC)
        lowest_at = tl.zeros((BLOCK_M, IMAGES), tl.int32)
        runner_up = tl.full((BLOCK_M, IMAGES), float("inf"), ACC)
        upper = tl.full((BLOCK_M, IMAGES), float("inf"), ACC)
        image_bad = tl.zeros((IMAGES,), tl.int32)
        for start in range(0, L, BLOCK_L):
            position = tiles.chunk_positions(start, row, BLOCK_L)
            x_ok = (row_image < B) & (position < L)
            x_rows = tiles.window_offsets(row_image, position, OUT_W, sxb, sxh, sxw)
            low, high, x_bad = window_bounds(
                p_ptr, p_rows, p_ok, p_sq, p_bad, x_ptr, x_rows, x_ok, K, PH, PW,
                sxd, sxh, sxw, spd, sph, spw, GROWTH, FLOOR, CONTIGUOUS, METRIC, PRECISION,
                ACC, HUGE, BLOCK_M, BLOCK_ROWS, BLOCK_K)
            # The chunk's reduction over positions, per (prototype, image): the tile's
            # columns are one image's positions (IMAGES == 1: L > 32, the GEMM-heavy shapes,
            # plain 2-D) or a few images' (small maps: a 3-D reshape)
            if IMAGES == 1:
                image_bad = tl.maximum(image_bad, tl.max(x_bad, axis=0, keep_dims=True))
                chunk_low, chunk_at = tl.min(low, axis=1, return_indices=True,
                                             return_indices_tie_break_left=True,
                                             keep_dims=True)
                chunk_runner_up = tl.min(tl.where(row[None, :] == chunk_at, float("inf"), low),
                                         axis=1, keep_dims=True)
                chunk_high = tl.min(high, axis=1, keep_dims=True)
            else:
                image_bad = tl.maximum(image_bad,
                                       tl.max(tl.reshape(x_bad, (IMAGES, BLOCK_L)), axis=1))
                low = tl.reshape(low, (BLOCK_M, IMAGES, BLOCK_L))
                chunk_low, chunk_at = tl.min(low, axis=2, return_indices=True,
                                             return_indices_tie_break_left=True)
                slot = tl.arange(0, BLOCK_L)[None, None, :]
                chunk_runner_up = tl.min(
                    tl.where(slot == chunk_at[:, :, None], float("inf"), low), axis=2)
                chunk_high = tl.min(tl.reshape(high, (BLOCK_M, IMAGES, BLOCK_L)), axis=2)
            runner_up = tl.minimum(tl.minimum(runner_up, chunk_runner_up),
                                   tl.maximum(lowest, chunk_low))
            better = chunk_low < lowest  # strictly: on a tie the earlier chunk keeps its place
            lowest = tl.where(better, chunk_low, lowest)
            lowest_at = tl.where(better, start + chunk_at, lowest_at)
            upper = tl.minimum(upper, chunk_high)
    # Certified: every other position's lower bound is above the smallest upper bound, so the
    # true minimum can only be at `lowest_at` (and `upper` is the upper bound there). Otherwise
    # (ties, near-ties within the rounding, non-finite or huge entries) the pair is searched
    # directly by _exact_kernel.
    certified = (image_bad == 0)[None, :] & ~p_bad[:, None] & (runner_up > upper)
    value = (lowest + upper) * 0.5  # the expansion at the position (the bounds' midpoint)
    if METRIC == "sqeuclidean":
        # within twice the direct float32 sum's own error bound (GROWTH x the distance): the
        # bound's width GROWTH (|x|^2 + |p|^2) is at most 2 GROWTH x the distance, i.e. the
        # expansion cancelled at most one bit. A prototype on its patch is recomputed.
        exact_enough = (upper - lowest) <= 4 * GROWTH * lowest
        value = tl.where(value < 0, 0.0, value)
    else:
        # cosine's bound is absolute, GROWTH, as the direct computation's own error is; but a
        # pair whose lower bound is not above 0 may be a copy (a pushed patch), whose distance is
        # exactly 0 only when recomputed (false for NaN too)
        exact_enough = lowest > 0
        value = tl.where(value < 0, 0.0, tl.where(value > 2, 2.0, value))
    image = first_image + tl.arange(0, IMAGES)
    out = image.to(tl.int64)[None, :] * M + m[:, None]
    mask = (image < B)[None, :] & p_ok[:, None]
    if VALUES:
        # the tile's products are exact (IEEE float32, bfloat16/float16 operands, tf32x3's
        # split): its value stands where the expansion cancelled at most one bit, and
        # _exact_kernel recomputes the others
        final = certified & exact_enough
    else:
        # TF32 operands (L > 1) round the inputs, so no value comes from the tile: each
        # certified pair's value is computed directly here, at its position, while the
        # program's windows and prototypes are still in L2 (a second pass read 2 K entries per
        # pair again: 0.14-6.9 GB at the GPU shapes, benchmarks/NOTES.md)
        direct = values_at_positions(x_ptr, p_ptr, p_rows, image, lowest_at,
                                     certified & mask, K, OUT_W, PH, PW, sxb, sxd, sxh, sxw,
                                     spd, sph, spw, CONTIGUOUS, METRIC, ACC, BLOCK_M, IMAGES,
                                     BLOCK_K)
        value = tl.where(certified, direct, value)
        final = certified
    # the position; -2 - position: certified, its value to recompute; -1: to search
    code = tl.where(certified, tl.where(final, lowest_at, -2 - lowest_at), -1)
    tl.store(indices_ptr + out, code.to(tl.int64), mask=mask)
    tl.store(values_ptr + out, value.to(values_ptr.dtype.element_ty), mask=mask & final)


@triton.jit
def _exact_kernel(
    x_ptr, p_ptr, values_ptr, indices_ptr,
    M, L, K, OUT_W, PH, PW,
    sxb, sxd, sxh, sxw, spm, spd, sph, spw,
    CONTIGUOUS: tl.constexpr, METRIC: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    image = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = m < M
    out = image.to(tl.int64) * M + m
    code = tl.load(indices_ptr + out, mask=ok, other=0)
    recompute = ok & (code <= -2)
    search = ok & (code == -1)
    # Pairs whose value came from the tile read nothing more here: a program whose pairs all
    # did ends after loading their positions.
    if tl.max((recompute | search).to(tl.int32), axis=0) > 0:
        p_rows = m.to(tl.int64) * spm
        chosen = tl.where(recompute, -2 - code, 0)
        value = tiles.direct_distances(
            x_ptr, tiles.window_offsets(image, chosen, OUT_W, sxb, sxh, sxw), p_ptr, p_rows,
            recompute, K, PH, PW, sxd, sxh, sxw, spd, sph, spw, CONTIGUOUS,
            METRIC, False, ACC, BLOCK_M, BLOCK_K)
        if tl.max(search.to(tl.int32), axis=0) > 0:
            best = tl.full((BLOCK_M,), float("inf"), ACC)
            best_at = tl.zeros((BLOCK_M,), tl.int64)
            for position in range(0, L):
                x_rows = tl.zeros((BLOCK_M,), tl.int64) + tiles.window_offsets(
                    image, position, OUT_W, sxb, sxh, sxw)
                dist = tiles.direct_distances(
                    x_ptr, x_rows, p_ptr, p_rows, search, K, PH, PW, sxd, sxh, sxw,
                    spd, sph, spw, CONTIGUOUS, METRIC, True, ACC, BLOCK_M, BLOCK_K)
                # the first minimum, or the first NaN, which then stays
                take = (dist < best) | ((dist != dist) & (best == best))
                best = tl.where(take, dist, best)
                best_at = tl.where(take, position, best_at)
            value = tl.where(search, best, value)
            chosen = tl.where(search, best_at, chosen)
        tl.store(indices_ptr + out, chosen, mask=recompute | search)
        tl.store(values_ptr + out, value.to(values_ptr.dtype.element_ty),
                 mask=recompute | search)


def rounding_bound(x: Tensor, size: int, metric: str, precision: str = "ieee"
                   ) -> tuple[float, float]:
    """``(growth, floor)``: the expansion of a pair of ``size``-entry vectors is within
    ``growth * (|x|^2 + |p|^2) + floor`` of its exactly rounded inputs' truth (sqeuclidean;
    cosine: within ``growth``), the summation bound of
    `protokern.backends.reference.expanded_distance` plus a few eps for the kernel's own
    rearrangements (its norms, the clamp), and 8 more for ``tf32x3``'s dots (each product
    within ~3 x 2^-22 of its inputs' magnitudes: the dropped low x low term and the low
    parts' own rounding).

    TF32's rounding of the inputs is left out on purpose: it is the same for identical windows,
    so exact ties are still caught, and the contract lets near-ties within TF32's tolerance
    move; counting it would send most pairs to the slow direct search. (So with TF32 the
    values are computed directly, in `_choose_kernel`'s epilogue: its ``VALUES``.)"""
    finfo = torch.finfo(launch.accumulator(x.dtype)[0])
    split = 8 * finfo.eps if precision == "tf32x3" else 0.0
    if metric == "sqeuclidean":
        return (size + 12) * finfo.eps + split, 4 * (size + 1) * finfo.tiny
    return (2 * size + 12) * finfo.eps + split, 0.0


def gemm_precision(x: Tensor, length: int) -> str:
    """``tl.dot``'s precision for `_choose_kernel`: `launch.dot_precision`, except that with
    one position per image (``length == 1``, e.g. token heads) TF32 becomes ``tf32x3``: every
    pair's value is then an output, and three TF32 products (about float32's precision) let
    the tile give it, where TF32 alone would compute every pair again directly (a second GEMM's
    worth of float32 FMAs without tensor cores; as a second pass, 63 GB read from L2 at
    cil_vectors against a 16 GFLOP GEMM)."""
    precision = launch.dot_precision(x)
    return "tf32x3" if precision == "tf32" and length == 1 else precision


def min_distance(x: Tensor, prototypes: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """`protokern.backends.reference.min_distance` on canonical inputs, fused (see the module
    doc)."""
    batch, num, length, out_w = launch.checked_map_geometry(
        x, prototypes, "min_distance", [INTERPRETED] if launch.INTERPRET else CONFIGS,
        EXACT.kwargs)
    dim, ph, pw = x.shape[1], *prototypes.shape[2:]
    values = torch.empty(batch, num, dtype=x.dtype, device=x.device)
    indices = torch.empty(batch, num, dtype=torch.int64, device=x.device)
    if values.numel() == 0:
        return values, indices
    _, acc = launch.accumulator(x.dtype)
    x, prototypes, contiguous = launch.contiguous_entries(x, prototypes)
    shape = (length, dim * ph * pw, out_w, ph, pw, *x.stride(), *prototypes.stride())
    precision = gemm_precision(x, length)
    growth, floor = rounding_bound(x, dim * ph * pw, metric, precision)

    def grid(meta):
        return triton.cdiv(batch, meta["IMAGES"]), triton.cdiv(num, meta["BLOCK_M"])

    with launch.on_device(x):
        _choose_kernel[grid](x, prototypes, values, indices, batch, num, *shape, growth, floor,
                             CONTIGUOUS=contiguous, METRIC=metric, PRECISION=precision,
                             VALUES=precision != "tf32", ACC=acc, HUGE=launch.huge(x.dtype))
        launch.Fixed(_exact_kernel, EXACT)[
            lambda meta: (batch, triton.cdiv(num, meta["BLOCK_M"]))
        ](x, prototypes, values, indices, num, *shape, CONTIGUOUS=contiguous, METRIC=metric,
          ACC=acc)
    return values, indices
