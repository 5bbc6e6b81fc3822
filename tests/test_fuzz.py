"""Issue 10, part 3: property-based fuzzing of `min_distance` on every backend (the ``backend``
fixture: CPU tensors, and CUDA tensors where CUDA is present), against the float64 brute force
of DESIGN §2 (tests/brute_force.py).

Hypothesis draws the problem: tokens ``(B, L, D)`` or maps ``(B, D, H, W)`` with a ``ph x pw``
window, prototypes ``(M, D)``, ``(M, D, 1, 1)`` or ``(M, D, ph, pw)``, the layout of each
(contiguous, channels_last, permuted, sliced, expanded with stride 0), the metric, the dtype, and
sometimes a special input (integer-valued data full of ties, duplicate prototypes, a prototype
copied from a patch, NaN, +-inf, tiny or huge magnitudes). The tensors themselves come from a
drawn seed (fresh random data, reproducible from the example).

Checked: values within DESIGN §5's tolerance, every index the brute force's or a near-tie of it
and exact where the winner is clear (`helpers.assert_matches_brute_force`); NaN and inf exactly
(NaN at the first NaN position, as `torch.min`); lowest index on exact ties of integer data;
and, for a subset, the gradients of ``x`` and ``prototypes`` against the brute force's.

Profiles (registered here): ``protokern-fuzz-ci`` (default: few examples, small shapes,
derandomized, so CI is reproducible and the file runs in well under a minute on 2 cores) and
``protokern-fuzz-long`` (``PROTOKERN_FUZZ=long``: 4000 examples per backend, or
``PROTOKERN_FUZZ_EXAMPLES``, larger shapes, random seeds, failures kept in the local
``.hypothesis`` database).
"""

import math
from dataclasses import dataclass

import pytest
import torch
from brute_force import EPS, distances, first_min
from cases import (
    DTYPES,
    HALF_PRECISION,
    MAP_LAYOUTS,
    METRICS,
    PROTOTYPE_LAYOUTS,
    TOKEN_LAYOUTS,
    map_layout,
    prototype_layout,
    token_layout,
)
from cases import interpreted as runs_interpreted
from helpers import assert_matches_brute_force, brute_force_grads, refusal
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import protokern as pk
from protokern import env
from protokern.testing import TOLERANCE, near_tie_ok, relative_error

LONG = env.text("PROTOKERN_FUZZ") == "long"

settings.register_profile(
    "protokern-fuzz-ci", max_examples=100, deadline=None, derandomize=True, database=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "protokern-fuzz-long", max_examples=env.integer("PROTOKERN_FUZZ_EXAMPLES", 4000),
    deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile("protokern-fuzz-long" if LONG else "protokern-fuzz-ci")

# NaN and inf inputs make the interpreter's numpy warn; the results are what is checked
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

FUZZ_METRICS = METRICS + ("dot",)
"""The kernel metrics (TesNet's dot too; euclidean is the sqeuclidean op's root: its fuzzer is
tests/test_fuzz_pooling.py)."""

SPECIALS = ("none", "none", "none", "ties", "duplicates", "copy", "nan", "inf", "tiny", "huge")


BRUTE_FORCE_ELEMENTS = 2**24


@dataclass
class Limits:
    batch: int
    dim: int
    side: int
    prototypes: int


def _limits(interpreted: bool) -> Limits:
    if LONG:
        return Limits(8, 160, 12, 300) if interpreted else Limits(12, 600, 20, 700)
    return Limits(3, 24, 6, 40) if interpreted else Limits(4, 48, 8, 300)


class Problem:
    """One drawn input (a plain class: hypothesis prints its __repr__, with the strides)."""

    def __init__(self, x: torch.Tensor, prototypes: torch.Tensor, metric: str, special: str,
                 check_grads: bool):
        self.x, self.prototypes, self.metric = x, prototypes, metric
        self.special, self.check_grads = special, check_grads

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return (f"Problem(x {tuple(self.x.shape)} strides {self.x.stride()}, prototypes "
                f"{tuple(self.prototypes.shape)} strides {self.prototypes.stride()}, "
                f"{self.x.dtype}, {self.metric}, special={self.special}, "
                f"grads={self.check_grads})")


def _index(size: int, generator: torch.Generator) -> int:
    """A random index below ``size``, from the CPU ``generator``."""
    return int(torch.randint(0, size, (1,), generator=generator, device="cpu"))


@st.composite
def problems(draw, interpreted: bool) -> Problem:
    limits = _limits(interpreted)
    tokens = draw(st.booleans())
    batch = draw(st.integers(1, limits.batch))
    dim = draw(st.one_of(st.integers(1, limits.dim), st.sampled_from([1, 2, 3, 16, 17])))
    num = draw(st.one_of(st.integers(1, 24), st.integers(1, limits.prototypes)))
    if tokens:
        length, ph, pw = draw(st.integers(1, limits.side * 2)), 1, 1
        x_shape = (batch, length, dim)
        layout = draw(st.sampled_from(TOKEN_LAYOUTS))
        four_d = draw(st.booleans())
    else:
        height, width = draw(st.integers(1, limits.side)), draw(st.integers(1, limits.side))
        ph, pw = draw(st.integers(1, height)), draw(st.integers(1, width))
        x_shape = (batch, dim, height, width)
        layout = draw(st.sampled_from(MAP_LAYOUTS))
        four_d = (ph, pw) != (1, 1) or draw(st.booleans())
    # the brute force holds (B, M, D, L') float64 temporaries: keep them to ~128 MB
    positions = x_shape[1] if tokens else (x_shape[2] - ph + 1) * (x_shape[3] - pw + 1)
    num = max(1, min(num, BRUTE_FORCE_ELEMENTS // (batch * dim * positions)))
    p_layout = draw(st.sampled_from(PROTOTYPE_LAYOUTS))
    metric = draw(st.sampled_from(FUZZ_METRICS))
    dtype = draw(st.sampled_from(DTYPES))
    special = draw(st.sampled_from(SPECIALS))
    if special == "huge" and dtype in HALF_PRECISION:
        special = "none"  # their range holds no huge distances: an overflow is right there
    if special == "tiny" and dtype == torch.float16:
        # distances ~1e-6 are float16 subnormals (spacing 6e-8): the output cannot hold them
        # to the tolerance (found by the long profile: 0.0003 against 0 at D = 1)
        special = "none"
    check_grads = draw(st.booleans())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))

    # drawn on the CPU, from the CPU generator, then moved to the default device (the test's)
    x = torch.randn(x_shape, generator=generator, device="cpu")
    p = torch.randn(num, dim, ph, pw, generator=generator, device="cpu")
    if special == "ties":  # few distinct integer values: exact ties everywhere
        x = torch.randint(-1, 2, x_shape, generator=generator, device="cpu").float()
        p = torch.randint(-1, 2, p.shape, generator=generator, device="cpu").float()
    elif special == "duplicates":
        p[1::2] = p[: num // 2]
    elif special == "copy":  # a prototype equal to a patch: distance 0 next to large norms
        b = _index(batch, generator)
        as_map = x.permute(0, 2, 1)[..., None] if tokens else x
        i = _index(as_map.shape[2] - ph + 1, generator)
        j = _index(as_map.shape[3] - pw + 1, generator)
        p[num - 1] = as_map[b, :, i:i + ph, j:j + pw]
    elif special in ("nan", "inf"):
        target = x if draw(st.booleans()) else p
        flat = target.view(-1)
        value = float("nan") if special == "nan" else draw(st.sampled_from([1.0, -1.0])) * float(
            "inf")
        flat[_index(flat.numel(), generator)] = value
    elif special == "tiny":
        x, p = x * 1e-3, p * 1e-3
    elif special == "huge":  # sqeuclidean: big but finite distances; cosine: overflowing norms
        scale = 1e20 if metric == "cosine" else 1e17  # (dot: products near 1e34 D, finite)
        x, p = x * scale, p * scale
    if dtype == torch.float16:
        # keep squared distances (~2 K, ties: up to 4 K) well inside float16's range (65504):
        # past it the right answer is inf, which the brute force in float64 does not give. A
        # power of two, so that integer ties stay exact.
        shrink = 2.0 ** -max(0, math.ceil(math.log2(dim * ph * pw / 2000) / 2))
        x, p = x * shrink, p * shrink
    device = torch.get_default_device()
    x, p = x.to(device, dtype), p.to(device, dtype)
    x = token_layout(x, layout) if tokens else map_layout(x, layout)
    p = prototype_layout(p if four_d else p.reshape(num, dim), p_layout)
    for what in ("tokens" if tokens else "map", layout, f"prototypes {p_layout}", metric,
                 str(dtype), special):
        event(what)  # --hypothesis-show-statistics tallies what was drawn
    return Problem(x, p, metric, special, check_grads)


def _first_nan(d: torch.Tensor) -> torch.Tensor:
    return d.isnan().to(torch.int8).argmax(-1)


def _supported(backend: str | None, problem: Problem) -> bool:
    """Whether the chosen ``backend`` takes the problem (the cuda kernels refuse windows and
    float64: DESIGN §3); a refused problem is left out, and tallied."""
    reason = refusal(backend, "min_distance", problem.x, problem.prototypes, problem.metric)
    if reason is not None:
        event(f"{backend} refuses: {reason}")
    return reason is None


def check_against_brute_force(problem: Problem) -> None:
    assume(_supported(pk.get_backend(), problem))
    x, p, metric = problem.x, problem.prototypes, problem.metric
    tol = TOLERANCE[x.dtype]
    with torch.no_grad():
        values, indices = pk.min_distance(x, p, metric)
    d = distances(x, p, metric)  # (B, M, L') float64, no expansion
    assert values.shape == indices.shape == d.shape[:2]
    assert values.dtype == x.dtype and indices.dtype == torch.int64

    # Pairs with a non-finite distance somewhere (NaN/inf inputs): exactly as torch.min would.
    finite = d.isfinite().all(-1)
    poisoned = ~finite
    if poisoned.any():
        dp, vp, ip = d[poisoned], values[poisoned].double(), indices[poisoned]
        nan = dp.isnan().any(-1)
        assert torch.equal(vp.isnan(), nan), "NaN in the wrong outputs"
        assert torch.equal(ip[nan], _first_nan(dp[nan])), "a NaN value not at the first NaN"
        minimum, first = first_min(dp[~nan])
        infinite = minimum.isinf()
        assert torch.equal(vp[~nan][infinite], minimum[infinite])
        assert torch.equal(ip[~nan][infinite], first[infinite])
        rest = ~infinite  # a finite minimum beside infinite windows
        if rest.any():
            scale = minimum[rest].abs().max().clamp_min(1.0)
            assert ((vp[~nan][rest] - minimum[rest]).abs() <= tol * scale).all()
            assert near_tie_ok(ip[~nan][rest][None], dp[~nan][rest][None], tol).all()

    # The rest: images and prototypes untouched by non-finite distances, by the shared helper.
    images, protos = finite.all(1), finite.all(0)
    if images.any() and protos.any():
        clean_values, clean_indices = values[images][:, protos], indices[images][:, protos]
        clean_d = d[images][:, protos]
        if clean_d.amin(-1).abs().max() > 1e-12:
            assert_matches_brute_force(x[images], p[protos], metric, clean_values, clean_indices)
        else:  # every minimum is 0 up to float64 rounding (a copied patch): no relative error
            assert (clean_values.double().abs() <= tol).all()
            assert near_tie_ok(clean_indices, clean_d, tol).all()
    if problem.special == "ties" and metric in ("sqeuclidean", "dot"):
        # integer data: every distance is exact in every backend's arithmetic, so ties are
        # exact ties and the lowest position must win
        assert torch.equal(indices, first_min(d)[1])

    # (cosine of one-element windows is piecewise constant: its gradient is rounding noise)
    window = p[0].numel() if p.shape[0] else 0
    if (problem.check_grads and not poisoned.any() and torch.equal(indices, first_min(d)[1])
            and not (metric == "cosine" and window == 1)):
        # pairs without a clear winner get no weight: the brute force's gradient recomputes the
        # distances (another layout, other roundings) and may pick another of the tied positions
        weights = torch.randn(values.shape, dtype=x.dtype) * _clear_winners(d, tol)
        want_x, want_p = brute_force_grads(x, p, metric, weights)
        if want_x.isfinite().all() and want_p.isfinite().all():  # e.g. cosine at a zero vector
            xg = x.detach().requires_grad_()
            pg = p.detach().requires_grad_()
            (pk.min_distance(xg, pg, metric).values * weights).sum().backward()
            assert xg.grad.dtype == x.dtype and pg.grad.dtype == p.dtype
            floor_x, floor_p = (_cosine_gradient_scales(x, p, indices, weights)
                                if metric == "cosine" else (0.0, 0.0))
            assert _gradient_error(xg.grad, want_x, floor_x) <= tol, "grad of x"
            assert _gradient_error(pg.grad, want_p, floor_p) <= tol, "grad of prototypes"


def _clear_winners(d: torch.Tensor, tol: float) -> torch.Tensor:
    """``(B, M)``: which minima are ahead of their runner-up by more than the tolerance."""
    if d.shape[-1] < 2:
        return torch.ones(d.shape[:-1], dtype=torch.bool)
    best_two = d.topk(2, dim=-1, largest=False).values
    scale = best_two[..., 0].abs().max().clamp_min(1.0)
    return (best_two[..., 1] - best_two[..., 0]) > tol * scale


def _cosine_gradient_scales(x, p, indices, weights) -> tuple[float, float]:
    """The scale of the terms of cosine gradients: ``|w| / |a|`` for a selected window ``a``,
    ``|w| / |p|`` for a prototype. The gradient itself vanishes where ``a`` is parallel to ``p``
    (a copied patch), and is then rounding noise of that scale, not a relative quantity."""
    zero = torch.zeros(1, *p.shape[1:], dtype=x.dtype)
    window_norm = distances(x, zero, "sqeuclidean")[:, 0].gather(1, indices).sqrt()  # (B, M)
    proto_norm = p.detach().double().flatten(1).norm(dim=1)
    w = weights.double().abs()
    return ((w / window_norm.clamp_min(EPS)).max().item(),
            (w / proto_norm.clamp_min(EPS)).max().item())


def _gradient_error(got: torch.Tensor, want: torch.Tensor, floor: float) -> float:
    """`relative_error`, relative to at least ``floor``."""
    if floor == 0.0:
        return relative_error(got, want)
    return ((got.double() - want).abs().max() / max(want.abs().max().item(), floor)).item()


def test_min_distance_matches_brute_force(backend):
    """Interpreted backends draw smaller shapes, and fewer examples in CI. (Derandomized, the
    examples follow the source of ``check``: an edit there draws another set.)"""
    interpreted = runs_interpreted(backend)
    examples = PROFILE.max_examples * 2 // (5 if interpreted and not LONG else 2)

    @settings(PROFILE, max_examples=examples)
    @given(problem=problems(interpreted))
    def check(problem: Problem) -> None:
        check_against_brute_force(problem)

    check()


def test_cosine_gradients_of_huge_inputs(backend):
    """Norms past sqrt(float32 max) ~ 1.8e19: the forward is right (test_ops), the gradient
    must be too (float64 brute force: ~1e-21 here, well inside float32's range). The fuzzer
    found all three backends wrong here: reference and triton NaN, cpu 1e-4 off."""
    x = 1e20 * torch.randn(2, 5, 16)
    p = 1e20 * torch.randn(3, 16)
    weights = torch.randn(2, 3)
    want_x, want_p = brute_force_grads(x, p, "cosine", weights)
    xg, pg = x.clone().requires_grad_(), p.clone().requires_grad_()
    (pk.min_distance(xg, pg, "cosine").values * weights).sum().backward()
    assert relative_error(xg.grad, want_x) <= TOLERANCE[torch.float32]
    assert relative_error(pg.grad, want_p) <= TOLERANCE[torch.float32]


def test_cosine_gradients_of_huge_single_position_inputs(backend):
    """As above with one position per image (L = 1), where the cpu kernel's backward is two
    BLAS products instead of its scatter. The fuzzer found the cpu backend's gradients NaN
    here (x (1, 1, 2) ~1e20, one prototype), reference and triton right."""
    x = 1e20 * torch.randn(2, 1, 16)
    p = 1e20 * torch.randn(3, 16)
    weights = torch.randn(2, 3)
    want_x, want_p = brute_force_grads(x, p, "cosine", weights)
    xg, pg = x.clone().requires_grad_(), p.clone().requires_grad_()
    (pk.min_distance(xg, pg, "cosine").values * weights).sum().backward()
    assert relative_error(xg.grad, want_x) <= TOLERANCE[torch.float32]
    assert relative_error(pg.grad, want_p) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("layout", MAP_LAYOUTS)
def test_layouts_keep_the_values(layout):
    """The layout helpers change strides, never values (except `expanded`, by design)."""
    data = torch.randn(2, 3, 4, 5)
    view = map_layout(data, layout)
    assert view.shape == data.shape
    assert torch.equal(view, data[:1].expand_as(data) if layout == "expanded" else data)
    if layout not in ("contiguous",):
        assert not view.is_contiguous()
