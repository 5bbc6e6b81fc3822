"""The bench's outputs: the text table and the results JSON."""

import json
import math
from pathlib import Path

from protokern.bench.shapes import SHAPES

_HEADER = (f"{'contender':<22} {'median ms':>10} {'min-max ms':>17} {'vs naive':>9} "
           f"{'/ GEMM':>7} {'TFLOP/s':>8} {'peak MiB':>9}")


def _group_title(r: dict) -> str:
    dims = f"B={r['batch']} D={r['dim']} {r['height']}x{r['width']} M={r['num_prototypes']}"
    if r["patch"] > 1:
        dims += f" {r['patch']}x{r['patch']} patches"
    return f"{r['shape']} ({dims})  {r['dtype']}  {r['pass']}  [{r['gemm_flops'] / 1e9:.2f} GFLOP]"


def _row(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['contender']:<22} {r['status']}: {r['reason']}"
    ms = 1e3
    spread = f"{r['min_s'] * ms:.2f}-{r['max_s'] * ms:.2f}"
    speedup = r.get("speedup_vs_best_naive")
    ratio = r.get("ratio_to_floor")
    return (f"{r['contender']:<22} {r['median_s'] * ms:10.2f} {spread:>17} "
            f"{'-' if speedup is None else f'{speedup:.2f}x':>9} "
            f"{'-' if ratio is None else f'{ratio:.2f}':>7} {r['tflops']:8.3f} "
            f"{r['peak_bytes'] / 2**20:9.1f}")


def format_table(results: list[dict]) -> str:
    """One block per (shape, dtype, pass): each contender's median time and min-max spread,
    speed-up over the fastest naive contender, time over the bare GEMM's, achieved TFLOP/s
    (of the GEMM's 2 B L' M K FLOPs) and peak memory beyond the inputs."""
    blocks: dict[tuple, list[dict]] = {}
    for r in results:
        blocks.setdefault((r["shape"], r["dtype"], r["pass"]), []).append(r)
    lines = []
    for group in blocks.values():
        lines += ["", _group_title(group[0]), _HEADER, "-" * len(_HEADER)]
        lines += [_row(r) for r in group]
    return "\n".join(lines[1:])


def format_markdown(results: list[dict]) -> str:
    """The table of `format_table` as one Markdown table (for benchmarks/NOTES.md)."""
    lines = ["| shape | dtype | pass | contender | median ms | min-max ms | vs best naive | / GEMM "
             "| TFLOP/s | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        case = f"| {r['shape']} | {r['dtype']} | {r['pass']} | {r['contender']} |"
        if r["status"] != "ok":
            lines.append(f"{case} {r['status']}: {r['reason']} | | | | | |")
            continue
        speedup = r.get("speedup_vs_best_naive")
        ratio = r.get("ratio_to_floor")
        lines.append(
            f"{case} {r['median_s'] * 1e3:.2f} | {r['min_s'] * 1e3:.2f}-{r['max_s'] * 1e3:.2f} | "
            f"{'-' if speedup is None else f'{speedup:.2f}x'} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | {r['tflops']:.3f} | "
            f"{r['peak_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def write_json(path: str | Path, environment: dict, results: list[dict],
               scaling: list[dict] | None = None) -> None:
    """Write everything (environment, every raw timing) to ``path``, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = {r["shape"] for r in results if r["shape"] in SHAPES}
    document = {
        "environment": environment,
        "shapes": {name: SHAPES[name].describe() for name in sorted(shapes)},
        "results": results,
        "scaling": scaling or [],
    }
    path.write_text(json.dumps(document, indent=1, default=_json_default, allow_nan=False))


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
