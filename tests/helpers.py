"""Tolerances and comparisons of DESIGN.md §5, shared by the tests."""

import contextlib
from collections.abc import Iterator

import torch
from brute_force import distances, first_min
from torch import Tensor

import protokern as pk
from protokern.backends import registry
from protokern.ops import canonicalize, kernel_metric
from protokern.testing import TOLERANCE, near_tie_ok, relative_error


def refusal(backend: str | None, op: str, x: Tensor, prototypes: Tensor, metric: str,
            **options) -> str | None:
    """Why ``backend`` (None: the automatic choice, which always runs) does not run ``op`` on
    these public inputs (`Backend.supports`), or None where it does."""
    if backend is None:
        return None
    x4, p4, _ = canonicalize(x, prototypes, metric, "test",
                             vectors=op == "nearest_prototypes")  # (its (N, D) vectors)
    return registry.registered_backend(backend).supports(op, x4, p4,
                                                         metric=kernel_metric(metric), **options)


def assert_matches_brute_force(x: Tensor, prototypes: Tensor, metric: str, values: Tensor,
                               indices: Tensor, tol: float | None = None) -> None:
    """Values within tolerance (default: DESIGN §5's for the dtype; pass TF32's where it is
    allowed); every index either the brute force's or a near-tie of it."""
    tol = TOLERANCE[x.dtype] if tol is None else tol
    d = distances(x, prototypes, metric)
    ref_values, ref_indices = first_min(d)
    assert values.dtype == x.dtype and indices.dtype == torch.int64
    assert values.shape == ref_values.shape == indices.shape
    assert relative_error(values, ref_values) <= tol
    # where a backend picked another position, its true distance must tie the minimum
    assert near_tie_ok(indices, d, tol).all(), "an index is off by more than a near-tie"
    scale = ref_values.abs().max().clamp_min(1.0)
    if x.dtype in (torch.float32, torch.float64):
        # with a clear winner (runner-up further than the tolerance) the index must be exact
        runner_up = d.sort(-1).values[..., 1] if d.shape[-1] > 1 else ref_values + scale
        clear = (runner_up - ref_values) > tol * scale
        assert (indices[clear] == ref_indices[clear]).all()


def brute_force_grads(x: Tensor, prototypes: Tensor, metric: str, weights: Tensor):
    """Gradients of sum(weights * min distance) by autograd through the brute force."""
    xd = x.detach().double().requires_grad_()
    pd = prototypes.detach().double().requires_grad_()
    d = distances(xd, pd, metric)
    _, idx = first_min(d.detach())
    values = d.gather(-1, idx[..., None])[..., 0]
    return torch.autograd.grad((values * weights.double()).sum(), (xd, pd))


def forward_backward(x: Tensor, prototypes: Tensor, metric: str, weights: Tensor):
    """``(values, indices, x.grad, prototypes.grad)`` of ``sum(weights * values)``, on new
    leaves sharing ``x``'s and ``prototypes``' storage (strides included)."""
    x = x.detach().requires_grad_()
    prototypes = prototypes.detach().requires_grad_()
    values, indices = pk.min_distance(x, prototypes, metric)
    (values * weights).sum().backward()
    return values.detach(), indices, x.grad, prototypes.grad


def assert_bitwise_equal(first, second, what: str,
                         names=("values", "indices", "x.grad", "prototypes.grad")) -> None:
    """The tensors of ``first`` and ``second`` (e.g. two `forward_backward`s) are equal bit for
    bit: viewed as integers, so NaN equals NaN and -0.0 differs from 0.0."""
    assert len(first) == len(second) <= len(names)
    for name, a, b in zip(names, first, second, strict=False):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {what}"
        if a.is_floating_point():
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            a, b = a.view(bits), b.view(bits)
        assert torch.equal(a, b), f"{name} differ ({what})"


def pushed_prototypes() -> tuple[Tensor, Tensor]:
    """ProtoPNet after push: sigmoid features (4, 128, 7, 7), prototypes copied from patches.

    Prototype 0 is the patch of image 0 at (4, 2), flat index 30, with a near-duplicate
    (1e-4 noise) earlier, at (0, 5) of the same image; prototypes 1-5 are patches at (3, 3).
    With the seed of the tests, float32 cancellation once made the GEMM expansion prefer the
    near-duplicate (distance 1.3e-6) to the exact copy.
    """
    first = torch.sigmoid(torch.randn(1, 128, 7, 7))
    first[0, :, 0, 5] = first[0, :, 4, 2] + 1e-4 * torch.randn(128)
    x = torch.cat([first, torch.sigmoid(torch.randn(3, 128, 7, 7))])
    return x, torch.cat([x[0, :, 4, 2][None], x[[0, 0, 1, 2, 3], :, 3, 3]])


def pushed_patches(device: str | torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Prototypes within 1e-4 of their patches (ProtoPNet right after push), where nothing
    else is near: sigmoid features, two identical images (2, 64, 5, 5), and prototype ``m``
    (of 8) the patch at position ``3 m`` plus 1e-4 noise. Every pair's gradient is then
    ~1e-4 of the entries, which cancellation (``2 g p - 2 g x``) would swamp."""
    x = torch.sigmoid(torch.randn(1, 64, 5, 5, device=device)).expand(2, -1, -1, -1)
    patches = x[0].flatten(1).T[::3][:8]
    return x.contiguous(), patches + 1e-4 * torch.randn_like(patches)


def gradients_at(x: Tensor, prototypes: Tensor, metric: str, weights: Tensor,
                 indices: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(weights * distance at indices)`` by autograd through the float64
    brute force, at the given positions (a backend's own choice: a near-tie cannot swap it)."""
    xd = x.detach().double().requires_grad_()
    pd = prototypes.detach().double().requires_grad_()
    values = distances(xd, pd, metric).gather(-1, indices[..., None])[..., 0]
    return torch.autograd.grad((values * weights.double()).sum(), (xd, pd))


def assert_gradients_at_own_positions(x: Tensor, prototypes: Tensor, metric: str,
                                      tol: float) -> None:
    """The chosen backend's gradients of ``sum(weights * min distance)`` (random weights)
    within ``tol`` of the float64 brute force's at the positions the backend chose."""
    weights = torch.randn(x.shape[0], prototypes.shape[0], dtype=x.dtype, device=x.device)
    _, indices, grad_x, grad_p = forward_backward(x, prototypes, metric, weights)
    want_x, want_p = gradients_at(x, prototypes, metric, weights, indices)
    assert relative_error(grad_x, want_x) <= tol
    assert relative_error(grad_p, want_p) <= tol


# ---------------------------------------------------------------------------------------------
# nearest_prototypes


def assert_gradients_close_where_finite(got: Tensor, expected: Tensor, tol: float) -> None:
    """``got`` within ``tol`` of the float64 ``expected`` (relative to its largest finite entry,
    at least 1), where ``expected`` is finite: a brute force's autograd goes through sqrt(0) at
    an all-zero vector (cosine), NaN where the op's norm floor passes no gradient."""
    finite = expected.isfinite()
    scale = expected[finite].abs().max().clamp_min(1.0) if finite.any() else 1.0
    difference = (got.double() - expected)[finite].abs()
    assert difference.numel() == 0 or difference.max() / scale <= tol


def nearest_brute_force(x: Tensor, prototypes: Tensor, metric: str) -> Tensor:
    """Every distance ``(rows, M)`` in float64, rows in `pk.nearest_prototypes`' order
    (flattened); ``x`` may be ``(N, D)`` vectors too. Cosine distances are clamped to their
    range [0, 2], as the op's are: a copied vector's -2e-16 is its 0."""
    as_tokens = x[None] if x.dim() == 2 else x
    d = distances(as_tokens, prototypes, metric)  # (B, M, L')
    if metric == "cosine":
        d = d.clamp(0, 2)
    return d.transpose(1, 2).reshape(-1, d.shape[1])


def nearest_gradients_at(x: Tensor, prototypes: Tensor, metric: str, weights: Tensor,
                         indices: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(weights * distance at the chosen pairs)`` by autograd through the
    float64 brute force, at a backend's own ``indices`` (``weights`` of their shape, ``(..., k)``:
    a near-tie cannot swap a pair)."""
    k = indices.shape[-1]
    xd = x.detach().double().requires_grad_()
    pd = prototypes.detach().double().requires_grad_()
    chosen = nearest_brute_force(xd, pd, metric).gather(1, indices.reshape(-1, k))
    return torch.autograd.grad((chosen * weights.reshape(-1, k).double()).sum(), (xd, pd))


def first_k(d: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest of each row, NaN first, ties to the lowest column."""
    key = torch.where(d.isnan(), float("-inf"), d)
    order = key.argsort(dim=-1, stable=True)[:, :k]
    return d.gather(1, order), order


def expected_shape(x, prototypes, k):
    if x.dim() == 2:
        return (x.shape[0], k)
    if x.dim() == 3:
        return (x.shape[0], x.shape[1], k)
    ph, pw = (prototypes.shape[2:] if prototypes.dim() == 4 else (1, 1))
    return (x.shape[0], x.shape[2] - ph + 1, x.shape[3] - pw + 1, k)


def assert_nearest(x, prototypes, metric, k, values, indices, tol=None):
    """Values within tolerance of the k smallest true distances; each returned index's true
    distance is its value; indices exact wherever the k + 1 smallest are clearly apart."""
    tol = TOLERANCE[x.dtype] if tol is None else tol
    assert values.shape == indices.shape == expected_shape(x, prototypes, k)
    assert values.dtype == x.dtype and indices.dtype == torch.int64
    d = nearest_brute_force(x, prototypes, metric)
    want_values, want_indices = first_k(d, k)
    values, indices = values.reshape(-1, k), indices.reshape(-1, k)
    if values.numel() == 0:
        return
    # norm-wise relative error; cosine distances lie in [0, 2], so their scale is at least 1
    # (minima of 0 for copies are then checked absolutely: the exact float64 recompute of a
    # vector against itself rounds to +-1e-16)
    floor = 1.0 if metric == "cosine" else 1e-30
    ref_scale = want_values.abs().max().clamp_min(floor)
    assert ((values.double() - want_values).abs().max() / ref_scale) <= tol
    scale = want_values.abs().max().clamp_min(1.0)
    at_indices = d.gather(1, indices)
    assert ((at_indices - values.double()).abs() <= tol * scale).all(), \
        "a value is not the distance at its index"
    assert (values.double().diff(dim=1) >= -tol * scale).all(), "values do not ascend"
    if x.dtype in (torch.float32, torch.float64):
        ordered = d.sort(1).values[:, :k + 1]
        if ordered.shape[1] == k:  # k = M
            ordered = torch.cat([ordered, ordered[:, -1:] + 2 * scale], 1)
        clear = ((ordered.diff(dim=1)) > tol * scale).all(1)
        assert torch.equal(indices[clear], want_indices[clear])


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch.set_num_threads(count) for the block; the previous count comes back after it."""
    was = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(was)
