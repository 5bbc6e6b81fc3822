"""ProtoPNet-style part prototypes that grow task by task, in the manner of ICICLE.

ICICLE (Rymarczyk et al., "ICICLE: Interpretable Class Incremental Continual Learning", ICCV
2023) adds, for every task, new part prototypes and a new block of the last layer connecting
them to the task's classes; it freezes what earlier tasks learned, regularises the similarity
maps of old prototypes (so it needs them), initialises new prototypes from the new task's
patches, and corrects task-recency bias in the logits. This head provides those pieces; the
training loop (losses, the interpretability regulariser) belongs to the caller.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protokern.heads.growth import check_count, resize_buffers_for_load, shape_of
from protokern.heads.kmeans import kmeans
from protokern.ops import check_metric, distance_map, min_distance

LOG_EPSILON = 1e-4
"""ProtoPNet's epsilon in ``log((d + 1) / (d + eps))``."""


class PartPrototypeOutput(NamedTuple):
    """What `PartPrototypeHead.forward` returns (M = all prototypes of all tasks)."""

    logits: Tensor
    """``(B, C)``: per task ``similarities @ last_layer.T + task_bias``, tasks concatenated."""
    min_distances: Tensor
    """``(B, M)``: min over positions of the distance (`protokern.min_distance`)."""
    indices: Tensor
    """``(B, M)`` int64: where that minimum is, flat over ``H' x W'``."""
    similarity_maps: Tensor | None
    """``(B, M, H', W')`` similarities at every position, only when asked for."""


class PartPrototypeHead(nn.Module):
    """Part prototypes over a ``(B, D, H, W)`` feature map, added one task at a time.

    Similarity of a distance ``d``: ProtoPNet's ``log((d + 1) / (d + 1e-4))`` for
    ``metric="sqeuclidean"``, ``1 - d`` (cosine similarity) for ``metric="cosine"``; both
    decrease with ``d``, so the maximum similarity over positions is that of the min distance.

    Task ``t`` owns prototypes ``prototypes[t]`` ``(M_t, D, ph, pw)``, a last-layer block
    ``last_layers[t]`` ``(C_t, M_t)`` (initialised as ProtoPNet's: 1 from a class's own
    prototypes, -0.5 from the task's other prototypes) and a logit bias ``task_bias[t]`` added
    to its classes' logits (task-recency correction; 0 until set). Classes are numbered in task
    order, so task ``t``'s classes are ``task_classes(t)``.

    Args:
        dim: D, channels of the feature map.
        patch: ``(ph, pw)`` prototype window, or one int.
        metric: ``"sqeuclidean"`` or ``"cosine"``.
    """

    def __init__(self, dim: int, patch: int | tuple[int, int] = 1, metric: str = "sqeuclidean",
                 *, device: torch.device | str | None = None) -> None:
        super().__init__()
        where = "PartPrototypeHead"
        self.dim = check_count(dim, "dim", where, low=1)
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        self.patch = (check_count(ph, "patch", where, 1), check_count(pw, "patch", where, 1))
        check_metric(metric, where)
        self.metric = metric
        self.prototypes = nn.ParameterList()
        self.last_layers = nn.ParameterList()
        self.register_buffer("task_bias", torch.zeros(0, device=device))
        # class of each prototype, (M,) int64: which class a prototype was made for
        self.register_buffer("prototype_class", torch.zeros(0, dtype=torch.int64, device=device))

    @property
    def num_tasks(self) -> int:
        return len(self.prototypes)

    @property
    def num_classes(self) -> int:
        return sum(w.shape[0] for w in self.last_layers)

    @property
    def num_prototypes(self) -> int:
        return sum(p.shape[0] for p in self.prototypes)

    def task_classes(self, task: int) -> range:
        """Global class indices of ``task``."""
        self._check_task(task, "task_classes")
        start = sum(w.shape[0] for w in self.last_layers[:task])
        return range(start, start + self.last_layers[task].shape[0])

    def task_prototypes(self, task: int) -> range:
        """Indices (into the concatenated M prototypes) of ``task``'s prototypes."""
        self._check_task(task, "task_prototypes")
        start = sum(p.shape[0] for p in self.prototypes[:task])
        return range(start, start + self.prototypes[task].shape[0])

    def _check_task(self, task: object, where: str) -> None:
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"PartPrototypeHead.{where}: task must be an int in "
                             f"[0, {self.num_tasks}), got {task!r}")

    # ------------------------------------------------------------------------------------------
    # Growth

    def add_task(self, num_classes: int, protos_per_class: int = 10,
                 init: str | Tensor = "kmeans", features: Tensor | None = None,
                 labels: Tensor | None = None, seed: int = 0) -> int:
        """Add a task of ``num_classes`` classes with ``protos_per_class`` prototypes each.

        Args:
            num_classes: C_t >= 1; they get the next global class indices.
            protos_per_class: prototypes per class.
            init: ``"kmeans"``: each class's prototypes are the k-means centers (assignment by
                `protokern.min_distance`) of the ``ph x pw`` patches of that class's feature
                maps in ``features``; ``"random"``: uniform in [0, 1) as ProtoPNet; or a tensor
                ``(C_t * protos_per_class, D, ph, pw)`` (class-major order).
            features: ``(N, D, H, W)`` feature maps of the new task (``init="kmeans"``).
            labels: ``(N,)`` their global class labels, all in the new task's range.
            seed: seeds k-means++ and the random init.

        Returns:
            The new task's index.
        """
        where = "PartPrototypeHead.add_task"
        check_count(num_classes, "num_classes", where, 1)
        check_count(protos_per_class, "protos_per_class", where, 1)
        first = self.num_classes
        count = num_classes * protos_per_class
        shape = (count, self.dim, *self.patch)
        dtype = self.prototypes[0].dtype if self.num_tasks else torch.get_default_dtype()
        if isinstance(init, Tensor):
            if tuple(init.shape) != shape:
                raise ValueError(f"{where}: init tensor must be {shape} (num_classes * "
                                 f"protos_per_class, D, ph, pw), got {shape_of(init)}")
            initial = init.detach().clone().to(dtype)
        elif init == "random":
            generator = torch.Generator().manual_seed(seed)
            initial = torch.rand(shape, generator=generator, dtype=dtype)
        elif init == "kmeans":
            initial = self._kmeans_init(features, labels, num_classes, protos_per_class, first,
                                        seed, where).to(dtype)
        else:
            raise ValueError(f"{where}: init must be 'kmeans', 'random' or a tensor, got "
                             f"{init!r}")
        device = self.task_bias.device
        self.prototypes.append(nn.Parameter(initial.to(device)))
        own = torch.arange(count, device=device) // protos_per_class
        connection = torch.full((num_classes, count), -0.5, dtype=dtype, device=device)
        connection[own, torch.arange(count, device=device)] = 1.0
        self.last_layers.append(nn.Parameter(connection))
        self.task_bias = torch.cat([self.task_bias, self.task_bias.new_zeros(1)])
        self.prototype_class = torch.cat([self.prototype_class, first + own])
        return self.num_tasks - 1

    def _kmeans_init(self, features: Tensor | None, labels: Tensor | None, num_classes: int,
                     protos_per_class: int, first: int, seed: int, where: str) -> Tensor:
        if not isinstance(features, Tensor) or features.dim() != 4 or (
                features.shape[1] != self.dim):
            raise ValueError(f"{where}: init='kmeans' needs features (N, {self.dim}, H, W), "
                             f"got {shape_of(features)}")
        if not isinstance(labels, Tensor) or labels.shape != features.shape[:1]:
            raise ValueError(f"{where}: labels must be (N,) = ({features.shape[0]},), got "
                             f"{shape_of(labels)}")
        if labels.numel() and (labels.min() < first or labels.max() >= first + num_classes):
            raise ValueError(f"{where}: the new task's labels must lie in [{first}, "
                             f"{first + num_classes}), got [{int(labels.min())}, "
                             f"{int(labels.max())}]")
        ph, pw = self.patch
        centers = []
        for c in range(first, first + num_classes):
            maps = features[labels == c].detach()
            if maps.shape[0] == 0:
                raise ValueError(f"{where}: init='kmeans' needs samples of every class; class "
                                 f"{c} has none")
            # every ph x pw window as one vector (D * ph * pw), channel-major like a prototype
            patches = F.unfold(maps, (ph, pw)).transpose(1, 2).reshape(-1, self.dim * ph * pw)
            found = kmeans(patches, protos_per_class, self.metric, seed=seed + c).centers
            if found.shape[0] < protos_per_class:  # fewer patches than prototypes: repeat
                found = found[torch.arange(protos_per_class) % found.shape[0]]
            centers.append(found)
        return torch.cat(centers).reshape(-1, self.dim, ph, pw)

    def freeze(self, task: int, frozen: bool = True) -> None:
        """Stop (or, ``frozen=False``, resume) gradient updates of ``task``'s prototypes and
        last-layer block."""
        self._check_task(task, "freeze")
        self.prototypes[task].requires_grad_(not frozen)
        self.last_layers[task].requires_grad_(not frozen)

    @torch.no_grad()
    def set_task_bias(self, task: int, bias: float) -> None:
        """Set the logit bias added to ``task``'s classes (task-recency correction)."""
        self._check_task(task, "set_task_bias")
        self.task_bias[task] = bias

    # ------------------------------------------------------------------------------------------
    # Forward

    def all_prototypes(self) -> Tensor:
        """``(M, D, ph, pw)``: every task's prototypes, concatenated (differentiable)."""
        if not self.num_tasks:
            raise ValueError("PartPrototypeHead: no task yet; call add_task first")
        return torch.cat(list(self.prototypes))

    def similarity(self, distances: Tensor) -> Tensor:
        """Similarity of distances (any shape): see the class docstring."""
        if self.metric == "cosine":
            return 1 - distances
        return torch.log((distances + 1) / (distances + LOG_EPSILON))

    def forward(self, fmap: Tensor, similarity_maps: bool = False) -> PartPrototypeOutput:
        """``fmap`` ``(B, D, H, W)`` -> `PartPrototypeOutput` (logits ``(B, C)``, min
        distances and indices ``(B, M)``, and on request the ``(B, M, H', W')`` similarity
        maps from `protokern.distance_map`)."""
        if not isinstance(fmap, Tensor) or fmap.dim() != 4 or fmap.shape[1] != self.dim:
            raise ValueError(f"PartPrototypeHead.forward: fmap must be (B, {self.dim}, H, W), "
                             f"got {shape_of(fmap)}")
        prototypes = self.all_prototypes().to(fmap.dtype)
        values, indices = min_distance(fmap, prototypes, self.metric)
        similarities = self.similarity(values)
        logits = []
        for task in range(self.num_tasks):
            block = similarities[:, self.task_prototypes(task)]
            weight = self.last_layers[task].to(block.dtype)
            logits.append(block @ weight.T + self.task_bias[task].to(block.dtype))
        maps = None
        if similarity_maps:
            maps = self.similarity(distance_map(fmap, prototypes, self.metric))
        return PartPrototypeOutput(torch.cat(logits, dim=1), values, indices, maps)

    # ------------------------------------------------------------------------------------------
    # Saving and loading across growth

    def get_extra_state(self) -> dict:
        return {"dim": self.dim, "patch": self.patch, "metric": self.metric}

    def set_extra_state(self, state: dict) -> None:
        pass  # checked before loading, in _load_from_state_dict

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        where = "PartPrototypeHead.load_state_dict"
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            for name in ("dim", "patch", "metric"):
                if tuple_or(extra[name]) != tuple_or(getattr(self, name)):
                    raise ValueError(f"{where}: the saved head has {name}={extra[name]!r}, "
                                     f"this one {getattr(self, name)!r}")
        # Rebuild the per-task lists with the saved tasks' shapes, so that a head with fewer
        # (or more) tasks loads a grown one; values are copied in by the default loader.
        tasks = 0
        while prefix + f"prototypes.{tasks}" in state_dict:
            tasks += 1
        if tasks != self.num_tasks or any(
                state_dict[prefix + f"prototypes.{t}"].shape != self.prototypes[t].shape
                for t in range(tasks)):
            device = self.task_bias.device
            self.prototypes = nn.ParameterList(
                nn.Parameter(torch.empty_like(state_dict[prefix + f"prototypes.{t}"],
                                              device=device)) for t in range(tasks))
            self.last_layers = nn.ParameterList(
                nn.Parameter(torch.empty_like(state_dict[prefix + f"last_layers.{t}"],
                                              device=device)) for t in range(tasks))
            for t in range(tasks):
                proto_shape = tuple(self.prototypes[t].shape)
                if proto_shape[1:] != (self.dim, *self.patch):
                    raise ValueError(f"{where}: prototypes.{t} is {proto_shape}, expected "
                                     f"(M_t, {self.dim}, {self.patch[0]}, {self.patch[1]})")
        resize_buffers_for_load(self, state_dict, prefix,
                                {"task_bias": (), "prototype_class": ()}, where)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, patch={self.patch}, metric={self.metric!r}, "
                f"tasks={self.num_tasks}, classes={self.num_classes}, "
                f"prototypes={self.num_prototypes}")


def tuple_or(value: object) -> object:
    """Lists (as a saved tuple may come back) compared as tuples."""
    return tuple(value) if isinstance(value, (list, tuple)) else value
