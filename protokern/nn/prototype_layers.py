"""ProtoPNet's prototype layer, and a bank of prototypes sharded over a process group; and
`port_state_dict`, which renames the keys of original ProtoPNet and CaBRNet checkpoints to
those of a model built on `PrototypeLayer`."""

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from protokern.distributed.collectives import all_gather_uneven, gather, shard_sizes, sum_gradients
from protokern.distributed.sharded import sharded_nearest_prototypes
from protokern.ops import (
    MinDistance,
    NearestPrototypes,
    check_metric,
    distance_map,
    min_distance,
    nearest_prototypes,
)


def _check_layer_args(where: str, num_prototypes: int, dim: int, patch: int | tuple[int, int],
                      metric: str) -> tuple[int, int]:
    """Raise ValueError on a bad layer argument; returns the patch as ``(ph, pw)``."""
    if isinstance(patch, int):
        patch = (patch, patch)
    if not isinstance(patch, (tuple, list)) or len(patch) != 2:
        raise ValueError(f"{where}: patch must be an int or a pair (ph, pw), got {patch!r}")
    ph, pw = patch
    for name, value in (("num_prototypes", num_prototypes), ("dim", dim), ("patch", ph),
                        ("patch", pw)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    check_metric(metric, where)
    return ph, pw


class _PrototypeBank(nn.Module):
    """What both prototype layers hold: ``prototype_vectors`` ``(M or a shard of it, D, ph, pw)``
    and a metric."""

    prototype_vectors: nn.Parameter
    metric: str

    @property
    def dim(self) -> int:
        return self.prototype_vectors.shape[1]

    @property
    def patch(self) -> tuple[int, int]:
        return tuple(self.prototype_vectors.shape[2:])

    def extra_repr(self) -> str:
        ph, pw = self.patch
        return (f"num_prototypes={self.num_prototypes}, dim={self.dim}, patch=({ph}, {pw}), "
                f"metric={self.metric!r}")


class PrototypeLayer(_PrototypeBank):
    """A ProtoPNet prototype layer: min distance from every prototype to the patches of a map.

    Holds ``prototype_vectors`` ``(M, D, ph, pw)``, initialised uniform in [0, 1) as ProtoPNet
    does. ``forward(x)`` takes a ``(B, D, H, W)`` feature map (or ``(B, L, D)`` tokens when the
    patch is 1x1) and returns `MinDistance` ``(values, indices)``, both ``(B, M)``.

    Args:
        num_prototypes: M.
        dim: D, the channels of the feature map.
        patch: ``(ph, pw)`` or one int for a square window.
        metric: ``"sqeuclidean"`` or ``"cosine"``.
    """

    def __init__(
        self,
        num_prototypes: int,
        dim: int,
        patch: int | tuple[int, int] = (1, 1),
        metric: str = "sqeuclidean",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        ph, pw = _check_layer_args("PrototypeLayer", num_prototypes, dim, patch, metric)
        self.metric = metric
        self.prototype_vectors = nn.Parameter(
            torch.rand(num_prototypes, dim, ph, pw, device=device, dtype=dtype)
        )

    @property
    def num_prototypes(self) -> int:
        return self.prototype_vectors.shape[0]


    def forward(self, x: Tensor) -> MinDistance:
        return min_distance(x, self.prototype_vectors, self.metric)

    def nearest_prototypes(self, x: Tensor, k: int = 1) -> NearestPrototypes:
        """The ``k`` nearest prototypes of every patch, token or vector of ``x``:
        `protokern.nearest_prototypes` on this layer's bank."""
        return nearest_prototypes(x, self.prototype_vectors, k, self.metric)

    def distance_map(self, x: Tensor) -> Tensor:
        """All distances ``(B, M, H', W')`` (tokens: ``(B, M, L)``), for explanations."""
        return distance_map(x, self.prototype_vectors, self.metric)



class ShardedPrototypeLayer(_PrototypeBank):
    """A `PrototypeLayer` whose bank is split over the ranks of a process group, for banks too
    big for one device.

    Rank ``r`` holds a contiguous shard ``prototype_vectors`` ``(M_r, D, ph, pw)``: rows
    ``shard`` of the global ``(M, D, ph, pw)`` bank; shard sizes differ by at most one, the
    first ranks holding the larger ones. ``forward(x)`` computes the min distances to the local
    shard and gathers them from every rank, returning `MinDistance` ``(values, indices)``, both
    ``(B, M)`` over the global bank, equal to what `PrototypeLayer` gives with that bank.
    Without an initialised process group (or with one rank) it is a `PrototypeLayer`.

    Initialisation draws the whole bank as `PrototypeLayer` does (uniform in [0, 1)) and keeps
    this rank's rows, so the same seed gives the same global bank; that holds the whole bank in
    memory once, on ``device``. For a bank that does not fit there, or to shard an existing one,
    use `from_full` (e.g. with a bank on the CPU); `full_prototypes` gathers it back. The state
    dict holds only this rank's shard.

    What ``x`` is, and so what the gradients mean, depends on ``data_parallel``:

    - ``False`` (default): ``x`` ``(B, D, H, W)`` (or ``(B, L, D)`` tokens for a 1x1 patch) is
      the same on every rank, and every rank computes the same loss ``L`` from the same gathered
      output. Each shard's gradient is then its rows of ``dL/dbank`` and ``x``'s gradient is
      ``dL/dx`` (summed over the ranks' shards in backward), on every rank: what the unsharded
      layer gives.
    - ``True``: each rank passes its own batch ``x_r`` ``(B_r, ...)`` (batch sizes may differ,
      the other dimensions may not) and gets ``(B_r, M)`` for it; each rank computes its own
      loss ``L_r``. Gradients are those of the sum ``L = sum_r L_r``, as for the unsharded layer
      applied to the concatenated batch: ``x_r``'s gradient is ``dL_r/dx_r`` and each shard's
      is its rows of ``dL/dbank``. DistributedDataParallel averages the gradients of replicated
      parameters instead (the gradient of ``L / world_size``): scale accordingly, and keep this
      layer's parameters out of DDP's all-reduce, since the ranks hold different shards.

    Every rank must call ``forward`` (and ``backward`` through its output) in the same order:
    both run collectives.

    Args:
        num_prototypes: M, the size of the global bank; at least the number of ranks.
        dim: D, the channels of the feature map.
        patch: ``(ph, pw)`` or one int for a square window.
        metric: ``"sqeuclidean"`` or ``"cosine"``.
        process_group: the ranks sharing the bank; the default group when None and one is
            initialised.
        data_parallel: whether each rank passes its own batch (see above).
    """

    def __init__(
        self,
        num_prototypes: int,
        dim: int,
        patch: int | tuple[int, int] = (1, 1),
        metric: str = "sqeuclidean",
        *,
        process_group: ProcessGroup | None = None,
        data_parallel: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        ph, pw = _check_layer_args("ShardedPrototypeLayer", num_prototypes, dim, patch, metric)
        self.metric = metric
        self.data_parallel = data_parallel
        group, self._rank, world_size = _resolve_group(process_group)
        self._group_handle = _SharedHandle(group)
        if num_prototypes < world_size:
            raise ValueError(f"ShardedPrototypeLayer: num_prototypes ({num_prototypes}) must be "
                             f"at least the number of ranks ({world_size})")
        self.shard_sizes = shard_sizes(num_prototypes, world_size)
        start = sum(self.shard_sizes[: self._rank])
        self.shard = slice(start, start + self.shard_sizes[self._rank])
        bank = torch.rand(num_prototypes, dim, ph, pw, device=device, dtype=dtype)
        self.prototype_vectors = nn.Parameter(bank[self.shard].clone())

    @classmethod
    def from_full(
        cls,
        bank: Tensor,
        metric: str = "sqeuclidean",
        *,
        process_group: ProcessGroup | None = None,
        data_parallel: bool = False,
    ) -> "ShardedPrototypeLayer":
        """A layer holding this rank's rows of ``bank`` ``(M, D)`` or ``(M, D, ph, pw)``, which
        must be the same on every rank (e.g. a `PrototypeLayer`'s ``prototype_vectors`` or the
        ``full_prototypes()`` of a checkpoint). The shard is a copy on ``bank``'s device; no
        random numbers are drawn."""
        if not isinstance(bank, Tensor) or bank.dim() not in (2, 4):
            shape = tuple(bank.shape) if isinstance(bank, Tensor) else type(bank).__name__
            raise ValueError(f"ShardedPrototypeLayer.from_full: bank must be (M, D) or "
                             f"(M, D, ph, pw), got {shape}")
        if bank.dim() == 2:
            bank = bank[:, :, None, None]
        num_prototypes, dim, ph, pw = bank.shape
        # on the meta device the constructor allocates and draws nothing
        layer = cls(num_prototypes, dim, (ph, pw), metric, process_group=process_group,
                    data_parallel=data_parallel, device="meta", dtype=bank.dtype)
        layer.prototype_vectors = nn.Parameter(bank[layer.shard].detach().clone())
        return layer

    @property
    def _group(self) -> ProcessGroup | None:
        return self._group_handle.value

    @property
    def num_prototypes(self) -> int:
        """M, the size of the global bank."""
        return sum(self.shard_sizes)


    def forward(self, x: Tensor) -> MinDistance:
        """``x`` ``(B, D, H, W)`` or ``(B, L, D)`` -> `MinDistance` ``(values, indices)``, both
        ``(B, M)`` over the global bank (``data_parallel``: ``B`` is this rank's batch)."""
        if self._group is None:
            return min_distance(x, self.prototype_vectors, self.metric)
        x, rows = self._shared_input(x)
        values, indices = min_distance(x, self.prototype_vectors, self.metric)
        return MinDistance(self._gathered_output(values, rows),
                           self._gathered_output(indices, rows))

    def distance_map(self, x: Tensor) -> Tensor:
        """All distances ``(B, M, H', W')`` (tokens: ``(B, M, L)``) over the global bank."""
        if self._group is None:
            return distance_map(x, self.prototype_vectors, self.metric)
        x, rows = self._shared_input(x)
        return self._gathered_output(distance_map(x, self.prototype_vectors, self.metric), rows)

    def nearest_prototypes(self, x: Tensor, k: int = 1) -> NearestPrototypes:
        """The ``k`` nearest prototypes of the global bank for every patch, token or vector of
        ``x`` (`protokern.distributed.sharded.sharded_nearest_prototypes`): global indices,
        equal to the unsharded op. Every rank passes the same ``x`` (not in ``data_parallel``
        mode, where the ranks' inputs differ: ValueError)."""
        if self._group is None:
            return nearest_prototypes(x, self.prototype_vectors, k, self.metric)
        if self.data_parallel:
            raise ValueError("ShardedPrototypeLayer.nearest_prototypes: every rank must pass the "
                             "same x; this layer was built with data_parallel=True")
        return sharded_nearest_prototypes(x, self.prototype_vectors, k, self.metric,
                                          shard_sizes=self.shard_sizes, rank=self._rank,
                                          group=self._group)

    @torch.no_grad()
    def full_prototypes(self) -> Tensor:
        """The global bank ``(M, D, ph, pw)``, gathered from every rank (a collective: call it
        on all of them). A copy, without gradient."""
        if self._group is None:
            return self.prototype_vectors.detach().clone()
        return all_gather_uneven(self.prototype_vectors.detach(), self.shard_sizes, 0,
                                 self._group)

    def _shared_input(self, x: Tensor) -> tuple[Tensor, slice | None]:
        """The input every rank computes its shard's distances on, and (``data_parallel``) the
        rows of it that are this rank's batch."""
        if not self.data_parallel:
            return sum_gradients(x, self._group), None
        batch_sizes = self._batch_sizes(x)
        start = sum(batch_sizes[: self._rank])
        rows = slice(start, start + batch_sizes[self._rank])
        return gather(x, batch_sizes, 0, self._group, sum_gradients=True), rows

    def _gathered_output(self, local: Tensor, rows: slice | None) -> Tensor:
        """``local`` ``(B, M_r, ...)`` gathered over the prototypes into ``(B, M, ...)``."""
        # Data parallel: every rank gathers every rank's rows and keeps its own, moving
        # world_size times what an all-to-all would; simpler, and the (B, M) outputs are small
        # next to the gathered x. Each rank's gradient then covers only its rows: sum them.
        out = gather(local, self.shard_sizes, 1, self._group, sum_gradients=self.data_parallel)
        return out if rows is None else out[rows]

    def _batch_sizes(self, x: Tensor) -> list[int]:
        """Every rank's batch size; ValueError (on every rank) unless the other dimensions of
        the ranks' inputs agree, which the gather along the batch needs."""
        if x.dim() not in (3, 4):
            raise ValueError(f"ShardedPrototypeLayer: x must be (B, D, H, W) or (B, L, D), got "
                             f"{tuple(x.shape)}")
        shape = torch.tensor([x.dim(), *x.shape, *[0] * (4 - x.dim())], device=x.device)
        shapes = all_gather_uneven(shape[None], [1] * len(self.shard_sizes), 0, self._group)
        others = [0, 2, 3, 4]
        if not torch.equal(shapes[:, others], shape[others].expand(len(shapes), -1)):
            raise ValueError(f"ShardedPrototypeLayer(data_parallel=True): the ranks' inputs must "
                             f"agree in all but the batch dimension; got shapes "
                             f"{[s[1:1 + s[0]] for s in shapes.tolist()]}")
        return shapes[:, 1].tolist()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, shard=[{self.shard.start}:{self.shard.stop}] of "
                f"{len(self.shard_sizes)} ranks, data_parallel={self.data_parallel}")


class _SharedHandle:
    """Holds an object that copies of a module share instead of copying: `copy.deepcopy` of a
    module (EMA weights, a frozen old model in class-incremental learning) cannot copy a
    ProcessGroup, and the copy must talk to the same ranks anyway."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __deepcopy__(self, _memo: dict) -> "_SharedHandle":
        return self


def _resolve_group(process_group: ProcessGroup | None) -> tuple[ProcessGroup | None, int, int]:
    """``(group, rank, world_size)``; ``group`` is None when there is nothing to share with."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, 0, 1
        process_group = dist.group.WORLD
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError("ShardedPrototypeLayer: this process is not a member of process_group")
    world_size = dist.get_world_size(process_group)
    return (process_group if world_size > 1 else None), rank, world_size


ORIGINAL_LAYOUTS: dict[str, dict[str, str | None]] = {
    # cfchen-duke/ProtoPNet: `prototype_vectors` (M, D, 1, 1) at the model's root; `ones`, the
    # all-ones kernel its conv computes |x|^2 with, is not a weight
    "protopnet": {"prototype_vectors": "{layer}.prototype_vectors", "ones": None},
    # CaBRNet's ProtoPNet (`cabrnet.archs.protopnet`): the classifier holds the prototypes
    # (M, D, 1, 1), the last layer and the (M, K) class map; the legacy similarity's all-ones
    # kernel is not a weight
    "cabrnet": {
        "classifier.prototypes": "{layer}.prototype_vectors",
        "classifier.last_layer.weight": "last_layer.weight",
        "classifier.proto_class_map": "prototype_class_identity",
        "classifier.similarity_layer._summation_kernel": None,
    },
}
"""Key renames from each original layout to protokern's `ProtoPNet` (``{layer}``: the
attribute holding the `PrototypeLayer`); None drops the key."""


def port_state_dict(state_dict: Mapping[str, Tensor],
                    layout: str | Mapping[str, str | None] = "protopnet", *,
                    layer: str = "prototype_layer",
                    prefixes: Mapping[str, str] | None = None) -> dict[str, Tensor]:
    """An original checkpoint's state dict with its keys renamed for a model whose prototypes
    live in a `PrototypeLayer` (the tensors are shared, not copied).

    Args:
        state_dict: the original model's ``state_dict()`` (cfchen-duke ProtoPNet, CaBRNet).
        layout: ``"protopnet"`` or ``"cabrnet"`` (`ORIGINAL_LAYOUTS`), or your own mapping of
            original key -> new key (None: drop it).
        layer: the attribute name of the `PrototypeLayer` in the new model.
        prefixes: renames of key prefixes for the rest (e.g. a backbone:
            ``{"extractor.convnet.": "features."}``); other keys pass through unchanged.

    Raises:
        KeyError: a key of the layout that maps to a tensor is not in ``state_dict`` (the
        message lists the keys there). ValueError: the prototypes are not 2-d or 4-d.

    Example (cfchen-duke ProtoPNet -> a ported model)::

        model.load_state_dict(pk.nn.port_state_dict(torch.load(path).state_dict()))
    """
    renames = ORIGINAL_LAYOUTS[layout] if isinstance(layout, str) else dict(layout)
    missing = [key for key, new in renames.items() if new is not None and key not in state_dict]
    if missing:
        raise KeyError(f"port_state_dict: the {layout if isinstance(layout, str) else 'given'} "
                       f"layout needs {missing}, not in the state dict (its keys: "
                       f"{sorted(state_dict)[:12]})")
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in renames:
            if renames[key] is not None:
                out[renames[key].format(layer=layer)] = value
            continue
        for old, new in (prefixes or {}).items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    prototypes = out.get(f"{layer}.prototype_vectors")
    if prototypes is not None and prototypes.dim() == 2:  # (M, D) banks: (M, D, 1, 1)
        out[f"{layer}.prototype_vectors"] = prototypes[:, :, None, None]
    elif prototypes is not None and prototypes.dim() != 4:
        raise ValueError(f"port_state_dict: the prototypes must be (M, D) or (M, D, ph, pw), "
                         f"got shape {tuple(prototypes.shape)}")
    return out
