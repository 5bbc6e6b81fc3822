"""The bench's outputs: the text table and the results JSON."""

import json
import math
from pathlib import Path
from typing import Any

from protokern.bench.runner import case_group
from protokern.bench.shapes import SHAPES

_HEADER = (f"{'contender':<22} {'median ms':>10} {'min-max ms':>17} {'vs naive':>9} "
           f"{'/ GEMM':>7} {'TFLOP/s':>8} {'peak MiB':>9}")
_KEOPS_HEADER = f" {'vs KeOps':>9}"
_RAN_ON_HEADER = " ran on"


def _ran_on(r: dict) -> str:
    """The protokern backends that ran the case's calls; ``-`` for none (the baselines)."""
    return ", ".join(r.get("ran_on") or []) or "-"


def _group_title(r: dict) -> str:
    dims = f"B={r['batch']} D={r['dim']} {r['height']}x{r['width']} M={r['num_prototypes']}"
    if r["patch"] > 1:
        dims += f" {r['patch']}x{r['patch']} patches"
    if r.get("op") == "nearest_prototypes":
        dims += f", {r['k']} nearest per window"
    under = f"  under load {r['load']}" if r.get("load") else ""
    return (f"{r['shape']} ({dims})  {r['dtype']}  {r['pass']}  "
            f"[{r['gemm_flops'] / 1e9:.2f} GFLOP]{under}")


def _speedup(r: dict, key: str) -> str:
    return "-" if r.get(key) is None else f"{r[key]:.2f}x"


def _row(r: dict, with_keops: bool) -> str:
    if r["status"] != "ok":
        return f"{r['contender']:<22} {r['status']}: {r['reason']}"
    ms = 1e3
    spread = f"{r['min_s'] * ms:.2f}-{r['max_s'] * ms:.2f}"
    ratio = r.get("ratio_to_floor")
    row = (f"{r['contender']:<22} {r['median_s'] * ms:10.2f} {spread:>17} "
           f"{_speedup(r, 'speedup_vs_best_naive'):>9} "
           f"{'-' if ratio is None else f'{ratio:.2f}':>7} {r['tflops']:8.3f} "
           f"{r['peak_bytes'] / 2**20:9.1f}")
    row += f" {_speedup(r, 'speedup_vs_keops'):>9}" if with_keops else ""
    return row + f" {_ran_on(r)}"


def format_table(results: list[dict]) -> str:
    """One block per (shape, dtype, pass): each contender's median time and min-max spread,
    speed-up over the fastest naive PyTorch contender, time over the bare GEMM's, achieved
    TFLOP/s (of the GEMM's 2 B L' M K FLOPs), peak memory beyond the inputs, in a block where
    KeOps ran the speed-up over KeOps, and the protokern backends that ran the calls (``ran
    on``: a ``protokern:<backend>`` row is only timed when that is its backend alone)."""
    blocks: dict[tuple, list[dict]] = {}
    for r in results:
        blocks.setdefault(case_group(r), []).append(r)
    lines = []
    for group in blocks.values():
        with_keops = any("speedup_vs_keops" in r for r in group)
        header = _HEADER + (_KEOPS_HEADER if with_keops else "") + _RAN_ON_HEADER
        lines += ["", _group_title(group[0]), header, "-" * len(header)]
        lines += [_row(r, with_keops) for r in group]
    return "\n".join(lines[1:])


def format_load_comparison(results: list[dict], fair_share: float | None = None) -> str:
    """Per (shape, dtype, pass, contender) timed both quiet and under a competing load: the
    median quiet and loaded, the slowdown (loaded / quiet), both times over the bare GEMM's (each
    against the GEMM timed under the same load), and for contenders that are not naive, the
    slowdown of the naive contender fastest quiet, which one, and ours over it with its nominal
    90% interval over the rounds (`protokern.bench.slowdown`; below 1: degrades less).
    ``fair_share``, if given, is said in the title: what a perfectly parallel call would lose
    if every runnable thread got an equal share of the cores.
    Empty if nothing ran under a load."""
    quiet = {(r["shape"], r["dtype"], r["pass"], r["contender"]): r for r in results
             if not r.get("load") and r["status"] == "ok"}
    loaded = [r for r in results if r.get("load") and r["status"] == "ok"]
    pairs = [(quiet[key], r) for r in loaded
             if (key := (r["shape"], r["dtype"], r["pass"], r["contender"])) in quiet]
    if not pairs:
        return ""

    def ratio(r: dict) -> str:
        return "-" if r.get("ratio_to_floor") is None else f"{r['ratio_to_floor']:.2f}"

    def against_naive(r: dict) -> str:
        if r.get("slowdown_vs_naive") is None:
            return f"{'-':>9} {'-':>20} {'-':<14}"
        low_high = r.get("slowdown_vs_naive_interval")
        spread = f" ({low_high[0]:.2f}-{low_high[1]:.2f})" if low_high else ""
        return (f"{r['naive_slowdown']:8.2f}x {r['slowdown_vs_naive']:.2f}{spread:>16} "
                f"{r.get('slowdown_naive', ''):<14}")

    header = (f"{'shape':<12} {'dtype':<9} {'pass':<17} {'contender':<22} {'quiet ms':>9} "
              f"{'loaded ms':>10} {'slowdown':>9} {'/ GEMM quiet':>13} {'/ GEMM loaded':>14} "
              f"{'naive':>9} {'vs naive (90%)':>20} {'naive is':<14}")
    title = f"quiet vs under load {pairs[0][1]['load']} competing process(es)"
    if fair_share is not None:
        title += f"; fair-share slowdown: {fair_share:.2f}x (equal shares per thread)"
    lines = [title, header, "-" * len(header)]
    for q, r in pairs:
        lines.append(f"{r['shape']:<12} {r['dtype']:<9} {r['pass']:<17} {r['contender']:<22} "
                     f"{q['median_s'] * 1e3:9.2f} {r['median_s'] * 1e3:10.2f} "
                     f"{r['median_s'] / q['median_s']:8.2f}x {ratio(q):>13} {ratio(r):>14} "
                     f"{against_naive(r)}")
    return "\n".join(lines)


def format_markdown(results: list[dict]) -> str:
    """The table of `format_table` as one Markdown table (for benchmarks/NOTES.md); the
    ``vs KeOps`` column only if KeOps ran for some case."""
    with_keops = any("speedup_vs_keops" in r for r in results)
    columns = ["shape", "dtype", "pass", "contender", "median ms", "min-max ms", "vs best naive",
               "/ GEMM", "TFLOP/s", "peak MiB"] + (["vs KeOps"] if with_keops else []) + [
                   "ran on"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        shape = r["shape"] + (f" (load {r['load']})" if r.get("load") else "")
        case = f"| {shape} | {r['dtype']} | {r['pass']} | {r['contender']} |"
        if r["status"] != "ok":
            lines.append(f"{case} {r['status']}: {r['reason']} |" + " |" * (len(columns) - 6)
                         + f" {_ran_on(r)} |")
            continue
        ratio = r.get("ratio_to_floor")
        lines.append(
            f"{case} {r['median_s'] * 1e3:.2f} | {r['min_s'] * 1e3:.2f}-{r['max_s'] * 1e3:.2f} | "
            f"{_speedup(r, 'speedup_vs_best_naive')} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | {r['tflops']:.3f} | "
            f"{r['peak_bytes'] / 2**20:.1f} |"
            + (f" {_speedup(r, 'speedup_vs_keops')} |" if with_keops else "")
            + f" {_ran_on(r)} |")
    return "\n".join(lines)


def write_json(path: str | Path, environment: dict, results: list[dict],
               scaling: list[dict] | None = None) -> None:
    """Write everything (environment, every raw timing) to ``path``, creating its folder.

    Strict JSON: a non-finite float (an inf speed-up of a zero time, a NaN) becomes ``null``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = {r["shape"] for r in results if r["shape"] in SHAPES}
    document = {
        "environment": environment,
        "shapes": {name: SHAPES[name].describe() for name in sorted(shapes)},
        "results": results,
        "scaling": scaling or [],
    }
    # json.dumps never hands a float to `default=`, so non-finite ones are replaced up front
    path.write_text(json.dumps(finite_or_null(document), indent=1, default=str,
                               allow_nan=False))


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float in its dicts, lists and tuples replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value
