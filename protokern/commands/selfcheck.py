"""`protokern selfcheck`: every backend checked against the float64 reference.

For a few prototype-model shapes, runs min_distance forward and backward on each available
backend and compares values, indices and gradients with the float64 reference; times each
backend side by side with a naive PyTorch formulation (`torch.cdist` then `min`). Each line
says which backend actually ran the calls (`protokern.backends.recording`): a backend that
cannot run a case says so with its reason instead of passing it to another.
"""

import argparse
import math
from dataclasses import dataclass

import torch

from protokern import backends
from protokern.backends import reference
from protokern.baselines import cdist_min
from protokern.ops import canonicalize, min_distance
from protokern.testing import TOLERANCE, near_tie_ok, relative_error
from protokern.timing import median_milliseconds


@dataclass(frozen=True)
class Case:
    name: str
    x_shape: tuple[int, ...]
    prototype_shape: tuple[int, ...]
    metric: str


CASES = (
    Case("feature map, 1x1 prototypes", (16, 64, 7, 7), (500, 64), "sqeuclidean"),
    Case("feature map, 2x2 patches", (8, 32, 7, 7), (200, 32, 2, 2), "sqeuclidean"),
    Case("tokens, cosine", (32, 49, 64), (500, 64), "cosine"),
)


@dataclass(frozen=True)
class CheckResult:
    case: str
    backend: str
    dtype: torch.dtype
    value_error: float
    index_agreement: float
    grad_error: float
    milliseconds: float
    naive_milliseconds: float
    passed: bool
    ran_on: str = ""
    """The backends that ran the calls (the checked one, or a refusal's reason)."""


def check_case(case: Case, backend: str, dtype: torch.dtype, device: str) -> CheckResult:
    x = torch.randn(case.x_shape, device=device, dtype=dtype)
    prototypes = torch.randn(case.prototype_shape, device=device, dtype=dtype)
    weights = torch.rand(case.x_shape[0], case.prototype_shape[0], device=device)

    # the oracle: float64 reference
    x64, p64 = x.double().requires_grad_(), prototypes.double().requires_grad_()
    with backends.use_backend("reference"):
        ref = min_distance(x64, p64, case.metric)
    (ref.values * weights).sum().backward()
    x4, p4, _ = canonicalize(x64.detach(), p64.detach(), case.metric, "selfcheck")
    ref_distances = reference.distance_map(x4, p4, case.metric).flatten(2)

    xb, pb = x.clone().requires_grad_(), prototypes.clone().requires_grad_()

    def forward_backward():
        xb.grad = pb.grad = None
        out = min_distance(xb, pb, case.metric)
        (out.values * weights.to(dtype)).sum().backward()
        return out

    x4, p4, _ = canonicalize(xb, pb, case.metric, "selfcheck")
    refusal = backends.backend_named(backend).supports("min_distance", x4, p4,
                                                       metric=case.metric)
    if refusal is not None:
        return CheckResult(case.name, backend, dtype, math.nan, math.nan, math.nan, math.nan,
                           math.nan, True, f"refused: {refusal}")
    with backends.use_backend(backend), backends.recording() as calls:
        out = forward_backward()
        milliseconds = median_milliseconds(forward_backward, repeats=3)
    ran_on = ", ".join(sorted({name for _, name in calls}))

    naive_ms = float("nan")
    if case.metric == "sqeuclidean" and len(case.prototype_shape) == 2:
        xn, pn = x.clone().requires_grad_(), prototypes.clone().requires_grad_()
        x4n, p4n, _ = canonicalize(xn, pn, case.metric, "selfcheck")
        naive_ms = median_milliseconds(lambda: cdist_min(x4n, p4n)[0].sum().backward(),
                                       repeats=3)

    tol = TOLERANCE[dtype]
    value_error = relative_error(out.values, ref.values)
    agreement = near_tie_ok(out.indices, ref_distances, tol).double().mean().item()
    grad_error = max(relative_error(xb.grad, x64.grad), relative_error(pb.grad, p64.grad))
    passed = (value_error <= tol and agreement == 1.0 and grad_error <= tol
              and ran_on == backend)
    return CheckResult(case.name, backend, dtype, value_error, agreement, grad_error,
                       milliseconds, naive_ms, passed, ran_on)


def run_selfcheck(device: str = "cpu", seed: int = 0,
                  names: list[str] | None = None) -> list[CheckResult]:
    """Check every case on the backends ``names`` (default: every backend available for
    ``device``), in float32 and bfloat16."""
    torch.manual_seed(seed)
    return [
        check_case(case, backend, dtype, device)
        for case in CASES
        for backend in names or backends.available_backends(device)
        for dtype in (torch.float32, torch.bfloat16)
    ]


def format_table(results: list[CheckResult]) -> str:
    header = (f"{'case':<28} {'backend':<10} {'dtype':<9} {'value err':>9} {'indices':>8} "
              f"{'grad err':>9} {'fwd+bwd ms':>10} {'cdist ms':>9} {'ran on':<10} check")
    lines = [header, "-" * len(header)]
    for r in results:
        dtype = str(r.dtype).removeprefix('torch.')
        if r.ran_on.startswith("refused"):
            lines.append(f"{r.case:<28} {r.backend:<10} {dtype:<9} {r.ran_on}")
            continue
        naive = "-" if math.isnan(r.naive_milliseconds) else f"{r.naive_milliseconds:9.2f}"
        lines.append(
            f"{r.case:<28} {r.backend:<10} {dtype:<9} "
            f"{r.value_error:9.1e} {100 * r.index_agreement:7.1f}% {r.grad_error:9.1e} "
            f"{r.milliseconds:10.2f} {naive:>9} {r.ran_on:<10} {'ok' if r.passed else 'FAILED'}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``protokern selfcheck``."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the checked tensors")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--backends", nargs="+", metavar="NAME",
                        help="backends to check (default: every one available for the device)")


def run(args: argparse.Namespace) -> int:
    """``protokern selfcheck``: every backend against the float64 reference; 1 on a failure."""
    import protokern

    print(f"protokern {protokern.__version__}, torch {torch.__version__}, device {args.device}, "
          f"backends: {', '.join(args.backends or backends.available_backends(args.device))}")
    print("Checking min_distance (forward + backward) of every backend against the float64 "
          "reference:\n")
    results = run_selfcheck(args.device, args.seed, args.backends)
    print(format_table(results))
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
