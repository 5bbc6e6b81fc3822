"""The contenders of the benchmark: every way to compute min-over-positions distances.

All take ``x`` ``(B, D, H, W)`` and ``prototypes`` ``(M, D, ph, pw)`` (sqeuclidean metric, the
one ProtoPNet uses) and return ``values`` ``(B, M)`` and ``indices`` ``(B, M)`` (flat over
``H' x W'``), differentiable in ``values`` with respect to both inputs:

- ``protokern:<backend>``: every backend `protokern.available_backends(device)` lists when the
  bench runs, so a backend added later is benchmarked without editing this file;
- ``naive_conv``, ``naive_cdist``, ``naive_loop``: `protokern.baselines` (ProtoPNet's
  convolutions and min-pool, ``torch.cdist`` then ``min``, a per-image ``torch.mm`` loop);
- ``keops``: a pykeops ``LazyTensor`` ``min_argmin`` reduction, when pykeops is importable (its
  own kind ``keops``: a fused library, not naive PyTorch, so never the "best naive" baseline);
- ``floor_mm``: a bare ``torch.mm`` ``(B L') x K @ K x M`` of the same FLOPs: the floor.

``estimate_bytes`` is each contender's peak memory beyond its inputs (a conservative model,
checked against measurements in benchmarks/NOTES.md), so a case that cannot fit is skipped
with the reason rather than run out of memory.
"""

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import protokern as pk
from protokern.backends.reference import CHUNK_ELEMENTS, patches
from protokern.baselines import cdist_min, loop_mm_min, protopnet_min_distance
from protokern.bench.shapes import NamedShape

KINDS = ("protokern", "naive", "keops", "floor")
"""Contender kinds; ``--contenders`` and ``--exclude`` accept a kind for all its contenders."""

FORWARD = "forward"
FORWARD_BACKWARD = "forward+backward"
PASSES = (FORWARD, FORWARD_BACKWARD)

MinDistanceFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def keops_min(x: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """pykeops: a symbolic ``(B, L', M)`` distance reduced by ``min_argmin`` over ``L'``.

    KeOps' min reduction has no gradient, so when a gradient is needed the argmin comes from
    KeOps and the values are recomputed at it in PyTorch (how a KeOps user writes it).
    """
    from pykeops.torch import LazyTensor

    rows = patches(x, prototypes.shape[2], prototypes.shape[3]).contiguous()
    protos = prototypes.flatten(1).contiguous()
    patch_i = LazyTensor(rows.detach()[:, :, None, :])  # (B, L', 1, K)
    proto_j = LazyTensor(protos.detach()[None, None, :, :])  # (1, 1, M, K)
    sq = ((patch_i - proto_j) ** 2).sum(-1)
    values, indices = sq.min_argmin(dim=1)  # (B, M, 1) each
    indices = indices[..., 0].long()
    if not (x.requires_grad or prototypes.requires_grad):
        return values[..., 0], indices
    chosen = rows.gather(1, indices[..., None].expand(-1, -1, rows.shape[-1]))
    return (chosen - protos).square().sum(-1), indices


def _protokern_backend(name: str) -> MinDistanceFn:
    def run(x: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
        with pk.use_backend(name):
            return tuple(pk.min_distance(x, prototypes))

    run.__name__ = f"protokern_{name}"
    return run


# ----------------------------------------------------------------------------------------------
# Contenders


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Contender:
    """One way of computing the op.

    Attributes:
        name: how the table, JSON and ``--contenders`` name it.
        kind: one of `KINDS`: ``"protokern"``, ``"naive"``, ``"keops"`` or ``"floor"``.
        description: one line for the table legend.
        min_distance: ``(x (B, D, H, W), prototypes (M, D, ph, pw))`` -> values, indices
            ``(B, M)``; None for the floor.
        estimate_bytes: ``(shape, dtype, pass) ->`` peak bytes beyond the inputs.
        backend: the protokern backend every kernel call must run on (``protokern:<backend>``);
            None for the others, which must run no protokern kernel at all.
    """

    name: str
    kind: str
    description: str
    min_distance: MinDistanceFn | None
    estimate_bytes: Callable[[NamedShape, torch.dtype, str], int]
    backend: str | None = None

    def wrong_backends(self, ran_on: list[str]) -> str | None:
        """Why the backends that ran this contender's calls (``ran_on``, from `pk.recording`)
        make its measurement someone else's, or None when they are its own."""
        expected = [] if self.backend is None else [self.backend]
        if sorted(set(ran_on)) == expected:
            return None
        ran = ", ".join(sorted(set(ran_on))) or "no protokern backend"
        if self.backend is None:
            return f"{self.name} ran protokern kernels ({ran}): it is no baseline"
        return (f"{self.name} ran on {ran}, not (only) on {self.backend}: the times and memory "
                f"would not be {self.backend}'s")

    def make_step(self, x: Tensor, prototypes: Tensor, grad_values: Tensor,
                  pass_name: str) -> Callable[[], object]:
        """A no-argument callable running one ``pass_name`` on these inputs (made once, called
        for warm-up and every timed repeat). Forward runs under ``no_grad`` (inference);
        forward+backward back-propagates ``grad_values`` ``(B, M)`` into both inputs."""
        if pass_name not in PASSES:
            raise ValueError(f"pass_name must be one of {PASSES}, got {pass_name!r}")
        if self.min_distance is None:
            return _floor_step(x, prototypes)
        fn = self.min_distance
        if pass_name == FORWARD:
            def forward() -> object:
                with torch.no_grad():
                    return fn(x, prototypes)
            return forward
        xg = x.detach().requires_grad_()
        pg = prototypes.detach().requires_grad_()

        def forward_backward() -> object:
            xg.grad = pg.grad = None  # as an optimizer's zero_grad(set_to_none=True)
            values, _ = fn(xg, pg)
            values.backward(grad_values)
            return xg.grad, pg.grad
        return forward_backward

    def evaluate(self, x: Tensor, prototypes: Tensor, grad_values: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """values, indices ``(B, M)`` and the gradients of ``sum(grad_values * values)`` with
        respect to ``x`` and ``prototypes``, for checking a contender against the reference."""
        if self.min_distance is None:
            raise ValueError(f"contender {self.name!r} does not compute distances")
        xg = x.detach().requires_grad_()
        pg = prototypes.detach().requires_grad_()
        values, indices = self.min_distance(xg, pg)
        grad_x, grad_p = torch.autograd.grad(values, (xg, pg), grad_values)
        return values.detach(), indices, grad_x, grad_p


def _floor_step(x: Tensor, prototypes: Tensor) -> Callable[[], object]:
    # Operands laid out once, outside the timing: the floor is the GEMM alone.
    rows = patches(x, prototypes.shape[2], prototypes.shape[3]).reshape(-1, prototypes[0].numel())
    rows = rows.contiguous()
    protos_t = prototypes.flatten(1).t().contiguous()

    def gemm() -> object:
        return torch.mm(rows, protos_t)
    return gemm


WORKSPACE_BYTES = 128 << 20
"""Allowance for library workspaces and allocator slack (what was measured: benchmarks/NOTES.md)."""


def _outputs(shape: NamedShape, dtype: torch.dtype) -> int:
    """values + int64 indices + a gradient of the values, ``(B, M)`` each."""
    return shape.batch * shape.num_prototypes * (2 * _size(dtype) + 8)


def _input_grads(shape: NamedShape, dtype: torch.dtype, pass_name: str) -> int:
    """Gradients of x and prototypes, plus a patch-row copy of x for the backward."""
    return 3 * shape.input_bytes(dtype) if pass_name == FORWARD_BACKWARD else 0


def _distance_tensors(forward: float, backward: float) -> Callable[[NamedShape, torch.dtype,
                                                                    str], int]:
    """Peak = ``forward`` (or ``backward``) float32-sized ``(B, M, L')`` tensors + the rest.

    The counts are measured peaks (benchmarks/NOTES.md) rounded up; float32-sized even for
    half inputs, since some CPU kernels compute half types in float32.
    """
    def estimate(shape: NamedShape, dtype: torch.dtype, pass_name: str) -> int:
        count = forward if pass_name == FORWARD else backward
        full = int(count * shape.distances * max(4, _size(dtype)))
        return (full + _outputs(shape, dtype) + _input_grads(shape, dtype, pass_name)
                + WORKSPACE_BYTES)
    return estimate


def _loop_estimate(shape: NamedShape, dtype: torch.dtype, pass_name: str) -> int:
    per_image = 4 * shape.num_prototypes * shape.positions * max(4, _size(dtype))
    # backward: the chosen rows, their difference and gradient, (M, K) each: 5 such blocks, as
    # measured (benchmarks/NOTES.md)
    per_image += 5 * shape.num_prototypes * shape.row_size * max(4, _size(dtype))
    return (per_image + _outputs(shape, dtype) + _input_grads(shape, dtype, pass_name)
            + WORKSPACE_BYTES)


def _protokern_estimate(shape: NamedShape, dtype: torch.dtype, pass_name: str) -> int:
    # The reference backend keeps about six float64 blocks of CHUNK_ELEMENTS alive; fused
    # backends need less. Either way a few (B, M) outputs.
    blocks = 6 * min(CHUNK_ELEMENTS, shape.distances) * 8
    return (blocks + 3 * _outputs(shape, dtype) + _input_grads(shape, dtype, pass_name)
            + WORKSPACE_BYTES)


def _floor_estimate(shape: NamedShape, dtype: torch.dtype, pass_name: str) -> int:
    return shape.distances * _size(dtype) + shape.input_bytes(dtype) + WORKSPACE_BYTES


def _keops_estimate(shape: NamedShape, dtype: torch.dtype, pass_name: str) -> int:
    return (2 * _outputs(shape, dtype) + 2 * shape.input_bytes(dtype)
            + _input_grads(shape, dtype, pass_name) + WORKSPACE_BYTES)


NAIVE_CONTENDERS = (
    Contender("naive_conv", "naive", "ProtoPNet: conv(x^2, ones) + conv(x, p), relu, min-pool",
              protopnet_min_distance, _distance_tensors(forward=5, backward=6)),
    Contender("naive_cdist", "naive", "torch.cdist(patches, p) ** 2, then min",
              cdist_min, _distance_tensors(forward=3, backward=6)),
    Contender("naive_loop", "naive", "per image torch.mm then min; gather/scatter backward",
              loop_mm_min, _loop_estimate),
)
KEOPS = Contender("keops", "keops", "pykeops LazyTensor min_argmin reduction", keops_min,
                  _keops_estimate)
FLOOR = Contender("floor_mm", "floor", "bare torch.mm (B*L') x K @ K x M: same FLOPs", None,
                  _floor_estimate)


def keops_available() -> bool:
    return importlib.util.find_spec("pykeops") is not None


def protokern_contender(backend: str) -> Contender:
    """The contender running ``pk.min_distance`` on ``backend``."""
    return Contender(f"protokern:{backend}", "protokern", f"pk.min_distance, backend {backend}",
                     _protokern_backend(backend), _protokern_estimate, backend)


def all_contenders(device: str) -> list[Contender]:
    """Every contender that can run on ``device`` in this install, discovered now."""
    found = [protokern_contender(b) for b in pk.available_backends(device)]
    found += list(NAIVE_CONTENDERS)
    if keops_available():
        found.append(KEOPS)
    return found + [FLOOR]


def _names(names: str | list[str]) -> list[str]:
    if isinstance(names, str):
        return [n.strip() for n in names.split(",") if n.strip()]
    return list(names)


def select_contenders(device: str, names: str | list[str] | None) -> list[Contender]:
    """The contenders named in ``names`` (comma-separated or a list of names or `KINDS`:
    ``protokern`` selects every backend, ``naive`` every naive one, ``keops`` KeOps), all of
    them for None; ValueError on a name or kind with no available contender."""
    available = all_contenders(device)
    if names is None:
        return available
    chosen = []
    for name in _names(names):
        matches = [c for c in available if name in (c.name, c.kind)]
        if not matches:
            raise ValueError(
                f"--contenders: {name!r} is not available on {device}; available: "
                f"{', '.join(c.name for c in available)} (or a kind: {', '.join(KINDS)})")
        chosen += [c for c in matches if c.name not in {d.name for d in chosen}]
    return chosen


def exclude_contenders(device: str, contenders: list[Contender],
                       names: str | list[str] | None) -> list[Contender]:
    """``contenders`` less those named in ``names`` (names or `KINDS`). A kind with nothing
    available is fine (``--exclude keops`` without pykeops); an unknown name is a ValueError,
    so a typo does not silently leave a contender in."""
    names = _names(names or [])
    kinds = [n for n in names if n in KINDS]
    named = [n for n in names if n not in KINDS]
    excluded = {c.name for c in select_contenders(device, named)} if named else set()
    return [c for c in contenders if c.name not in excluded and c.kind not in kinds]


def contender_named(device: str, name: str) -> Contender:
    """One contender by its exact name (what a worker process receives)."""
    for contender in all_contenders(device):
        if contender.name == name:
            return contender
    raise ValueError(f"no contender {name!r} on {device}")

