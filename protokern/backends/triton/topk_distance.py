"""Fused forward of `protokern.ops.topk_distance`: the ``k`` smallest distances over positions
of every (image, prototype), never holding the ``(B, M, L')`` map. ``k = 1`` is `min_distance`
itself (so equal to it bit for bit); for ``k > 1`` two kernels:

1. `_topk_kernel`, per (image, block of prototypes), streams the image's windows in tiles
   through ``tl.dot`` as `min_distance._choose_kernel` does (`min_distance.window_bounds`: the
   expansion minus / plus its rounding bound, the reference's) and keeps per pair, in registers
   (`selection.offer_bounds`, shared with `nearest_prototypes`), the ``k`` smallest upper
   bounds, whose largest is ``T``, and the ``SLOTS`` smallest lower bounds at most ``T`` with
   their positions (``SLOTS``, a power of two, is more than ``k``). Every position whose lower
   bound is at most ``T`` may be among the ``k`` smallest; when the largest kept lower bound is
   above ``T``, all of them are kept, and the epilogue recomputes just those directly (no
   expansion, as `min_distance` recomputes its chosen value) and keeps the first ``k`` by (exact
   distance, position). Otherwise (more candidates than slots: ties, near-ties; or a non-finite
   entry, or squares that may overflow) the pair is left to
2. `_search_kernel`, which computes every position of the pairs left to it directly, the first
   ``k`` by (exact distance, position) winning.

So ties go to the lowest position, a NaN distance comes first (as in `torch.min`) and a
prototype pushed onto a patch finds it at distance 0 whatever the GEMM's rounding. Each tile
holds the windows of one image (`min_distance` packs several small maps into one; here the
running selection would then be 3-D): a 7x7 map fills 49 of 64 columns.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from protokern.backends.triton import launch, selection, tiles
from protokern.backends.triton.min_distance import min_distance, rounding_bound, window_bounds


def _config(positions, block_m, block_k, warps, stages):
    return triton.Config({"BLOCK_ROWS": positions, "BLOCK_M": block_m, "BLOCK_K": block_k},
                         num_warps=warps, num_stages=stages)


CONFIGS = [_config(*c) for c in [(64, 32, 32, 8, 3), (64, 32, 64, 8, 3)]]
"""Autotuned on a GPU, keyed on the problem's shape, metric, precision and k: ``BLOCK_ROWS``
positions (at most; `positions_per_tile`) by ``BLOCK_M`` prototypes. Each pair keeps ``3
SLOTS`` numbers in registers beside the tile's bounds, so the tiles are narrower in prototypes
than `min_distance`'s, on 8 warps. Compiled offline (`protokern.backends.triton.offline`'s
`topk_kernel_report`, cub and large_bank, k = 4 and 16): the first, which deterministic runs
take, spills nothing on sm_90 or sm_80 in bfloat16 or TF32 (float32 without TF32: 24-56 bytes
on sm_90, as `min_distance` spills there); the second spills 40 bytes in TF32 on sm_80. 64
prototypes per tile spilled 104-112 bytes on sm_90, 4 warps 8-16."""

INTERPRETED = _config(64, 64, 128, 4, 1)
"""The interpreter's one configuration: large tiles, few programs (its cost is per operation)."""

SEARCH = launch.fixed_config({"BLOCK_M": 32, "BLOCK_K": 32}, {"BLOCK_M": 64, "BLOCK_K": 128})
"""`_search_kernel`: direct distances at every position of the pairs left to it, rare,
untuned."""


def positions_per_tile(args: dict) -> int:
    """``BLOCK_L``: `launch.positions_per_tile_image`, at least 16 (``tl.dot``'s smallest
    tile side): a tile holds one image's positions."""
    return max(16, launch.positions_per_tile_image(args))


@launch.tuned(CONFIGS, key=["L", "K", "M", "METRIC", "PRECISION", "K_SMALLEST"],
              interpreted=INTERPRETED)
@triton.heuristics({"BLOCK_L": positions_per_tile})
@triton.jit
def _topk_kernel(
    x_ptr, p_ptr, values_ptr, indices_ptr, searched_ptr,
    M, L, K, OUT_W, PH, PW,
    sxb, sxd, sxh, sxw, spm, spd, sph, spw, GROWTH, FLOOR,
    CONTIGUOUS: tl.constexpr, METRIC: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, HUGE: tl.constexpr, K_SMALLEST: tl.constexpr, SLOTS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    image = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    p_ok = m < M
    p_rows = m.to(tl.int64) * spm
    p_sq = tiles.squared_norms(p_ptr, p_rows, p_ok, K, PH, PW, spd, sph, spw, CONTIGUOUS,
                               ACC, BLOCK_M, BLOCK_K)
    # NaN, inf or squares so large that sums overflow: the expansion cannot bound the pair
    p_bad = ~(p_sq <= HUGE)
    column = tl.arange(0, BLOCK_L)
    slot = tl.arange(0, SLOTS)[None, :]
    # slots past k never hold an upper bound (-inf is never the largest)
    uppers = tl.where(slot < K_SMALLEST, float("inf"), float("-inf")) \
        + tl.zeros((BLOCK_M, SLOTS), ACC)
    # only finite bounds are offered, so empty slots may be numbered -1 - slot (distinct):
    # positions stay in 32 bits
    lowers = tl.full((BLOCK_M, SLOTS), float("inf"), ACC)
    lowers_at = (-1 - slot) + tl.zeros((BLOCK_M, SLOTS), tl.int32)
    image_bad = tl.zeros((BLOCK_M,), tl.int32)
    for start in range(0, L, BLOCK_L):
        position = tiles.chunk_positions(start, column, BLOCK_L)
        x_ok = position < L
        x_rows = tiles.window_offsets(image, position, OUT_W, sxb, sxh, sxw)
        low, high, x_bad = window_bounds(
            p_ptr, p_rows, p_ok, p_sq, p_bad, x_ptr, x_rows, x_ok, K, PH, PW,
            sxd, sxh, sxw, spd, sph, spw, GROWTH, FLOOR, CONTIGUOUS, METRIC, PRECISION,
            ACC, HUGE, BLOCK_M, BLOCK_L, BLOCK_K)
        image_bad = tl.maximum(image_bad, tl.max(x_bad, axis=0))
        # (window_bounds: inf where a pair cannot be bounded or is outside the problem)
        uppers, lowers, lowers_at = selection.offer_bounds(
            uppers, lowers, lowers_at, low, high, high < float("inf"), start, K_SMALLEST, SLOTS)
    certified, candidate = selection.shortlist(uppers, lowers, (image_bad == 0) & ~p_bad & p_ok)
    # the candidates' exact distances, one slot at a time (a (BLOCK_M, SLOTS) block of pairs
    # at once would load SLOTS times the tile)
    exact = tl.full((BLOCK_M, SLOTS), float("inf"), ACC)
    for j in range(0, SLOTS):
        picked = slot == j
        ok = tl.max(tl.where(picked & candidate, 1, 0), axis=1) > 0
        at = tl.max(tl.where(picked, lowers_at, -1), axis=1)
        dist = tiles.direct_distances(
            x_ptr, tiles.window_offsets(image, tl.where(ok, at, 0), OUT_W, sxb, sxh, sxw),
            p_ptr, p_rows, ok, K, PH, PW, sxd, sxh, sxw, spd, sph, spw, CONTIGUOUS, METRIC,
            False, ACC, BLOCK_M, BLOCK_K)
        exact = tl.where(picked & ok[:, None], dist[:, None], exact)
    pair = image.to(tl.int64) * M + m
    # (finite bounds give finite distances; a NaN would still come first)
    key = tl.where(exact != exact, float("-inf"), exact)
    selection.store_first_k(key, exact, lowers_at, values_ptr, indices_ptr, pair, certified,
                            K_SMALLEST)
    tl.store(searched_ptr + pair, (~certified).to(tl.int8), mask=p_ok)


@triton.jit
def _search_kernel(
    x_ptr, p_ptr, values_ptr, indices_ptr, searched_ptr,
    M, L, K, OUT_W, PH, PW, sxb, sxd, sxh, sxw, spm, spd, sph, spw,
    CONTIGUOUS: tl.constexpr, METRIC: tl.constexpr, ACC: tl.constexpr,
    K_SMALLEST: tl.constexpr, SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    image = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = image.to(tl.int64) * M + m
    search = (tl.load(searched_ptr + pair, mask=m < M, other=0) != 0) & (m < M)
    # a program whose pairs were all certified ends after loading their flags
    if tl.max(search.to(tl.int32), axis=0) > 0:
        p_rows = m.to(tl.int64) * spm
        slot = tl.arange(0, SLOTS)[None, :]
        keys = tl.where(slot < K_SMALLEST, float("inf"), float("-inf")) \
            + tl.zeros((BLOCK_M, SLOTS), ACC)
        # empty slots sort after every position, at equal keys too: an infinite distance
        # still takes their place; slots past k hold -inf, never the largest
        keys_at = tl.where(slot < K_SMALLEST, slot.to(tl.int64) + selection.EMPTY,
                           -1 - slot.to(tl.int64)) \
            + tl.zeros((BLOCK_M, SLOTS), tl.int64)
        exacts = tl.zeros((BLOCK_M, SLOTS), ACC)
        for position in range(0, L):
            x_rows = tl.zeros((BLOCK_M,), tl.int64) + tiles.window_offsets(
                image, position, OUT_W, sxb, sxh, sxw)
            # scaled: these pairs may hold entries whose squares overflow
            dist = tiles.direct_distances(
                x_ptr, x_rows, p_ptr, p_rows, search, K, PH, PW, sxd, sxh, sxw,
                spd, sph, spw, CONTIGUOUS, METRIC, True, ACC, BLOCK_M, BLOCK_K)
            key = tl.where(dist != dist, float("-inf"), dist)  # x != x: NaN, ranked first
            # positions come in increasing order: of equal keys the earliest stays
            keys, keys_at, taken = selection.offer_pair(
                keys, keys_at, key, tl.zeros((BLOCK_M,), tl.int64) + position, search)
            exacts = tl.where(taken, dist[:, None], exacts)
        keys, keys_at = selection.results(keys, keys_at, K_SMALLEST)
        selection.store_first_k(keys, exacts, keys_at, values_ptr, indices_ptr, pair, search,
                                K_SMALLEST)


def topk_distance(x: Tensor, prototypes: Tensor, metric: str, k: int) -> tuple[Tensor, Tensor]:
    """`protokern.backends.reference.topk_distance` on canonical inputs, fused (see the module
    doc): ``(values (B, M, k), indices (B, M, k))``."""
    if k == 1:
        values, indices = min_distance(x, prototypes, metric)
        return values[..., None], indices[..., None]
    batch, num, length, out_w = launch.checked_map_geometry(
        x, prototypes, "topk_distance", [INTERPRETED] if launch.INTERPRET else CONFIGS,
        SEARCH.kwargs)
    dim, ph, pw = x.shape[1], *prototypes.shape[2:]
    values = torch.empty(batch, num, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(batch, num, k, dtype=torch.int64, device=x.device)
    if values.numel() == 0:
        return values, indices
    searched = torch.empty(batch * num, dtype=torch.int8, device=x.device)
    _, acc = launch.accumulator(x.dtype)
    x, prototypes, contiguous = launch.contiguous_entries(x, prototypes)
    size = dim * ph * pw
    shape = (num, length, size, out_w, ph, pw, *x.stride(), *prototypes.stride())
    precision = launch.dot_precision(x)
    growth, floor = rounding_bound(x, size, metric, precision)
    slots = selection.slots_for(k)
    with launch.on_device(x):
        _topk_kernel[lambda meta: (batch, triton.cdiv(num, meta["BLOCK_M"]))](
            x, prototypes, values, indices, searched, *shape, growth, floor,
            CONTIGUOUS=contiguous, METRIC=metric, PRECISION=precision, ACC=acc,
            HUGE=launch.huge(x.dtype), K_SMALLEST=k, SLOTS=slots)
        launch.Fixed(_search_kernel, SEARCH)[
            lambda meta: (batch, triton.cdiv(num, meta["BLOCK_M"]))
        ](x, prototypes, values, indices, searched, *shape, CONTIGUOUS=contiguous,
          METRIC=metric, ACC=acc, K_SMALLEST=k, SLOTS=slots)
    return values, indices
