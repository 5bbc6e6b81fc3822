"""Kernel-level profile of the protokern contenders (and the bare-GEMM floor) on named shapes:
`torch.profiler`'s top kernels by device time, per (shape, dtype, pass, contender).

    python3 benchmarks/gpu_profile.py --shapes cub,imagenet,large_bank,cil_vectors \\
        --dtypes bfloat16,tf32 --json OUT/profile.json
    python3 benchmarks/gpu_profile.py --device cpu --shapes tiny --dtypes float32   # dry run

Each case runs the bench's own step (`protokern.bench.contenders.Contender.make_step`, the
bench's seeded inputs) twice untimed (Triton's autotuning and compilation happen there), then
``--calls`` times under the profiler. ``tf32`` is float32 with TF32 matmuls allowed. What it
records: per kernel, its name, calls and total device time over the profiled calls (CPU time
on a CPU device), the top ``--top``. Written after every case (a cut-short run keeps its data).
The times are a profile, not the benchmark: the bench's medians (``protokern bench``) are.
"""

import argparse
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from protokern.bench.contenders import PASSES, all_contenders
from protokern.bench.measure import DTYPES, make_inputs, set_precision
from protokern.bench.shapes import parse_shapes


def top_kernels(prof, device: str, top: int) -> list[dict]:
    """The ``top`` events by self device time (CUDA kernels on a GPU; operators on CPU)."""
    attribute = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attribute) > 0]
    events.sort(key=lambda e: getattr(e, attribute), reverse=True)
    return [{"name": e.key, "calls": e.count, "total_us": round(getattr(e, attribute), 1)}
            for e in events[:top]]


def profile_case(contender, shape, dtype_name: str, pass_name: str, device: str,
                 calls: int, top: int) -> dict:
    dtype = DTYPES["float32" if dtype_name == "tf32" else dtype_name]
    set_precision(device, dtype_name == "tf32")
    x, prototypes, grad = make_inputs(shape, dtype, device)
    step = contender.make_step(x, prototypes, grad, pass_name)
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    return {"kernels": top_kernels(prof, device, top)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="cub,imagenet,large_bank,cil_vectors")
    parser.add_argument("--dtypes", default="bfloat16,tf32",
                        help="comma-separated: float32, tf32 (float32, TF32 allowed), bfloat16")
    parser.add_argument("--passes", default=",".join(PASSES))
    parser.add_argument("--contenders", default="protokern,floor",
                        help="comma-separated contender names or kinds")
    parser.add_argument("--calls", type=int, default=3, help="profiled calls per case")
    parser.add_argument("--top", type=int, default=6, help="kernels kept per case")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args()
    wanted = args.contenders.split(",")
    contenders = [c for c in all_contenders(args.device)
                  if c.name in wanted or c.kind in wanted]
    plan = [(s, d, p, c) for s in parse_shapes(args.shapes) for d in args.dtypes.split(",")
            for p in args.passes.split(",") for c in contenders if c.runs(s)]
    records = []
    for shape, dtype_name, pass_name, contender in tqdm(plan, desc="profile", unit="case"):
        record = {"shape": shape.name, "dtype": dtype_name, "pass": pass_name,
                  "contender": contender.name, "device": args.device}
        try:
            record.update(profile_case(contender, shape, dtype_name, pass_name, args.device,
                                       args.calls, args.top))
            record["status"] = "ok"
        except Exception as error:  # one case must not hide the others
            record.update(status="failed", error=f"{type(error).__name__}: {error}")
        if args.device == "cuda":
            torch.cuda.empty_cache()
        records.append(record)
        kernels = "; ".join(f"{k['name'][:60]} {k['total_us']:.0f}us"
                            for k in record.get("kernels", [])[:3])
        tqdm.write(f"{shape.name} {dtype_name} {pass_name} {contender.name}: "
                   f"{record['status']} {record.get('error', '')}{kernels}")
        if args.json:
            with open(args.json, "w") as out:
                json.dump(records, out, indent=1)
    return 1 if any(r["status"] == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
