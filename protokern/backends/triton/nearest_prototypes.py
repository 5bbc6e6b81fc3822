"""Fused forward of `protokern.ops.nearest_prototypes`: the ``k`` nearest prototypes of every
window, never holding the ``(N, M)`` distance matrix.

1. `_nearest_kernel`, per block of rows (windows over ``(image, position)``, row-major), streams
   the prototypes in tiles through ``tl.dot`` (the GEMM expansion, as in `min_distance`) and
   keeps per row, in registers, bounds of the true distance (the expansion minus / plus its
   rounding bound, the reference's): the ``k`` smallest upper bounds, whose largest is ``T``,
   and the ``SLOTS`` smallest lower bounds at most ``T`` with their prototypes (``SLOTS``, a
   power of two, is more than ``k``; `selection.offer_bounds`, shared with `topk_distance`).
   Every prototype whose lower bound is at most ``T`` may be among the ``k`` nearest. When the
   largest kept lower bound is above ``T`` all of them are kept, and the epilogue recomputes
   just those directly (no expansion) and keeps the first ``k`` by (exact distance, index).
   Otherwise (more candidates than slots: ties, near-ties; or a non-finite entry, or squares
   that may overflow) the row is left to
2. `_search_kernel`, which computes every distance of the rows left to it directly and keeps
   the first ``k`` by (exact distance, index).

So ties go to the lowest prototype index, a NaN distance comes first (as in `torch.min`) and a
prototype equal to a patch is found at distance 0 whatever the GEMM's rounding. Memory: the
outputs, ``(N, k)`` each, and one flag per row.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from protokern.backends.triton import launch, selection, tiles
from protokern.backends.triton.min_distance import rounding_bound


def _config(rows, block_m, block_k, warps, stages):
    return triton.Config({"BLOCK_ROWS": rows, "BLOCK_M": block_m, "BLOCK_K": block_k},
                         num_warps=warps, num_stages=stages)


CONFIGS = [_config(*c) for c in [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                                 (128, 128, 32, 8, 3), (64, 64, 64, 4, 3)]]
"""Autotuned on a GPU, keyed on the problem's shape, metric, precision and k."""

INTERPRETED = _config(64, 128, 128, 4, 1)
"""The interpreter's one configuration: large tiles, few programs (its cost is per operation)."""

SEARCH = launch.fixed_config({"BLOCK_ROWS": 16, "BLOCK_M": 16, "BLOCK_K": 32},
                             {"BLOCK_ROWS": 16, "BLOCK_M": 64, "BLOCK_K": 128})
"""`_search_kernel`: direct distances of (rows x prototypes) pairs, rare, untuned."""


@launch.tuned(CONFIGS, key=["M", "K", "METRIC", "PRECISION", "K_NEAREST"],
              interpreted=INTERPRETED)
@triton.jit
def _nearest_kernel(
    x_ptr, p_ptr, values_ptr, indices_ptr, searched_ptr,
    N, M, L, K, OUT_W, PH, PW,
    sxb, sxd, sxh, sxw, spm, spd, sph, spw, GROWTH, FLOOR,
    CONTIGUOUS: tl.constexpr, METRIC: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    HUGE: tl.constexpr, K_NEAREST: tl.constexpr, SLOTS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = row < N
    image = row // L
    x_rows = tiles.window_offsets(image, row - image * L, OUT_W, sxb, sxh, sxw)
    slot = tl.arange(0, SLOTS)[None, :]
    # slots past k never hold an upper bound (-inf is never the largest)
    uppers = tl.where(slot < K_NEAREST, float("inf"), float("-inf")) \
        + tl.zeros((BLOCK_ROWS, SLOTS), ACC)
    lowers = tl.full((BLOCK_ROWS, SLOTS), float("inf"), ACC)
    # distinct placeholders (-1 - slot): the slot a replacement takes is always a single one
    lowers_at = (-1 - slot).to(tl.int64) + tl.zeros((BLOCK_ROWS, SLOTS), tl.int64)
    undecided = tl.zeros((BLOCK_ROWS,), tl.int32)
    for first in range(0, M, BLOCK_M):
        m = first + tl.arange(0, BLOCK_M)
        p_ok = m < M
        p_rows = m.to(tl.int64) * spm
        p_sq = tiles.squared_norms(p_ptr, p_rows, p_ok, K, PH, PW, spd, sph, spw, CONTIGUOUS,
                                   ACC, BLOCK_M, BLOCK_K)
        dots, x_sq = tiles.dot_products(
            x_ptr, x_rows, row_ok, p_ptr, p_rows, p_ok, K, PH, PW, sxd, sxh, sxw, spd, sph, spw,
            CONTIGUOUS, PRECISION, ACC, BLOCK_ROWS, BLOCK_M, BLOCK_K)
        # NaN, inf or squares so large that sums overflow: the expansion cannot bound the pair
        x_bad = ~(x_sq <= HUGE)
        p_bad = ~(p_sq <= HUGE) & p_ok
        undecided = tl.maximum(undecided, x_bad.to(tl.int32))
        undecided = tl.maximum(undecided, tl.max(p_bad.to(tl.int32), axis=0))
        low, high = tiles.distance_bounds(dots, x_sq, p_sq, GROWTH, FLOOR, METRIC)
        # only the pairs the expansion bounds are offered
        bounded = ~(x_bad[:, None] | (p_bad | ~p_ok)[None, :])
        uppers, lowers, lowers_at = selection.offer_bounds(
            uppers, lowers, lowers_at, low, high, bounded, tl.cast(first, tl.int64), K_NEAREST,
            SLOTS)
    certified, candidate = selection.shortlist(uppers, lowers, (undecided == 0) & row_ok)
    # the candidates' exact distances, one flat block of (row, slot) pairs
    pair_x = tl.reshape(x_rows[:, None] + tl.zeros((BLOCK_ROWS, SLOTS), tl.int64),
                        (BLOCK_ROWS * SLOTS,))
    pair_p = tl.reshape(lowers_at * spm, (BLOCK_ROWS * SLOTS,))
    exact = tiles.direct_distances(
        x_ptr, pair_x, p_ptr, pair_p, tl.reshape(candidate, (BLOCK_ROWS * SLOTS,)), K, PH, PW,
        sxd, sxh, sxw, spd, sph, spw, CONTIGUOUS, METRIC, False, ACC, BLOCK_ROWS * SLOTS,
        BLOCK_K)
    exact = tl.reshape(exact, (BLOCK_ROWS, SLOTS))
    key = tl.where(candidate, tl.where(exact != exact, float("-inf"), exact),  # x != x: NaN
                   float("inf"))
    selection.store_first_k(key, exact, lowers_at, values_ptr, indices_ptr, row, certified,
                            K_NEAREST)
    tl.store(searched_ptr + row, (~certified).to(tl.int8), mask=row_ok)


@triton.jit
def _search_kernel(
    x_ptr, p_ptr, values_ptr, indices_ptr, searched_ptr,
    N, M, L, K, OUT_W, PH, PW, sxb, sxd, sxh, sxw, spm, spd, sph, spw,
    CONTIGUOUS: tl.constexpr, METRIC: tl.constexpr, ACC: tl.constexpr,
    K_NEAREST: tl.constexpr, SLOTS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    search = (tl.load(searched_ptr + row, mask=row < N, other=0) != 0) & (row < N)
    if tl.max(search.to(tl.int32), axis=0) > 0:
        image = row // L
        x_rows = tiles.window_offsets(image, row - image * L, OUT_W, sxb, sxh, sxw)
        slot = tl.arange(0, SLOTS)[None, :]
        keys = tl.where(slot < K_NEAREST, float("inf"), float("-inf")) \
            + tl.zeros((BLOCK_ROWS, SLOTS), ACC)
        # empty slots sort after every prototype, at equal keys too: an infinite distance
        # still takes their place; slots past k hold -inf, never the largest
        keys_at = tl.where(slot < K_NEAREST, slot.to(tl.int64) + selection.EMPTY,
                           -1 - slot.to(tl.int64)) \
            + tl.zeros((BLOCK_ROWS, SLOTS), tl.int64)
        exacts = tl.zeros((BLOCK_ROWS, SLOTS), ACC)
        for first in range(0, M, BLOCK_M):
            m = first + tl.arange(0, BLOCK_M)
            pair_ok = search[:, None] & (m < M)[None, :]
            pair_x = tl.reshape(x_rows[:, None] + tl.zeros((BLOCK_ROWS, BLOCK_M), tl.int64),
                                (BLOCK_ROWS * BLOCK_M,))
            pair_p = tl.reshape(m.to(tl.int64)[None, :] * spm
                                + tl.zeros((BLOCK_ROWS, BLOCK_M), tl.int64),
                                (BLOCK_ROWS * BLOCK_M,))
            # scaled: these rows may hold entries whose squares overflow
            dist = tl.reshape(tiles.direct_distances(
                x_ptr, pair_x, p_ptr, pair_p, tl.reshape(pair_ok, (BLOCK_ROWS * BLOCK_M,)), K,
                PH, PW, sxd, sxh, sxw, spd, sph, spw, CONTIGUOUS, METRIC, True, ACC,
                BLOCK_ROWS * BLOCK_M, BLOCK_K), (BLOCK_ROWS, BLOCK_M))
            key = tl.where(dist != dist, float("-inf"), dist)  # x != x: NaN, ranked first
            # offer the tile's k smallest (key, index) pairs, smallest first
            column = tl.arange(0, BLOCK_M)[None, :]
            value = tl.full((BLOCK_ROWS,), float("-inf"), ACC)
            at = tl.full((BLOCK_ROWS,), -1, tl.int32)
            for _ in tl.static_range(K_NEAREST):
                value, at = selection.smallest_in_tile(key, pair_ok, value, at)
                exact = tl.sum(tl.where(column == at[:, None], dist, 0.0), axis=1)
                keys, keys_at, taken = selection.offer_pair(
                    keys, keys_at, value, first + at.to(tl.int64), at < BLOCK_M)
                exacts = tl.where(taken, exact[:, None], exacts)
        keys, keys_at = selection.results(keys, keys_at, K_NEAREST)
        selection.store_first_k(keys, exacts, keys_at, values_ptr, indices_ptr, row, search,
                                K_NEAREST)


def nearest_prototypes(x: Tensor, prototypes: Tensor, metric: str, k: int
                       ) -> tuple[Tensor, Tensor]:
    """`protokern.backends.reference.nearest_prototypes` on canonical inputs, fused (see the
    module doc): ``(values (B, L', k), indices (B, L', k))``."""
    batch, dim, height, width = x.shape
    num, _, ph, pw = prototypes.shape
    out_w = width - pw + 1
    length = (height - ph + 1) * out_w
    rows = batch * length
    launch.check_positions(length, "nearest_prototypes", x, prototypes)
    values = torch.empty(batch, length, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(batch, length, k, dtype=torch.int64, device=x.device)
    if rows == 0:
        return values, indices
    searched = torch.empty(rows, dtype=torch.int8, device=x.device)
    _, acc = launch.accumulator(x.dtype)
    x, prototypes, contiguous = launch.contiguous_entries(x, prototypes)
    size = dim * ph * pw
    shape = (rows, num, length, size, out_w, ph, pw, *x.stride(), *prototypes.stride())
    growth, floor = rounding_bound(x, size, metric)
    slots = selection.slots_for(k)
    with launch.on_device(x):
        _nearest_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_ROWS"]),)](
            x, prototypes, values, indices, searched, *shape, growth, floor,
            CONTIGUOUS=contiguous, METRIC=metric,
            PRECISION=launch.dot_precision(x), ACC=acc, HUGE=launch.huge(x.dtype), K_NEAREST=k,
            SLOTS=slots)
        launch.Fixed(_search_kernel, SEARCH)[
            lambda meta: (triton.cdiv(rows, meta["BLOCK_ROWS"]),)
        ](x, prototypes, values, indices, searched, *shape, CONTIGUOUS=contiguous,
          METRIC=metric, ACC=acc,
          K_NEAREST=k, SLOTS=slots)
    return values, indices
