"""Fused `protokern.ops.distance_map`: every distance by the GEMM expansion, no reduction.

One program per (block of images, chunk of positions, block of prototypes) computes a
``(windows, prototypes)`` tile as in the forward of `min_distance` and writes it out; the
expansion is the op's definition here (as in the reference), so nothing is recomputed.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from protokern.backends.triton import launch, tiles
from protokern.backends.triton.min_distance import CONFIGS, INTERPRETED, prune_configs


# the forward's tiles less its reduction's state: its configurations for the call's L, dot and GPU
@launch.tuned(CONFIGS, key=["L", "K", "M", "METRIC", "PRECISION"], interpreted=INTERPRETED,
              prune=prune_configs)
@launch.tile_rows
@triton.jit
def _distance_map_kernel(
    x_ptr, p_ptr, out_ptr,
    B, M, L, K, OUT_W, PH, PW,
    sxb, sxd, sxh, sxw, spm, spd, sph, spw,
    CONTIGUOUS: tl.constexpr, METRIC: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr, IMAGES: tl.constexpr,
):
    m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    p_ok = m < M
    p_rows = m.to(tl.int64) * spm
    p_sq = tiles.squared_norms(p_ptr, p_rows, p_ok, K, PH, PW, spd, sph, spw, CONTIGUOUS,
                               ACC, BLOCK_M, BLOCK_K)
    row = tl.arange(0, BLOCK_ROWS)
    image = tl.program_id(0) * IMAGES + row // BLOCK_L
    position = tl.program_id(1) * BLOCK_L + row % BLOCK_L
    x_ok = (image < B) & (position < L)
    x_rows = tiles.window_offsets(image, position, OUT_W, sxb, sxh, sxw)
    dist = tiles.expanded_distances(
        x_ptr, x_rows, x_ok, p_ptr, p_rows, p_ok, p_sq, K, PH, PW,
        sxd, sxh, sxw, spd, sph, spw, CONTIGUOUS, METRIC, PRECISION, ACC,
        BLOCK_ROWS, BLOCK_M, BLOCK_K)
    # out is (B, M, L) contiguous
    out = (image.to(tl.int64)[:, None] * M + m[None, :]) * L + position[:, None]
    tl.store(out_ptr + out, dist.to(out_ptr.dtype.element_ty),
             mask=x_ok[:, None] & p_ok[None, :])


def distance_map(x: Tensor, prototypes: Tensor, metric: str) -> Tensor:
    """`protokern.backends.reference.distance_map` on canonical inputs: ``(B, M, H', W')``."""
    batch, dim, height, width = x.shape
    num, _, ph, pw = prototypes.shape
    out_h, out_w = height - ph + 1, width - pw + 1
    length = out_h * out_w
    launch.check_positions(length, "distance_map", x, prototypes)
    configs = [INTERPRETED] if launch.INTERPRET else CONFIGS
    rows = launch.smallest_block(configs, "BLOCK_ROWS")  # BLOCK_L is at least min(L, rows)
    launch.check_grid((batch, triton.cdiv(length, min(length, rows)),
                       triton.cdiv(num, launch.smallest_block(configs, "BLOCK_M"))),
                      "distance_map", x, prototypes)
    out = torch.empty(batch, num, out_h, out_w, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    _, acc = launch.accumulator(x.dtype)
    x, prototypes, contiguous = launch.contiguous_entries(x, prototypes)

    def grid(meta):
        return (triton.cdiv(batch, meta["IMAGES"]), triton.cdiv(length, meta["BLOCK_L"]),
                triton.cdiv(num, meta["BLOCK_M"]))

    with launch.on_device(x):
        _distance_map_kernel[grid](
            x, prototypes, out, batch, num, length, dim * ph * pw, out_w, ph, pw,
            *x.stride(), *prototypes.stride(), CONTIGUOUS=contiguous,
            METRIC=metric, PRECISION=launch.dot_precision(x), ACC=acc)
    return out
