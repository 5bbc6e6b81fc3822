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


BANDS = (2, 16, 32, 64, 128)
"""The kinds of ``k`` the defaults are sized for, by the most slots a row keeps
(`selection.slots_for`): ``k = 1``; ``k`` up to 15; 16-31; 32-63; 64 (`MAX_K`). One band for
16-64, sized at k = 64, spilled 16-72 bytes at k = 31 and 63."""

_TABLE = {
    # (target, dot, band): [(rows, prototypes, entries, warps, stages)], each commented with
    # the most registers (of 255; none spills) at the band's largest k, vq, both metrics. A
    # row keeps 4 words per slot (two bounds, a 64-bit index) beside its tile's bounds: larger
    # k, fewer rows per warp.
    ("sm_90", "half", 2): [(64, 64, 64, 4, 3), (64, 128, 32, 8, 3)],
    ("sm_90", "tf32", 2): [(64, 64, 64, 4, 3), (128, 64, 32, 8, 3)],
    ("sm_90", "ieee", 2): [(64, 128, 32, 8, 3), (128, 64, 32, 8, 3)],
    ("sm_80", "half", 2): [(64, 64, 64, 4, 3), (128, 64, 32, 8, 3)],
    ("sm_80", "tf32", 2): [(64, 64, 64, 4, 3), (128, 64, 32, 8, 3)],
    ("sm_80", "ieee", 2): [(32, 64, 32, 8, 3)],
    ("sm_90", "half", 16): [(64, 64, 32, 8, 3)],
    ("sm_90", "tf32", 16): [(64, 64, 32, 8, 3)],
    ("sm_90", "ieee", 16): [(32, 64, 32, 4, 3)],
    ("sm_80", "half", 16): [(64, 64, 32, 8, 3)],
    ("sm_80", "tf32", 16): [(64, 64, 32, 8, 3)],
    ("sm_80", "ieee", 16): [(32, 64, 32, 4, 3)],
    # k = 31: 140-168 registers (32 x 64 x 32 on 8 warps spilled 16-72 bytes: float32 on
    # sm_90, TF32 and bfloat16 on sm_80; 16 x 32 x 32 on 4 warps was clean too, 80-118)
    **{(target, dot, 32): [(32, 32, 32, 4, 3)] for target in ("sm_90", "sm_80")
       for dot in ("half", "tf32", "ieee")},
    # k = 63: 128-167 registers; float32 on sm_90 spilled 16-40 bytes at 32 rows (8 or 4 warps,
    # 32 or 64 prototypes) and 8 at 32 x 64 x 16: 16 rows, 104
    **{(target, dot, 64): [(32, 64, 32, 8, 3)] for target, dot in
       (("sm_90", "half"), ("sm_90", "tf32"), ("sm_80", "half"), ("sm_80", "tf32"),
        ("sm_80", "ieee"))},
    ("sm_90", "ieee", 64): [(16, 64, 32, 8, 3)],
    # k = 64
    **{(target, dot, 128): [(32, 64, 32, 8, 3)] for target in ("sm_90", "sm_80")
       for dot in ("half", "tf32", "ieee")},
}

DEFAULTS = launch.config_lists(_TABLE, _config)
"""Per (target, dot, band): the configurations `_nearest_kernel` may run with, the first the
one deterministic runs take (`launch.Tuned.first`). Sized from the offline compile
(`protokern.backends.triton.offline.nearest_kernel_report`; benchmarks/NOTES.md): none spills
registers on sm_90 or sm_80 (tests/backends/test_triton_offline.py compiles each once). Before,
one list for every target, dot and k spilled at 128-wide tiles for k = 1 and everywhere for
k = 9 (up to 1760 bytes in bfloat16 on sm_90)."""

CONFIGS = list({id(c): c for configs in DEFAULTS.values() for c in configs}.values())
"""Every default configuration, autotuned on a GPU among those `configs_for` the call
(`prune_configs`), keyed on the problem's shape, metric, precision and k."""


def band_of(k: int) -> int:
    """`BANDS`' band of ``k``: the smallest that holds its slots."""
    slots = selection.slots_for(k)
    return next(band for band in BANDS if slots <= band)


def configs_for(k: int, dot: str, target: str) -> list[triton.Config]:
    """The configurations `_nearest_kernel` may run with for ``k``, a ``dot``
    (`launch.dot_kind`: ``half``, ``ieee`` or ``tf32``) and a GPU of ``target``
    (`launch.target_of`)."""
    return DEFAULTS[target, dot, band_of(k)]


prune_configs = launch.pruning(configs_for, "K_NEAREST")
"""The autotuner's candidates for a launch: `configs_for` its k, dot and GPU."""


INTERPRETED = _config(64, 128, 128, 4, 1)
"""The interpreter's one configuration: large tiles, few programs (its cost is per operation)."""

def _search(rows, block_m, block_k, warps):
    return launch.fixed_config({"BLOCK_ROWS": rows, "BLOCK_M": block_m, "BLOCK_K": block_k},
                               {"BLOCK_ROWS": 16, "BLOCK_M": 64, "BLOCK_K": 128}, warps)


SEARCH = {("sm_90", 2): _search(16, 16, 16, 4), ("sm_80", 2): _search(16, 16, 16, 8),
          ("sm_90", 16): _search(16, 16, 16, 4), ("sm_80", 16): _search(16, 16, 16, 4),
          # k = 31: on 4 warps 8 bytes spilled (float32 on sm_90, bfloat16 on sm_80)
          ("sm_90", 32): _search(16, 16, 8, 8), ("sm_80", 32): _search(16, 16, 8, 8),
          # k = 63: on 8 warps 8-16 bytes spilled
          ("sm_90", 64): _search(16, 16, 8, 4), ("sm_80", 64): _search(16, 16, 8, 4),
          ("sm_90", 128): _search(16, 16, 8, 4), ("sm_80", 128): _search(16, 16, 8, 4)}
"""`_search_kernel`'s configuration per (target, band of k): direct distances of (rows x
prototypes) pairs, rare, untuned. Cosine's scaled pass keeps two ``(pairs, BLOCK_K)`` tiles:
entries 16 at a time (32 spilled 104-432 bytes at every k, 720 at k = 64 on 4 warps)."""


def search_config(k: int, target: str) -> triton.Config:
    """`SEARCH`'s configuration for ``k`` on a GPU of ``target``."""
    return SEARCH[target, band_of(k)]


@launch.tuned(CONFIGS, key=["M", "K", "METRIC", "PRECISION", "K_NEAREST"],
              interpreted=INTERPRETED, prune=prune_configs)
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
    # the candidates' exact distances, one slot at a time (as topk_distance does): a flat
    # (BLOCK_ROWS x SLOTS) block of pairs loaded SLOTS times the tile at once, which spilled
    # registers for every k > 1; slots no row holds a candidate in load nothing
    exact = tl.zeros((BLOCK_ROWS, SLOTS), ACC)
    for j in range(0, SLOTS):
        picked = slot == j
        ok = tl.max(tl.where(picked & candidate, 1, 0), axis=1) > 0
        if tl.max(ok.to(tl.int32), axis=0) > 0:
            at = tl.sum(tl.where(picked, lowers_at, 0), axis=1)
            dist = tiles.direct_distances(
                x_ptr, x_rows, p_ptr, tl.where(ok, at, 0) * spm, ok, K, PH, PW, sxd, sxh, sxw,
                spd, sph, spw, CONTIGUOUS, METRIC, False, ACC, BLOCK_ROWS, BLOCK_K)
            exact = tl.where(picked, dist[:, None], exact)
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
            for _ in range(0, K_NEAREST):
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
    # (the interpreter runs one configuration whatever the target)
    target = launch.target_of(torch.cuda.get_device_capability(x.device)) if x.is_cuda else "sm_90"
    with launch.on_device(x):
        _nearest_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_ROWS"]),)](
            x, prototypes, values, indices, searched, *shape, growth, floor,
            CONTIGUOUS=contiguous, METRIC=metric,
            PRECISION=launch.dot_precision(x), ACC=acc, HUGE=launch.huge(x.dtype), K_NEAREST=k,
            SLOTS=slots)
        launch.Fixed(_search_kernel, search_config(k, target))[
            lambda meta: (triton.cdiv(rows, meta["BLOCK_ROWS"]),)
        ](x, prototypes, values, indices, searched, *shape, CONTIGUOUS=contiguous,
          METRIC=metric, ACC=acc,
          K_NEAREST=k, SLOTS=slots)
    return values, indices
