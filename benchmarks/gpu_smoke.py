"""Smoke check of the GPU backends against the float64 reference, for a first lent GPU.

    python3 benchmarks/gpu_smoke.py --json OUT/smoke.json             # on a GPU: cuda, triton
    TRITON_INTERPRET=1 python3 benchmarks/gpu_smoke.py --device cpu   # dry run: triton only

Every (backend, metric, layout, precision): `pk.min_distance` on small random inputs, its
values against the float64 reference's (relative error, DESIGN §5's tolerance), its indices
(each the reference's or a near-tie of it) and both gradients of ``sum(weights * values)``
against float64 autograd at the positions the backend chose. Layouts: NCHW, channels_last,
(B, L, D) tokens and tokens with L = 1; precisions: float32 (IEEE GEMMs), TF32 (float32 with
TF32 matmuls allowed) and bfloat16. Then, for the ``cuda`` backend (whose kernel nothing
else has run; triton's runs in its interpreter on every CI run), `pk.nearest_prototypes` with
k = 3 on (N, D) vectors and a channels_last map, per metric and precision: its values against
the k smallest float64 distances, each index's true distance against its value, and both
gradients against float64 autograd through the pairs it chose. A call a backend refuses by its
rules is reported as such, not as a failure; any other error, or a kernel that ran on another
backend, is a failure. Exit status 1 on any failure. On CPU tensors (the dry run) TF32 is a
CUDA setting and changes nothing.
"""

import argparse
import json
import sys
import time
import traceback

import torch

import protokern as pk
from protokern import backends as registry
from protokern.testing import TF32_TOLERANCE, TOLERANCE, near_tie_ok, relative_error

PRECISIONS = {"float32": (torch.float32, False), "tf32": (torch.float32, True),
              "bfloat16": (torch.bfloat16, False)}
LAYOUTS = ("nchw", "channels_last", "tokens", "tokens-L1")
METRICS = ("sqeuclidean", "cosine")
# Small, but cutting every Triton and CUDA tile unevenly (M = 70, D = 40, L = 42, 11 or 1: one
# position per image is the Triton kernel's own path, with tf32x3 where TF32 is allowed)
MAP_SHAPE, NUM_PROTOTYPES = (3, 40, 6, 7), 70
TOKENS_SHAPES = {"tokens": (3, 11, 40), "tokens-L1": (5, 1, 40)}
# nearest_prototypes: 150 vectors or a 3 x 6 x 7 map (126 windows): rows cut the cuda search's
# blocks of 64 unevenly, as the 70 prototypes cut its tiles of 64
NEAREST_BACKENDS = ("cuda",)
NEAREST_LAYOUTS = {"vectors": (150, 40), "channels_last": MAP_SHAPE}
NEAREST_K = 3


def make_inputs(layout: str, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """``(x, prototypes, weights)``: x in ``layout``, prototypes ``(M, D)``, weights ``(B, M)``
    of the values in the loss."""
    if layout in TOKENS_SHAPES:
        x = torch.randn(TOKENS_SHAPES[layout], device=device)
    else:
        x = torch.randn(MAP_SHAPE, device=device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    p = torch.randn(NUM_PROTOTYPES, x.shape[-1] if layout in TOKENS_SHAPES else x.shape[1],
                    device=device)
    weights = torch.randn(x.shape[0], NUM_PROTOTYPES, device=device)
    return x.to(dtype), p.to(dtype), weights.to(dtype)


def oracle(x: torch.Tensor, p: torch.Tensor, metric: str, weights: torch.Tensor,
           indices: torch.Tensor) -> dict:
    """float64: every distance ``(B, M, L')``, and the gradients of ``sum(weights * distance
    at indices)``, by autograd through the reference's distance map."""
    xd = x.detach().double().requires_grad_()
    pd = p.detach().double().requires_grad_()
    with pk.use_backend("reference"):
        dist = pk.distance_map(xd, pd, metric).flatten(2)
    chosen = dist.gather(-1, indices[..., None])[..., 0]
    grad_x, grad_p = torch.autograd.grad((chosen * weights.double()).sum(), (xd, pd))
    return {"distances": dist.detach(), "grad_x": grad_x, "grad_p": grad_p}


def check(backend: str, metric: str, layout: str, precision: str, device: str) -> dict:
    """One case: a record with the errors, the tolerance and ``status`` (ok, failed,
    refused)."""
    dtype, tf32 = PRECISIONS[precision]
    record = {"op": "min_distance", "backend": backend, "metric": metric, "layout": layout,
              "precision": precision, "device": device}
    if device == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
    tol = TF32_TOLERANCE if tf32 and device == "cuda" else TOLERANCE[dtype]
    x, p, weights = make_inputs(layout, dtype, device)
    xg, pg = x.detach().requires_grad_(), p.detach().requires_grad_()
    try:
        with pk.recording() as calls, pk.use_backend(backend):
            values, indices = pk.min_distance(xg, pg, metric)
            (values * weights).sum().backward()
    except ValueError as error:
        if "cannot run this call" in str(error):
            return {**record, "status": "refused", "reason": str(error).split(": ")[-1]}
        raise
    want = oracle(x, p, metric, weights, indices)
    ran = sorted({name for _, name in calls})
    errors = {"values": relative_error(values, want["distances"].amin(-1)),
              "grad_x": relative_error(xg.grad, want["grad_x"]),
              "grad_p": relative_error(pg.grad, want["grad_p"])}
    indices_ok = bool(near_tie_ok(indices, want["distances"], tol).all())
    ok = all(e <= tol for e in errors.values()) and indices_ok and ran == [backend]
    return {**record, "status": "ok" if ok else "failed", "tolerance": tol, "errors": errors,
            "indices_ok": indices_ok, "ran_on": ran}


def nearest_oracle(x: torch.Tensor, p: torch.Tensor, metric: str, weights: torch.Tensor,
                   indices: torch.Tensor) -> dict:
    """float64: every distance ``(rows, M)`` (rows as `pk.nearest_prototypes` orders them) and
    the gradients of ``sum(weights * distance at the chosen pairs)``."""
    xd = x.detach().double().requires_grad_()
    pd = p.detach().double().requires_grad_()
    as_map = xd.T[None, :, :, None] if xd.dim() == 2 else xd  # (N, D) -> (1, D, N, 1)
    with pk.use_backend("reference"):
        rows = pk.distance_map(as_map, pd, metric).flatten(2).transpose(1, 2).flatten(0, 1)
    k = indices.shape[-1]
    chosen = rows.gather(1, indices.reshape(-1, k))
    grad_x, grad_p = torch.autograd.grad((chosen * weights.reshape(-1, k).double()).sum(),
                                         (xd, pd))
    return {"distances": rows.detach(), "grad_x": grad_x, "grad_p": grad_p}


def check_nearest(backend: str, metric: str, layout: str, precision: str, device: str) -> dict:
    """`check` for `pk.nearest_prototypes` (k = NEAREST_K): values against the k smallest
    float64 distances, each index's true distance within the tolerance of its value."""
    dtype, tf32 = PRECISIONS[precision]
    record = {"op": "nearest_prototypes", "backend": backend, "metric": metric,
              "layout": layout, "precision": precision, "device": device}
    if device == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
    tol = TF32_TOLERANCE if tf32 and device == "cuda" else TOLERANCE[dtype]
    x = torch.randn(NEAREST_LAYOUTS[layout], device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype)
    p = torch.randn(NUM_PROTOTYPES, x.shape[1], device=device).to(dtype)
    xg, pg = x.detach().requires_grad_(), p.detach().requires_grad_()
    try:
        with pk.recording() as calls, pk.use_backend(backend):
            values, indices = pk.nearest_prototypes(xg, pg, NEAREST_K, metric)
            weights = torch.randn_like(values)
            (values * weights).sum().backward()
    except ValueError as error:
        if "cannot run this call" in str(error):
            return {**record, "status": "refused", "reason": str(error).split(": ")[-1]}
        raise
    want = nearest_oracle(x, p, metric, weights, indices)
    ran = sorted({name for _, name in calls})
    got = values.reshape(-1, NEAREST_K).double()
    smallest = want["distances"].sort(1).values[:, :NEAREST_K]
    scale = smallest.abs().max().clamp_min(1.0)
    at_indices = want["distances"].gather(1, indices.reshape(-1, NEAREST_K))
    errors = {"values": relative_error(got, smallest),
              "grad_x": relative_error(xg.grad, want["grad_x"]),
              "grad_p": relative_error(pg.grad, want["grad_p"])}
    indices_ok = bool(((at_indices - got).abs() <= tol * scale).all())
    ok = all(e <= tol for e in errors.values()) and indices_ok and ran == [backend]
    return {**record, "status": "ok" if ok else "failed", "tolerance": tol, "errors": errors,
            "indices_ok": indices_ok, "ran_on": ran}


def run_case(records: list, checker, backend: str, metric: str, layout: str, precision: str,
             args: argparse.Namespace) -> None:
    """Runs ``checker`` (`check` or `check_nearest`) on one case, prints and records it."""
    op = "nearest_prototypes" if checker is check_nearest else "min_distance"
    start = time.perf_counter()
    try:
        record = checker(backend, metric, layout, precision, args.device)
    except Exception as error:  # report and go on: one case must not hide all
        record = {"op": op, "backend": backend, "metric": metric,
                  "layout": layout, "precision": precision, "status": "failed",
                  "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc()}
    record["seconds"] = round(time.perf_counter() - start, 2)
    records.append(record)
    errors = " ".join(f"{k} {v:.1e}" for k, v in record.get("errors", {}).items())
    print(f"{record['status']:>8} {op:18} {backend:7} {metric:11} {layout:13} {precision:8} "
          f"{errors} {record.get('error', '')}{record.get('reason', '')} "
          f"({record['seconds']} s)", flush=True)
    if args.json:  # rewritten after every case: a cut-short run keeps its data
        with open(args.json, "w") as out:
            json.dump(records, out, indent=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default="cuda,triton",
                        help="comma-separated; those not available here are reported, skipped")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args()
    if "triton" in pk.available_backends(args.device):
        # correctness, not speed: one configuration per kernel, not an autotuning per shape
        from protokern.backends.triton import launch

        launch.Tuned.narrowed = True
    available = pk.available_backends(args.device)
    records = []
    for backend in args.backends.split(","):
        if backend not in available:
            reason = registry.registered_backend(backend).unavailable_reason()
            print(f"{backend}: not available on {args.device} ({reason})")
            records.append({"backend": backend, "status": "unavailable", "reason": reason})
            continue
        for metric in METRICS:
            for layout in LAYOUTS:
                for precision in PRECISIONS:
                    run_case(records, check, backend, metric, layout, precision, args)
        if backend in NEAREST_BACKENDS:
            for metric in METRICS:
                for layout in NEAREST_LAYOUTS:
                    for precision in PRECISIONS:
                        run_case(records, check_nearest, backend, metric, layout, precision,
                                 args)
    failed = [r for r in records if r["status"] == "failed"]
    print(f"{len(records)} cases: {len(failed)} failed, "
          f"{sum(r['status'] == 'ok' for r in records)} ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
