"""Bytes the Triton forward's second pass (`_exact_kernel`) reads, per GPU benchmark shape,
before and after it became certify-only: a model of the kernels' reads, with the fraction of
pairs the first pass leaves to it measured by replaying `_choose_kernel`'s certificate on the
bench's own seeded inputs (in float32 on the CPU, on the first images of the batch).

    PYTHONPATH=. python benchmarks/recompute_bytes.py --json benchmarks/results/recompute-bytes.json

Before: every (b, m) pair read its chosen window and its prototype, ``2 K`` entries, plus
``L x 2 K`` for the pairs it searched. After: every pair's 8-byte code (position or mark), and
``2 K`` entries only for the pairs whose value the first kernel could not give (those whose
expansion cancelled more than one bit), ``L x 2 K`` for the searched ones. With TF32 GEMMs and
L > 1 the first kernel gives every certified value itself, computed directly in its epilogue
(``epilogue_bytes``: read from rows it has just streamed, in L2, within the same kernel).
The replay: the expansion and its bounds exactly as `tiles.distance_bounds` and
`min_distance.rounding_bound` define them, with float32 dots of the (bfloat16-rounded) inputs:
the GPU's rounding differs in the last bits, not in which pairs certify, except near-ties.
"""

import argparse
import json

import torch

from protokern.backends.triton.min_distance import rounding_bound
from protokern.bench.measure import make_inputs
from protokern.bench.shapes import parse_shapes

ELEMENT = {"bfloat16": 2, "tf32": 4}


def replay(x: torch.Tensor, p: torch.Tensor, metric: str, precision: str) -> dict:
    """Fractions of pairs ``(B, M)`` that `_choose_kernel` certifies and whose value it gives,
    for ``x`` ``(B, D, H, W)`` and 1x1 prototypes ``(M, D, 1, 1)`` already in their dtype."""
    rows = x.float().flatten(2).transpose(1, 2)  # (B, L, D)
    protos = p.float().flatten(1)
    growth, floor = rounding_bound(rows, rows.shape[-1], metric,
                                   "tf32x3" if precision == "tf32" and rows.shape[1] == 1
                                   else precision)
    dots = rows @ protos.T  # (B, L, M)
    x_sq = rows.square().sum(-1)[..., None]
    p_sq = protos.square().sum(-1)
    if metric == "sqeuclidean":
        low = ((1 - growth) * x_sq - floor) + (1 - growth) * p_sq - 2 * dots
        high = ((1 + growth) * x_sq + floor) + (1 + growth) * p_sq - 2 * dots
    else:
        similarity = dots / x_sq.sqrt().clamp_min(1e-8) / p_sq.sqrt().clamp_min(1e-8)
        low, high = (1 - growth) - similarity, (1 + growth) - similarity
    lowest, at = low.min(1)
    others = low.scatter(1, at[:, None], float("inf"))
    runner_up = others.min(1).values if low.shape[1] > 1 else torch.full_like(lowest, torch.inf)
    upper = high.min(1).values
    certified = runner_up > upper
    exact_enough = (upper - lowest <= 4 * growth * lowest) if metric == "sqeuclidean" \
        else torch.ones_like(certified)
    tile_values = precision != "tf32" or rows.shape[1] == 1
    from_tile = certified & exact_enough & tile_values
    # TF32 with L > 1: no value from the tile; every certified one computed directly in
    # _choose_kernel's epilogue (values_at_positions)
    in_epilogue = certified & (not tile_values)
    return {"certified": certified.double().mean().item(),
            "value_from_tile": from_tile.double().mean().item(),
            "value_in_epilogue": in_epilogue.double().mean().item()}


def shape_bytes(shape, dtype: str, metric: str, images: int) -> dict:
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    x, p, _ = make_inputs(shape, torch_dtype, "cpu")
    fractions = replay(x[:images], p, metric, "tf32" if dtype == "tf32" else "ieee")
    pairs = shape.batch * shape.num_prototypes
    length = shape.height * shape.width
    entry = 2 * shape.dim * ELEMENT[dtype]  # a window and a prototype
    searched = 1 - fractions["certified"]
    before = pairs * (entry + searched * length * entry)
    recompute = (fractions["certified"] - fractions["value_from_tile"]
                 - fractions["value_in_epilogue"])
    after = pairs * (8 + recompute * entry + searched * length * entry)
    return {"shape": shape.name, "dtype": dtype, "metric": metric, "pairs": pairs,
            "images_replayed": min(images, shape.batch), **fractions,
            "bytes_before": before, "bytes_after": after,
            "epilogue_bytes": pairs * fractions["value_in_epilogue"] * entry}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="cub,imagenet,large_bank,cil_vectors")
    parser.add_argument("--images", type=int, default=4, help="images replayed per shape "
                        "(cil_vectors: rows x 32)")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args()
    records = []
    for shape in parse_shapes(args.shapes):
        images = args.images * (32 if shape.height * shape.width == 1 else 1)
        for dtype in ELEMENT:
            for metric in ("sqeuclidean", "cosine"):
                record = shape_bytes(shape, dtype, metric, images)
                records.append(record)
                print(f"{record['shape']:12} {dtype:9} {metric:11} certified "
                      f"{record['certified']:.4f} value from tile {record['value_from_tile']:.4f}"
                      f" in epilogue {record['value_in_epilogue']:.4f}"
                      f"  {record['bytes_before'] / 1e9:8.3f} GB -> "
                      f"{record['bytes_after'] / 1e9:8.3f} GB (epilogue reads "
                      f"{record['epilogue_bytes'] / 1e9:.3f} GB)", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": "PYTHONPATH=. python benchmarks/recompute_bytes.py --json "
                       + args.json, "records": records}, out, indent=1)


if __name__ == "__main__":
    main()
