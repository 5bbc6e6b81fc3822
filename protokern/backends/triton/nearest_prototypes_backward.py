"""Backward of `protokern.ops.nearest_prototypes` through the chosen pairs.

Row ``r`` (a window) and its ``j``-th prototype ``m = indices[r, j]`` with incoming gradient
``g``: the window gets ``a r - c p`` and the prototype ``e p - c r``, the per-pair coefficients
of `protokern.backends.triton.min_distance_backward` (sqeuclidean: all ``2 g``, differences
taken first; cosine: from the pair's dot product and norms, in float64). Then:

- ``grad_x``: `_row_gradient_kernel` sums each row's ``k`` pairs in order (no atomics), and
  windows larger than 1x1 are folded back onto the map (``F.fold``, deterministic);
- ``grad_prototypes``: the pairs are bucketed by prototype (a stable sort), and
  `_prototype_gradient_kernel` sums each prototype's bucket in order (no atomics).

Both are deterministic whatever the settings. Accumulated in float32 (float64 for float64
inputs), returned in the inputs' dtypes.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from protokern.backends.triton import launch, tiles
from protokern.backends.triton.min_distance_backward import _pair_gradient, pair_coefficients

PAIRS = launch.fixed_config({"BLOCK_ROWS": 32, "BLOCK_K": 32}, {"BLOCK_ROWS": 128,
                                                                "BLOCK_K": 128})
PROTOTYPES = launch.fixed_config({"BLOCK_K": 64}, {"BLOCK_K": 256}, num_warps=2)


@triton.jit
def _pair_offsets(row, j, indices_ptr, L, OUT_W, sxb, sxh, sxw, spm, K_NEAREST: tl.constexpr):
    """Offsets of pair ``(row, j)``'s window and prototype."""
    image = row // L
    x_rows = tiles.window_offsets(image, row - image * L, OUT_W, sxb, sxh, sxw)
    m = tl.load(indices_ptr + row * K_NEAREST + j)
    return x_rows, m * spm


@triton.jit
def _cosine_coefficients_kernel(
    x_ptr, p_ptr, indices_ptr, grad_ptr, a_ptr, c_ptr, e_ptr,
    N, L, K, OUT_W, PH, PW, sxb, sxd, sxh, sxw, spm, spd, sph, spw,
    K_NEAREST: tl.constexpr, ACC: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ok = row < N
    j = tl.program_id(1)
    x_rows, p_rows = _pair_offsets(tl.where(ok, row, 0), j, indices_ptr, L, OUT_W, sxb, sxh,
                                   sxw, spm, K_NEAREST)
    pair_coefficients(x_ptr, x_rows, p_ptr, p_rows, ok, grad_ptr, row * K_NEAREST + j, a_ptr,
                      c_ptr, e_ptr, K, PH, PW, sxd, sxh, sxw, spd, sph, spw, ACC, BLOCK_ROWS,
                      BLOCK_K)


@triton.jit
def _row_gradient_kernel(
    x_ptr, p_ptr, indices_ptr, a_ptr, c_ptr, out_ptr,
    N, L, K, OUT_W, PH, PW, sxb, sxd, sxh, sxw, spm, spd, sph, spw,
    METRIC: tl.constexpr, K_NEAREST: tl.constexpr, ACC: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    ok = row < N
    k0 = tl.program_id(1) * BLOCK_K
    total = tl.zeros((BLOCK_ROWS, BLOCK_K), ACC)
    for j in tl.static_range(K_NEAREST):
        x_rows, p_rows = _pair_offsets(tl.where(ok, row, 0), j, indices_ptr, L, OUT_W, sxb, sxh,
                                       sxw, spm, K_NEAREST)
        x, p = tiles.load_pairs(x_ptr, x_rows, p_ptr, p_rows, ok, k0, K, PH, PW,
                                sxd, sxh, sxw, spd, sph, spw, False, ACC, BLOCK_K)
        pair = row * K_NEAREST + j
        total += _pair_gradient(x, p, tl.load(a_ptr + pair, mask=ok, other=0.0),
                                tl.load(c_ptr + pair, mask=ok, other=0.0), METRIC)
    k = k0 + tl.arange(0, BLOCK_K)
    # out is (N, K) contiguous
    tl.store(out_ptr + row[:, None] * K + k[None, :], total, mask=ok[:, None] & (k < K)[None, :])


@triton.jit
def _prototype_gradient_kernel(
    x_ptr, p_ptr, order_ptr, starts_ptr, c_ptr, e_ptr, out_ptr,
    L, K, OUT_W, PH, PW, sxb, sxd, sxh, sxw, spm, spd, sph, spw,
    METRIC: tl.constexpr, K_NEAREST: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    p = tl.load(p_ptr + m * spm + tiles.entry_offsets(k, PH, PW, spd, sph, spw),
                mask=k_ok, other=0.0).to(ACC)[None, :]
    total = tl.zeros((1, BLOCK_K), ACC)
    x_entries = tiles.entry_offsets(k, PH, PW, sxd, sxh, sxw)
    for slot in range(tl.load(starts_ptr + m), tl.load(starts_ptr + m + 1)):
        pair = tl.load(order_ptr + slot) + tl.zeros((1,), tl.int64)  # = row * K_NEAREST + j
        row = pair // K_NEAREST
        image = row // L
        x_rows = tiles.window_offsets(image, row - image * L, OUT_W, sxb, sxh, sxw)
        x = tl.load(x_ptr + x_rows[:, None] + x_entries[None, :], mask=k_ok[None, :],
                    other=0.0).to(ACC)
        total += _pair_gradient(p, x, tl.load(e_ptr + pair), tl.load(c_ptr + pair), METRIC)
    # out is (M, K) contiguous
    tl.store(out_ptr + m * K + k, tl.reshape(total, (BLOCK_K,)), mask=k_ok)


def nearest_prototypes_backward(
    grad_values: Tensor, x: Tensor, prototypes: Tensor, indices: Tensor, metric: str,
    needs_x: bool = True, needs_prototypes: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """`protokern.backends.reference.nearest_prototypes_backward` on canonical inputs (see the
    module doc); a gradient not asked for is None and its kernel does not run."""
    batch, dim, height, width = x.shape
    num, _, ph, pw = prototypes.shape
    out_h, out_w = height - ph + 1, width - pw + 1
    length = out_h * out_w
    rows, k = batch * length, indices.shape[-1]
    size = dim * ph * pw
    acc_dtype, acc = launch.accumulator(x.dtype)
    grad_rows = torch.zeros(rows, size, dtype=acc_dtype, device=x.device) if needs_x else None
    grad_p = torch.zeros(num, size, dtype=acc_dtype, device=x.device) \
        if needs_prototypes else None
    if rows > 0 and size > 0 and (needs_x or needs_prototypes):
        launch.check_grid((triton.cdiv(rows, PAIRS.kwargs["BLOCK_ROWS"]),
                           triton.cdiv(size, PAIRS.kwargs["BLOCK_K"])),
                          "nearest_prototypes_backward", x, prototypes)
        launch.check_grid((num, triton.cdiv(size, PROTOTYPES.kwargs["BLOCK_K"])),
                          "nearest_prototypes_backward", x, prototypes)
        grad = grad_values.reshape(rows, k).to(acc_dtype).contiguous()
        flat_indices = indices.reshape(rows, k).contiguous()
        addressing = (length, size, out_w, ph, pw, *x.stride(), *prototypes.stride())
        row_blocks = triton.cdiv(rows, PAIRS.kwargs["BLOCK_ROWS"])
        with launch.on_device(x):
            if metric == "sqeuclidean":
                a = c = e = 2 * grad
            else:
                # in float64, as min_distance_backward: |v|^2 and g / |v|^2 leave float32's range
                a, c, e = (torch.empty_like(grad, dtype=torch.float64) for _ in range(3))
                launch.Fixed(_cosine_coefficients_kernel, PAIRS)[(row_blocks, k)](
                    x, prototypes, flat_indices, grad, a, c, e, rows, *addressing,
                    K_NEAREST=k, ACC=tl.float64)
            if grad_rows is not None:
                launch.Fixed(_row_gradient_kernel, PAIRS)[
                    (row_blocks, triton.cdiv(size, PAIRS.kwargs["BLOCK_K"]))
                ](x, prototypes, flat_indices, a, c, grad_rows, rows, *addressing,
                  METRIC=metric, K_NEAREST=k, ACC=acc)
            if grad_p is not None:
                order, starts = _buckets(flat_indices, num)
                launch.Fixed(_prototype_gradient_kernel, PROTOTYPES)[
                    (num, triton.cdiv(size, PROTOTYPES.kwargs["BLOCK_K"]))
                ](x, prototypes, order, starts, c, e, grad_p, *addressing, METRIC=metric,
                  K_NEAREST=k, ACC=acc)
    grad_x = None
    if grad_rows is not None:
        windows = grad_rows.view(batch, length, size)
        if (ph, pw) == (1, 1):
            grad_x = windows.view(batch, height, width, dim).permute(0, 3, 1, 2)
        else:
            grad_x = F.fold(windows.transpose(1, 2), (height, width), (ph, pw))
        grad_x = grad_x.to(x.dtype)
    if grad_p is not None:
        grad_p = grad_p.reshape(prototypes.shape).to(prototypes.dtype)
    return grad_x, grad_p


def _buckets(indices: Tensor, num: int) -> tuple[Tensor, Tensor]:
    """The flat pairs ``row * k + j`` bucketed by prototype: ``order`` lists them by prototype
    (stable: increasing within one), bucket ``m`` is ``order[starts[m]:starts[m + 1]]``."""
    prototypes, order = torch.sort(indices.flatten(), stable=True)
    bounds = torch.arange(num + 1, device=indices.device)
    return order.contiguous(), torch.searchsorted(prototypes, bounds).contiguous()
