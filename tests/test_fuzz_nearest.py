"""Property-based fuzzing of `nearest_prototypes` on every backend (the ``backend`` fixture),
against the float64 brute force, as tests/test_fuzz.py does for `min_distance`.

Hypothesis draws vectors ``(N, D)``, tokens ``(B, L, D)`` or maps ``(B, D, H, W)`` with a
``ph x pw`` window, the layouts, ``M`` and ``k`` (up to ``M``), the metric, the dtype and
sometimes a special input (integer data full of ties, duplicated prototypes, a prototype copied
from a patch, NaN). Checked: values within tolerance, each index's true distance its value,
indices exact where the winners are clear, NaN rows NaN (indices 0..k-1) and, for a subset,
both gradients against the brute force's through the returned pairs. Profiles as in
tests/test_fuzz.py (``PROTOKERN_FUZZ=long``, ``PROTOKERN_FUZZ_EXAMPLES``).
"""

from dataclasses import dataclass

import pytest
import torch
from cases import FULL_PRECISION, HALF_PRECISION, METRICS, map_layout, token_layout
from cases import interpreted as runs_interpreted
from helpers import (
    assert_gradients_close_where_finite,
    assert_nearest,
    first_k,
    nearest_brute_force,
    nearest_gradients_at,
    refusal,
)
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

import protokern as pk
from protokern import env

LONG = env.text("PROTOKERN_FUZZ") == "long"
EXAMPLES = env.integer("PROTOKERN_FUZZ_EXAMPLES", 4000) if LONG else 60

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@dataclass
class Problem:
    kind: str  # "vectors", "tokens", "map"
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
    kind = draw(st.sampled_from(["vectors", "tokens", "map"]))
    dim = draw(st.integers(1, 40 if small else 200))
    num = draw(st.integers(1, 40 if small else 600))
    k = draw(st.integers(1, min(num, 12)))
    if kind == "vectors":
        shape, window = (draw(st.integers(0, 30)), dim), (1, 1)
    elif kind == "tokens":
        shape, window = (draw(st.integers(1, 3)), draw(st.integers(1, 12)), dim), (1, 1)
    else:
        height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        window = (draw(st.integers(1, height)), draw(st.integers(1, width)))
        shape = (draw(st.integers(1, 3)), dim, height, width)
    layouts = {"vectors": ["contiguous"], "tokens": ["contiguous", "transposed", "sliced"],
               "map": ["contiguous", "channels_last", "permuted", "sliced"]}[kind]
    return Problem(
        kind, shape, (num, dim, *window) if window != (1, 1) else (num, dim), k,
        draw(st.sampled_from(METRICS + ("dot",))),
        draw(st.sampled_from(FULL_PRECISION + FULL_PRECISION + HALF_PRECISION)),
        draw(st.sampled_from(layouts)),
        draw(st.sampled_from(["none", "none", "ties", "duplicates", "copy", "nan"])),
        draw(st.integers(0, 2**31 - 1)), draw(st.booleans()))


def make(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(problem.seed)
    x = torch.randn(problem.shape, generator=generator, dtype=torch.float64)
    p = torch.randn(problem.prototype_shape, generator=generator, dtype=torch.float64)
    if problem.special == "ties":  # small integers: many exactly equal distances
        x, p = x.mul(2).round(), p.mul(2).round()
    elif problem.special == "duplicates" and p.shape[0] > 1:
        p[1::2] = p[0::2][:p[1::2].shape[0]]
    elif problem.special == "copy" and x.numel() and problem.kind != "map":
        rows = x.reshape(-1, x.shape[-1])
        p[-1] = rows[rows.shape[0] // 2]
    elif problem.special == "nan" and x.numel():
        x.view(-1)[x.numel() // 3] = float("nan")
    x, p = x.to(problem.dtype), p.to(problem.dtype)
    device = torch.get_default_device()
    x, p = x.to(device), p.to(device)
    if problem.kind == "map":
        x = map_layout(x, problem.layout)
    elif problem.kind == "tokens":
        x = token_layout(x, problem.layout)
    return x, p


def check(problem: Problem) -> None:
    x, p = make(problem)
    reason = refusal(pk.get_backend(), "nearest_prototypes", x, p, problem.metric, k=problem.k)
    if reason is not None:  # (the triton and cuda kernels refuse dot): left out, and tallied
        event(f"refused: {reason}")
    assume(reason is None)
    values, indices = pk.nearest_prototypes(x, p, problem.k, problem.metric)
    if problem.special == "nan":
        d = nearest_brute_force(x, p, problem.metric)
        nan_rows = d.isnan().any(1)
        got_v, got_i = values.reshape(-1, problem.k), indices.reshape(-1, problem.k)
        want_v, want_i = first_k(d, problem.k)
        assert torch.equal(got_v.double().isnan(), want_v.isnan())
        assert torch.equal(got_i[nan_rows], want_i[nan_rows])
        return
    tol = None if problem.dtype in FULL_PRECISION else 2e-2
    assert_nearest(x, p, problem.metric, problem.k, values, indices, tol)
    if problem.gradients and problem.dtype in FULL_PRECISION and x.numel():
        xg, pg = x.detach().requires_grad_(), p.detach().requires_grad_()
        out = pk.nearest_prototypes(xg, pg, problem.k, problem.metric)
        weights = torch.randn(out.values.shape, dtype=x.dtype, device=x.device)
        (out.values * weights).sum().backward()
        want = nearest_gradients_at(x, p, problem.metric, weights, out.indices)
        for got, expected in zip((xg.grad, pg.grad), want, strict=True):
            assert_gradients_close_where_finite(got, expected, 1e-4)


def test_nearest_prototypes_matches_brute_force(backend):
    interpreted = runs_interpreted(backend)

    @settings(max_examples=EXAMPLES // 3 if interpreted else EXAMPLES, deadline=None,
              derandomize=not LONG, database=None if not LONG else settings.default.database)
    @given(problems(interpreted))
    def run(problem):
        check(problem)

    run()
