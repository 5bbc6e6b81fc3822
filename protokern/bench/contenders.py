"""The contenders of the benchmark: every way to compute each op's distances.

All take ``x`` ``(B, D, H, W)`` and ``prototypes`` ``(M, D, ph, pw)`` (sqeuclidean metric) and
return ``values`` and ``indices`` differentiable in ``values`` with respect to both inputs:
``(B, M)`` (flat over ``H' x W'``) for ``min_distance``, ``(B, L', k)`` for
``nearest_prototypes`` (`NamedShape.op`). For ``min_distance``:

- ``protokern:<backend>``: every backend `protokern.available_backends(device)` lists when the
  bench runs, so a backend added later is benchmarked without editing this file; where this
  CPU runs the cpu backend's packed GEMM, ``protokern:cpu+blas`` and ``protokern:cpu+packed``
  too (`protokern.backends.cpu.gemm`: each GEMM forced, ``protokern:cpu`` being the automatic
  choice);
- ``naive_conv``, ``naive_cdist``, ``naive_loop``: `protokern.baselines` (ProtoPNet's
  convolutions and min-pool, ``torch.cdist`` then ``min``, a per-image ``torch.mm`` loop);
- ``keops``: a pykeops ``LazyTensor`` ``min_argmin`` reduction, when pykeops is importable (its
  own kind ``keops``: a fused library, not naive PyTorch, so never the "best naive" baseline);
- ``floor_mm``: a bare ``torch.mm`` ``(B L') x K @ K x M`` of the same FLOPs: the floor (of
  both ops).

For ``nearest_prototypes``: ``protokern:<backend>``; ``naive_cdist_topk`` and
``naive_chunked_cdist`` (`protokern.baselines`: anomalib's and vector-quantize-pytorch's
formulation, whole or by blocks of rows); ``faiss``, an exact ``IndexFlatL2`` search when
faiss-cpu is importable; ``keops``, a ``Kmin_argKmin`` reduction when pykeops is importable
(neither has a gradient: with one, the values are recomputed at their indices in PyTorch, as
their users do).

``estimate_bytes`` is each contender's peak memory beyond its inputs (a conservative model,
checked against measurements in benchmarks/NOTES.md), so a case that cannot fit is skipped
with the reason rather than run out of memory.
"""

import contextlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import protokern as pk
from protokern.backends import cpu as cpu_backend
from protokern.backends.reference import CHUNK_ELEMENTS, patches
from protokern.baselines import (
    cdist_min,
    cdist_topk,
    chunked_cdist_topk,
    loop_mm_min,
    protopnet_min_distance,
)
from protokern.bench.shapes import NamedShape

KINDS = ("protokern", "naive", "keops", "faiss", "floor")
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


def _gemm_scope(gemm: str | None):
    """The cpu backend's GEMM choice for a ``protokern:cpu+<gemm>`` contender, else nothing."""
    return cpu_backend.gemm(gemm) if gemm is not None else contextlib.nullcontext()


def _protokern_backend(name: str, gemm: str | None = None) -> MinDistanceFn:
    def run(x: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
        with pk.use_backend(name), _gemm_scope(gemm):
            return tuple(pk.min_distance(x, prototypes))

    run.__name__ = f"protokern_{name}" + (f"_{gemm}" if gemm else "")
    return run


def _protokern_nearest(name: str, k: int, gemm: str | None = None) -> MinDistanceFn:
    def run(x: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
        with pk.use_backend(name), _gemm_scope(gemm):
            values, indices = pk.nearest_prototypes(x, prototypes, k)
        return values.flatten(1, -2), indices.flatten(1, -2)  # (B, L', k)

    run.__name__ = f"protokern_{name}_nearest" + (f"_{gemm}" if gemm else "")
    return run


def _values_at(rows: Tensor, protos: Tensor, indices: Tensor) -> Tensor:
    """``|row - p|^2`` at the given ``(N, k)`` prototype indices, differentiable."""
    return (rows[:, None, :] - protos[indices]).square().sum(-1)


def faiss_search(x: Tensor, prototypes: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """faiss-cpu's exact ``IndexFlatL2`` search (float32, on the CPU), on torch's threads."""
    import faiss

    rows = patches(x, prototypes.shape[2], prototypes.shape[3])
    shape = (rows.shape[0], rows.shape[1], k)
    rows = rows.reshape(-1, rows.shape[-1])
    protos = prototypes.flatten(1)
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(protos.shape[1])
    index.add(protos.detach().float().contiguous().numpy())
    values, indices = index.search(rows.detach().float().contiguous().numpy(), k)
    indices = torch.from_numpy(indices)
    if x.requires_grad or prototypes.requires_grad:
        return _values_at(rows, protos, indices).view(shape), indices.view(shape)
    return torch.from_numpy(values).to(x.dtype).view(shape), indices.view(shape)


def keops_nearest(x: Tensor, prototypes: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """pykeops: a symbolic ``(N, M)`` distance reduced by ``Kmin_argKmin`` over ``M``."""
    from pykeops.torch import LazyTensor

    rows = patches(x, prototypes.shape[2], prototypes.shape[3])
    shape = (rows.shape[0], rows.shape[1], k)
    rows = rows.reshape(-1, rows.shape[-1]).contiguous()
    protos = prototypes.flatten(1).contiguous()
    sq = ((LazyTensor(rows.detach()[:, None, :]) - LazyTensor(protos.detach()[None])) ** 2).sum(-1)
    values, indices = sq.Kmin_argKmin(k, dim=1)
    indices = indices.long()
    if x.requires_grad or prototypes.requires_grad:
        return _values_at(rows, protos, indices).view(shape), indices.view(shape)
    return values.view(shape), indices.view(shape)


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
        op: the op it computes (`NamedShape.op`); None for the floor, which serves every op.
    """

    name: str
    kind: str
    description: str
    min_distance: MinDistanceFn | None
    estimate_bytes: Callable[[NamedShape, torch.dtype, str], int]
    backend: str | None = None
    op: str | None = "min_distance"

    def runs(self, shape: NamedShape) -> bool:
        """Whether this contender computes ``shape``'s op."""
        return self.op is None or self.op == shape.op

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
    """values + int64 indices + a gradient of the values, `NamedShape.output_shape` each."""
    return math.prod(shape.output_shape) * (2 * _size(dtype) + 8)


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
                  _floor_estimate, op=None)

NEAREST = "nearest_prototypes"


def _cdist_estimate(full: float, backward: float) -> Callable[[NamedShape, torch.dtype, str],
                                                              int]:
    """``full`` (forward; ``backward`` with a backward) float32 ``(N, M)`` matrices + the rest."""
    def estimate(shape: NamedShape, dtype: torch.dtype, pass_name: str) -> int:
        count = full if pass_name == FORWARD else backward
        return (int(count * shape.distances * max(4, _size(dtype))) + _outputs(shape, dtype)
                + _input_grads(shape, dtype, pass_name) + WORKSPACE_BYTES)
    return estimate


def _chunked_estimate(shape: NamedShape, dtype: torch.dtype, pass_name: str) -> int:
    if pass_name == FORWARD_BACKWARD:  # autograd keeps every block's matrices
        return _cdist_estimate(2, 3)(shape, dtype, pass_name)
    block = 2 * 4096 * shape.num_prototypes * max(4, _size(dtype))
    return block + _outputs(shape, dtype) + WORKSPACE_BYTES


def _gathered_estimate(shape: NamedShape, dtype: torch.dtype, pass_name: str) -> int:
    """faiss/KeOps: the outputs; with a backward, the gathered prototypes ``(N, k, K)``."""
    gathered = 3 * math.prod(shape.output_shape) * shape.row_size * max(4, _size(dtype))
    return (_outputs(shape, dtype) + 2 * shape.input_bytes(dtype) + WORKSPACE_BYTES
            + (gathered + _input_grads(shape, dtype, pass_name)
               if pass_name == FORWARD_BACKWARD else 0))


def _nearest(name: str, kind: str, description: str, function, estimate) -> Callable[
        [int], Contender]:
    return lambda k: Contender(name, kind, description, lambda x, p: function(x, p, k),
                               estimate, op=NEAREST)


NEAREST_NAIVE = (
    _nearest("naive_cdist_topk", "naive", "torch.cdist(rows, p) ** 2 (N, M), then topk / min",
             cdist_topk, _cdist_estimate(2, 4)),
    _nearest("naive_chunked_cdist", "naive", "the same, 4096 rows at a time",
             chunked_cdist_topk, _chunked_estimate),
)
FAISS = _nearest("faiss", "faiss", "faiss-cpu IndexFlatL2 exact search (values recomputed "
                 "for a gradient)", faiss_search, _gathered_estimate)
KEOPS_NEAREST = _nearest("keops", "keops", "pykeops LazyTensor Kmin_argKmin reduction",
                         keops_nearest, _gathered_estimate)


def keops_available() -> bool:
    return importlib.util.find_spec("pykeops") is not None


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def protokern_contender(backend: str, op: str = "min_distance", k: int = 1,
                        gemm: str | None = None) -> Contender:
    """The contender running ``op`` (``pk.min_distance``, ``pk.nearest_prototypes`` with ``k``)
    on ``backend``; ``gemm`` forces the cpu backend's GEMM (`protokern.backends.cpu.gemm`), as
    ``protokern:cpu+blas`` and ``protokern:cpu+packed``."""
    name = f"protokern:{backend}" + (f"+{gemm}" if gemm else "")
    on_gemm = f", {gemm} GEMM" if gemm else ""
    if op == NEAREST:
        return Contender(name, "protokern", f"pk.nearest_prototypes, backend {backend}{on_gemm}",
                         _protokern_nearest(backend, k, gemm), _protokern_estimate, backend,
                         op=NEAREST)
    return Contender(name, "protokern", f"pk.min_distance, backend {backend}{on_gemm}",
                     _protokern_backend(backend, gemm), _protokern_estimate, backend)


def _gemm_variants(device: str) -> list[str]:
    """Both GEMMs of the cpu backend where this host runs the packed one, so that one run
    times them side by side (``protokern:cpu`` is the automatic choice)."""
    if device != "cpu" or "cpu" not in pk.available_backends(device):
        return []
    return ["blas", "packed"] if cpu_backend.packed_gemm_supported() else []


def all_contenders(device: str, op: str = "min_distance", k: int = 1) -> list[Contender]:
    """Every contender of ``op`` (``k``: how many nearest prototypes) that can run on
    ``device`` in this install, discovered now."""
    found = [protokern_contender(b, op, k) for b in pk.available_backends(device)]
    found += [protokern_contender("cpu", op, k, gemm) for gemm in _gemm_variants(device)]
    if op == NEAREST:
        found += [make(k) for make in NEAREST_NAIVE]
        if faiss_available() and device == "cpu":
            found.append(FAISS(k))
        if keops_available():
            found.append(KEOPS_NEAREST(k))
    else:
        found += list(NAIVE_CONTENDERS)
        if keops_available():
            found.append(KEOPS)
    return found + [FLOOR]


def _names(names: str | list[str]) -> list[str]:
    if isinstance(names, str):
        return [n.strip() for n in names.split(",") if n.strip()]
    return list(names)


def select_contenders(device: str, names: str | list[str] | None, op: str = "min_distance",
                      k: int = 1) -> list[Contender]:
    """The contenders of ``op`` named in ``names`` (comma-separated or a list of names or
    `KINDS`: ``protokern`` selects every backend, ``naive`` every naive one, ``keops`` KeOps),
    all of them for None; ValueError on a name or kind with no available contender of any op."""
    available = all_contenders(device, op, k)
    if names is not None:
        everything = [c for o in ("min_distance", NEAREST) for c in all_contenders(device, o)]
        for name in _names(names):
            if not any(name in (c.name, c.kind) for c in everything):
                raise ValueError(
                    f"contender {name!r} is not available on {device}; available: "
                    f"{', '.join(sorted({c.name for c in everything}))} (or a kind: "
                    f"{', '.join(KINDS)})")
    if names is None:
        return available
    chosen = []
    for name in _names(names):
        matches = [c for c in available if name in (c.name, c.kind)]
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
    if named:
        select_contenders(device, named)  # a name no op has: ValueError
    excluded = set(named)
    return [c for c in contenders if c.name not in excluded and c.kind not in kinds]


def contender_named(device: str, name: str, op: str = "min_distance", k: int = 1
                    ) -> Contender:
    """One contender of ``op`` by its exact name (what a worker process receives)."""
    for contender in all_contenders(device, op, k):
        if contender.name == name:
            return contender
    raise ValueError(f"no contender {name!r} on {device}")

