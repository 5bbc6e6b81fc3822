"""Property-based fuzzing of `topk_distance` and `mean_distance` (with the four metrics) on
every backend (the ``backend`` fixture), against the float64 brute force, as
tests/test_fuzz_nearest.py does for `nearest_prototypes`.

Hypothesis draws tokens ``(B, L, D)`` or maps ``(B, D, H, W)`` with a ``ph x pw`` window, the
layout, ``M``, ``k`` (up to ``H' W'``), the metric, the dtype and sometimes a special input
(integer data full of ties, a prototype copied from a patch, NaN). A call the chosen backend
refuses (`Backend.supports`) runs on the reference instead.
Checked: top-k values within tolerance, each index's true distance its value, indices exact
where the data is tie-free float64 or made of ties (lowest position first), NaN first; means
within tolerance; for a subset, both gradients of both ops against the brute force's. Profiles
as in tests/test_fuzz.py (``PROTOKERN_FUZZ=long``, ``PROTOKERN_FUZZ_EXAMPLES``).
"""

import contextlib
from dataclasses import dataclass

import pytest
import torch
from brute_force import distances
from cases import FULL_PRECISION, HALF_PRECISION, map_layout, token_layout
from cases import interpreted as runs_interpreted
from helpers import assert_gradients_close_where_finite, first_k
from hypothesis import given, settings
from hypothesis import strategies as st

import protokern as pk
from protokern import env
from protokern.backends import get_backend, registry
from protokern.ops import canonicalize, kernel_metric
from protokern.testing import TOLERANCE

LONG = env.text("PROTOKERN_FUZZ") == "long"
EXAMPLES = env.integer("PROTOKERN_FUZZ_EXAMPLES", 4000) if LONG else 40
METRICS = ("sqeuclidean", "cosine", "euclidean", "dot")

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@dataclass
class Problem:
    shape: tuple[int, ...]
    prototype_shape: tuple[int, ...]
    k: int
    metric: str
    dtype: torch.dtype
    layout: str
    special: str
    seed: int
    gradients: bool


@st.composite
def problems(draw, interpreted: bool) -> Problem:
    small = interpreted and not LONG
    dim = draw(st.integers(1, 24 if small else 160))
    num = draw(st.integers(1, 12 if small else 80))
    if draw(st.booleans()):
        length = draw(st.integers(1, 12))
        shape, window, layouts = (draw(st.integers(1, 3)), length, dim), (1, 1), [
            "contiguous", "transposed", "sliced"]
        positions = length
    else:
        height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        window = (draw(st.integers(1, height)), draw(st.integers(1, width)))
        shape = (draw(st.integers(1, 3)), dim, height, width)
        layouts = ["contiguous", "channels_last", "permuted", "sliced"]
        positions = (height - window[0] + 1) * (width - window[1] + 1)
    return Problem(
        shape, (num, dim, *window), draw(st.integers(1, positions)),
        draw(st.sampled_from(METRICS)),
        draw(st.sampled_from(FULL_PRECISION + FULL_PRECISION + HALF_PRECISION)),
        draw(st.sampled_from(layouts)), draw(st.sampled_from(["none", "ties", "copy", "nan"])),
        draw(st.integers(0, 2**31 - 1)), draw(st.booleans()))


def make(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(problem.seed)
    x = torch.randn(problem.shape, generator=generator, dtype=torch.float64)
    p = torch.randn(problem.prototype_shape, generator=generator, dtype=torch.float64)
    if problem.special == "ties":  # small integers: many exactly equal distances
        x, p = x.mul(2).round(), p.mul(2).round()
    elif problem.special == "copy" and p.shape[2:] == (1, 1):  # as after a push
        p[-1, :, 0, 0] = x[0, 0] if x.dim() == 3 else x[0, :, 0, 0]
    elif problem.special == "nan":
        x.view(-1)[x.numel() // 3] = float("nan")
    if x.dim() == 3:
        p = p[:, :, 0, 0]
    x, p = x.to(problem.dtype), p.to(problem.dtype)
    device = torch.get_default_device()
    x, p = x.to(device), p.to(device)
    return (token_layout(x, problem.layout) if x.dim() == 3
            else map_layout(x, problem.layout)), p


def on_a_backend_that_runs(op: str, x, p, metric: str, **options):
    """The chosen backend where it accepts the call, else the reference (what the automatic
    choice falls back to where no fused backend runs it)."""
    x4, p4, _ = canonicalize(x, p, metric, "test")
    chosen = registry.registered_backend(get_backend())
    refused = chosen.supports(op, x4, p4, metric=kernel_metric(metric), **options)
    return pk.use_backend("reference") if refused else contextlib.nullcontext()


def check(problem: Problem) -> None:
    x, p = make(problem)
    metric, k = problem.metric, problem.k
    full = problem.dtype in FULL_PRECISION
    tol = TOLERANCE[problem.dtype] if full else 2e-2
    xg, pg = x.detach().requires_grad_(), p.detach().requires_grad_()
    with on_a_backend_that_runs("topk_distance", x, p, metric, k=k):
        topk = pk.topk_distance(xg, pg, k, metric)
    with on_a_backend_that_runs("mean_distance", x, p, metric):
        mean = pk.mean_distance(xg, pg, metric)
    values, indices = topk.values.detach(), topk.indices
    d = distances(x, p, metric)  # (B, M, L')
    want_values, want_indices = first_k(d.flatten(0, 1), k)
    want_values, want_indices = want_values.view(values.shape), want_indices.view(values.shape)
    want_mean = d.mean(-1)
    assert torch.equal(values.isnan(), want_values.isnan())
    assert torch.equal(mean.isnan(), want_mean.isnan())
    known = ~d.isnan().any(-1)  # (B, M): no NaN position
    if problem.special == "nan":
        assert torch.equal(indices[~known][:, 0], want_indices[~known][:, 0])
    values, indices, want_values = values[known], indices[known], want_values[known]
    scale = d[known].abs().max().clamp_min(1.0) if known.any() else 1.0
    assert ((values.double() - want_values).abs() <= tol * scale).all()
    chosen = d[known].gather(-1, indices)
    assert ((values.double() - chosen).abs() <= tol * scale).all()
    # (cosine's ties on integer data, and between same-signed one-element windows, where it
    # is piecewise constant, are ties in exact arithmetic only: 1 - 2/sqrt(8) and
    # 1 - 3/sqrt(18) differ by an ulp in IEEE double and are equal in torch's vectorised
    # float64 on the AVX-512 host, so the order of such a tie is the library's rounding; the
    # chosen values are checked above)
    one_element = p[0].numel() == 1
    exact_ties = metric != "cosine" or (problem.special == "none" and not one_element)
    if full and problem.special in ("none", "ties") and problem.dtype == torch.float64 \
            and exact_ties:
        assert torch.equal(indices, want_indices[known])
    mean_scale = want_mean[known].abs().max().clamp_min(1.0) if known.any() else 1.0
    assert ((mean[known].double() - want_mean[known]).abs() <= tol * mean_scale).all()
    # (cosine of one-element windows is piecewise constant: its gradient is rounding noise, as
    # in tests/test_fuzz.py)
    if problem.gradients and full and problem.special != "nan" and not (
            metric == "cosine" and one_element):
        weights = torch.randn(topk.values.shape, dtype=x.dtype, device=x.device)
        mean_weights = torch.randn(mean.shape, dtype=x.dtype, device=x.device)
        ((topk.values * weights).sum() + (mean * mean_weights).sum()).backward()
        xd, pd = x.detach().double().requires_grad_(), p.detach().double().requires_grad_()
        dd = distances(xd, pd, metric)
        picked = dd.gather(-1, topk.indices)
        want = torch.autograd.grad((picked * weights.double()).sum()
                                   + (dd.mean(-1) * mean_weights.double()).sum(), (xd, pd))
        for got, expected in zip((xg.grad, pg.grad), want, strict=True):
            assert_gradients_close_where_finite(got, expected, 1e-4)


def test_pooling_ops_match_brute_force(backend):
    interpreted = runs_interpreted(backend)

    @settings(max_examples=EXAMPLES // 4 if interpreted else EXAMPLES, deadline=None,
              derandomize=not LONG, database=None if not LONG else settings.default.database)
    @given(problems(interpreted))
    def run(problem):
        check(problem)

    run()
