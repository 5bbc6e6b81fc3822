"""Fused forward of `protokern.ops.nearest_prototypes`: the ``k`` nearest prototypes of every
window, never holding the ``(N, M)`` distance matrix.

1. `_nearest_kernel`, per block of rows (windows over ``(image, position)``, row-major), streams
   the prototypes in tiles through ``tl.dot`` (the GEMM expansion, as in `min_distance`) and
   keeps per row, in registers, bounds of the true distance (the expansion minus / plus its
   rounding bound, the reference's): the ``k`` smallest upper bounds, whose largest is ``T``, and
   the ``SLOTS`` smallest lower bounds with their prototypes (``SLOTS``, a power of two, is more
   than ``k``). Every prototype whose lower bound is at most ``T`` may be among the ``k``
   nearest. When the largest kept lower bound is above ``T`` all of them are kept, and the
   epilogue recomputes just those directly (no expansion) and keeps the first ``k`` by (exact
   distance, index). Otherwise (more candidates than slots: ties, near-ties; or a non-finite
   entry, or squares that may overflow) the row is left to
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

from protokern.backends.triton import launch, tiles
from protokern.backends.triton.min_distance import rounding_bound


def _config(rows, block_m, block_k, warps, stages):
    return triton.Config({"BLOCK_ROWS": rows, "BLOCK_M": block_m, "BLOCK_K": block_k},
                         num_warps=warps, num_stages=stages)


CONFIGS = [_config(*c) for c in [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                                 (128, 128, 32, 8, 3), (64, 64, 64, 4, 3)]]
"""Autotuned on a GPU, keyed on the problem's shape, metric, precision and k."""

INTERPRETED = _config(64, 128, 128, 4, 1)
"""The interpreter's one configuration: large tiles, few programs (its cost is per operation)."""

PLACEHOLDER = tl.constexpr(1 << 62)
"""The index of an empty slot of `_search_kernel`: above every prototype's."""

SEARCH = launch.fixed_config({"BLOCK_ROWS": 16, "BLOCK_M": 16, "BLOCK_K": 32},
                             {"BLOCK_ROWS": 16, "BLOCK_M": 64, "BLOCK_K": 128})
"""`_search_kernel`: direct distances of (rows x prototypes) pairs, rare, untuned."""


@triton.jit
def _offer(keep, tile, COUNT: tl.constexpr, BLOCK_M: tl.constexpr):
    """Offers the ``COUNT`` smallest entries of each row of ``tile`` ``(R, BLOCK_M)`` to
    ``keep`` ``(R, S)``: each replaces its row's largest kept value if smaller."""
    column = tl.arange(0, BLOCK_M)[None, :]
    slot = tl.arange(0, keep.shape[1])[None, :]
    for _ in tl.static_range(COUNT):
        value, at = tl.min(tile, axis=1, return_indices=True, return_indices_tie_break_left=True)
        tile = tl.where(column == at[:, None], float("inf"), tile)
        worst, worst_at = tl.max(keep, axis=1, return_indices=True,
                                 return_indices_tie_break_left=True)
        keep = tl.where((slot == worst_at[:, None]) & (value < worst)[:, None], value[:, None],
                        keep)
    return keep


@triton.jit
def _offer_with_index(keep, keep_at, tile, first, COUNT: tl.constexpr, BLOCK_M: tl.constexpr):
    """`_offer`, also keeping each kept value's prototype (``first`` + its column). On equal
    values the kept, earlier prototype stays; among equal largest kept values the one with the
    highest prototype is the one replaced, so ties go to the lowest index."""
    column = tl.arange(0, BLOCK_M)[None, :]
    tl.arange(0, keep.shape[1])[None, :]
    for _ in tl.static_range(COUNT):
        value, at = tl.min(tile, axis=1, return_indices=True, return_indices_tie_break_left=True)
        tile = tl.where(column == at[:, None], float("inf"), tile)
        worst = tl.max(keep, axis=1)
        worst_at = tl.max(tl.where(keep == worst[:, None], keep_at, -keep.shape[1] - 1), axis=1)
        replace = (keep == worst[:, None]) & (keep_at == worst_at[:, None]) \
            & (value < worst)[:, None]
        keep = tl.where(replace, value[:, None], keep)
        keep_at = tl.where(replace, first + at.to(tl.int64)[:, None], keep_at)
    return keep, keep_at


@triton.jit
def _store_first_k(key, exact, at, values_ptr, indices_ptr, row, store,
                   K_NEAREST: tl.constexpr):
    """Stores, for each row, the ``K_NEAREST`` smallest ``key`` ``(R, S)`` in order, ties to
    the lowest ``at`` (the prototype), as ``exact`` values (NaN where the key is -inf, the
    stand-in of NaN) and ``at`` indices, at ``row * K_NEAREST + j``."""
    for j in tl.static_range(K_NEAREST):
        smallest = tl.min(key, axis=1)
        index = tl.min(tl.where(key == smallest[:, None], at, 0x7FFFFFFFFFFFFFFF), axis=1)
        chosen = (key == smallest[:, None]) & (at == index[:, None])
        value = tl.sum(tl.where(chosen, exact, 0.0), axis=1)
        value = tl.where(smallest == float("-inf"), float("nan"), value)
        out = row * K_NEAREST + j
        tl.store(values_ptr + out, value.to(values_ptr.dtype.element_ty), mask=store)
        tl.store(indices_ptr + out, index, mask=store)
        key = tl.where(chosen, float("inf"), key)


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
        skip = x_bad[:, None] | (p_bad | ~p_ok)[None, :]
        uppers = _offer(uppers, tl.where(skip, float("inf"), high), K_NEAREST, BLOCK_M)
        lowers, lowers_at = _offer_with_index(lowers, lowers_at,
                                              tl.where(skip, float("inf"), low),
                                              tl.cast(first, tl.int64), SLOTS, BLOCK_M)
    threshold = tl.max(uppers, axis=1)  # T: the k-th smallest upper bound
    certified = (undecided == 0) & (tl.max(lowers, axis=1) > threshold) & row_ok
    candidate = (lowers <= threshold[:, None]) & certified[:, None]
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
    _store_first_k(key, exact, lowers_at, values_ptr, indices_ptr, row, certified, K_NEAREST)
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
        # placeholders sort after every prototype, at equal keys too: an infinite distance
        # still takes their place
        keys_at = slot.to(tl.int64) + PLACEHOLDER + tl.zeros((BLOCK_ROWS, SLOTS), tl.int64)
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
            key = tl.where(pair_ok, tl.where(dist != dist, float("-inf"), dist),
                           float("inf"))
            # offer the tile's k smallest keys in column order (ties: the lowest index)
            column = tl.arange(0, BLOCK_M)[None, :]
            for _ in tl.static_range(K_NEAREST):
                value, at = tl.min(key, axis=1, return_indices=True,
                                   return_indices_tie_break_left=True)
                exact = tl.sum(tl.where(column == at[:, None], dist, 0.0), axis=1)
                key = tl.where(column == at[:, None], float("inf"), key)
                worst = tl.max(keys, axis=1)
                worst_at = tl.max(tl.where(keys == worst[:, None], keys_at, -1), axis=1)
                offered = first + at.to(tl.int64)
                # (value, index) below the worst kept (value, index): ties to the lowest index
                better = (value < worst) | ((value == worst) & (offered < worst_at))
                replace = (keys == worst[:, None]) & (keys_at == worst_at[:, None]) \
                    & better[:, None]
                keys = tl.where(replace, value[:, None], keys)
                keys_at = tl.where(replace, offered[:, None], keys_at)
                exacts = tl.where(replace, exact[:, None], exacts)
        # slots past k held -inf to stay out of the running; they are not results
        _store_first_k(tl.where(slot < K_NEAREST, keys, float("inf")), exacts, keys_at,
                       values_ptr, indices_ptr, row, search, K_NEAREST)


def slots_for(k: int) -> int:
    """Lower bounds kept per row: the next power of two above ``k``."""
    return triton.next_power_of_2(k + 1)


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
    slots = slots_for(k)
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
