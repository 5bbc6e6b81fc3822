"""A growing nearest-prototype head: NCM / SimpleCIL / iCaRL-NME, with TEEN calibration."""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from protokern.heads.growth import (
    apply_keeping_dtypes,
    check_count,
    check_features,
    check_features_labels,
    resize_buffers_for_load,
    shape_of,
)
from protokern.heads.kmeans import kmeans
from protokern.ops import check_metric, min_distance, nearest_prototypes


def _first_occurrences(values: Tensor) -> Tensor:
    """``(N, n)`` bool: whether each entry is the first of its value in its row."""
    earlier = values[:, :, None] == values[:, None, :]  # (N, n, n), small: n = topk * K
    return ~torch.tril(earlier, diagonal=-1).any(-1)


class PrototypeHead(nn.Module):
    """Classify features by their similarity to per-class prototypes; grows as classes arrive.

    With one prototype per class it is the nearest-class-mean classifier of SimpleCIL
    (``metric="cosine"``) or iCaRL's NME (``metric="sqeuclidean"``) on frozen features: the
    class means are exact, kept as float64 running sums and counts, so any split of the data
    into `update` calls gives the same means (up to float64 rounding).

    With ``protos_per_class = K > 1`` each class is represented by K prototypes, the k-means
    centers of its samples (assignment step: `protokern.min_distance`), and its logit is the
    maximum similarity over them. k-means needs the samples, so the head then also keeps every
    sample it was given (``memory_features``, float32), and recomputes a class's centers the
    next time they are needed after it received new samples.

    Casting the module (``.float()``, ``.half()``, ``.to(dtype)``, also as part of a model)
    leaves the float64 statistics and the sample memory in their dtypes, exactly; they move
    with ``.to(device)``.

    Logits ``(N, C)``: ``scale * (1 - cosine distance)`` (cosine) or
    ``-scale * squared distance`` (sqeuclidean), reduced by max over a class's prototypes;
    classes that have no sample yet get ``-inf``.

    Args:
        dim: D, the feature dimension.
        num_classes: classes the head starts with (more come with `add_classes`).
        metric: ``"cosine"`` or ``"sqeuclidean"``.
        protos_per_class: K.
        scale: multiplies the similarity (a softmax temperature for training with the logits).
        kmeans_iterations: at most this many Lloyd rounds per class (K > 1).
        seed: seeds k-means++ (K > 1).
    """

    def __init__(self, dim: int, num_classes: int = 0, metric: str = "cosine",
                 protos_per_class: int = 1, scale: float = 1.0, kmeans_iterations: int = 25,
                 seed: int = 0, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        where = "PrototypeHead"
        self.dim = check_count(dim, "dim", where, low=1)
        check_count(num_classes, "num_classes", where)
        check_metric(metric, where)
        self.metric = metric
        self.protos_per_class = check_count(protos_per_class, "protos_per_class", where, low=1)
        if not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"{where}: scale must be a positive number, got {scale!r}")
        self.scale = float(scale)
        self.kmeans_iterations = check_count(kmeans_iterations, "kmeans_iterations", where, 1)
        self.seed = seed
        f64, i64 = torch.float64, torch.int64
        self.register_buffer("class_sums", torch.zeros(num_classes, dim, dtype=f64,
                                                       device=device))
        self.register_buffer("class_counts", torch.zeros(num_classes, dtype=i64, device=device))
        # which add_classes call created each class: session 0 are the base classes for TEEN
        self.register_buffer("class_session", torch.zeros(num_classes, dtype=i64, device=device))
        self.register_buffer("teen_prototypes", torch.zeros(num_classes, dim, dtype=f64,
                                                            device=device))
        self.register_buffer("teen_calibrated", torch.zeros(num_classes, dtype=torch.bool,
                                                            device=device))
        self.register_buffer("memory_features", torch.zeros(0, dim, device=device))
        self.register_buffer("memory_labels", torch.zeros(0, dtype=i64, device=device))
        self._centers: dict[int, Tensor] = {}  # class -> (K', D) k-means centers (K > 1)
        self._forward_prototypes: dict[tuple, Tensor] = {}  # (dtype, device) -> padded bank

    # the exact statistics (float64) and the sample memory k-means reads keep their dtype
    # when the module is cast; they only move with it
    _KEEP_DTYPE = ("class_sums", "teen_prototypes", "memory_features")

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "PrototypeHead":
        """`nn.Module._apply` (behind `.to`, `.float`, `.cuda`, ...), keeping the dtype of
        the statistics buffers and dropping the caches computed on the old device/dtype."""
        apply_keeping_dtypes(self, fn, recurse, self._KEEP_DTYPE)
        self._centers.clear()
        self._forward_prototypes.clear()
        return self

    # ------------------------------------------------------------------------------------------
    # Growth and statistics

    @property
    def num_classes(self) -> int:
        return self.class_counts.shape[0]

    @property
    def num_sessions(self) -> int:
        """Number of class sessions so far (the initial classes, then each `add_classes`)."""
        return int(self.class_session.max()) + 1 if self.num_classes else 0

    def add_classes(self, n: int) -> range:
        """Append ``n`` classes (a new session) and return their indices; old classes, their
        statistics and their logits are untouched."""
        check_count(n, "n", "PrototypeHead.add_classes")
        session = self.num_sessions
        old = self.num_classes

        def grow(t: Tensor, fill: int | float | bool = 0) -> Tensor:
            return torch.cat([t, t.new_full((n, *t.shape[1:]), fill)])

        self.class_sums = grow(self.class_sums)
        self.class_counts = grow(self.class_counts)
        self.class_session = grow(self.class_session, session)
        self.teen_prototypes = grow(self.teen_prototypes)
        self.teen_calibrated = grow(self.teen_calibrated, False)
        self._forward_prototypes.clear()
        return range(old, old + n)

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add samples to the running statistics of their classes.

        Args:
            features: ``(N, D)`` float, any device the head is on (detached: statistics are
                not learned by gradient).
            labels: ``(N,)`` integer class indices in ``[0, num_classes)``.

        Sums accumulate in float64, so many small calls equal one big call up to float64
        rounding. A class that receives samples loses its TEEN calibration (calibrate again).
        """
        check_features_labels(features, labels, self.dim, self.num_classes,
                              "PrototypeHead.update")
        labels = labels.to(self.class_counts.device, torch.int64)
        features = features.detach().to(self.class_sums.device)
        self.class_sums.index_add_(0, labels, features.double())
        self.class_counts += torch.bincount(labels, minlength=self.num_classes)
        touched = labels.unique()
        self.teen_calibrated[touched] = False
        if self.protos_per_class > 1:
            self.memory_features = torch.cat([self.memory_features,
                                              features.to(self.memory_features.dtype)])
            self.memory_labels = torch.cat([self.memory_labels, labels])
            for c in touched.tolist():
                self._centers.pop(c, None)
        self._forward_prototypes.clear()

    def class_means(self) -> Tensor:
        """``(C, D)`` float64 means (zeros for classes without samples)."""
        return self.class_sums / self.class_counts.clamp_min(1)[:, None]

    def seen(self) -> Tensor:
        """``(C,)`` bool: classes that have at least one sample."""
        return self.class_counts > 0

    def prototypes(self) -> tuple[Tensor, Tensor]:
        """The prototype bank: ``(C, K, D)`` float64 and which entries are real, ``(C, K)``
        bool (a class with fewer than K samples has fewer prototypes; an unseen class none).

        K = 1: the class means, or their TEEN calibration where `calibrate_teen` set one.
        """
        num, k = self.num_classes, self.protos_per_class
        bank = self.class_sums.new_zeros(num, k, self.dim)
        valid = torch.zeros(num, k, dtype=torch.bool, device=bank.device)
        if k == 1:
            bank[:, 0] = torch.where(self.teen_calibrated[:, None], self.teen_prototypes,
                                     self.class_means())
            valid[:, 0] = self.seen()
            return bank, valid
        for c in self.seen().nonzero().flatten().tolist():
            if c not in self._centers:
                points = self.memory_features[self.memory_labels == c]
                try:
                    self._centers[c] = kmeans(points, k, self.metric, self.kmeans_iterations,
                                              seed=self.seed + c).centers
                except ValueError as error:  # e.g. NaN samples: say which class
                    raise ValueError(f"PrototypeHead: the k-means prototypes of class {c} "
                                     f"(protos_per_class={k}): {error}") from error
            centers = self._centers[c]
            bank[c, :len(centers)] = centers.double()
            valid[c, :len(centers)] = True
        return bank, valid

    # ------------------------------------------------------------------------------------------
    # Inference

    def _bank_for(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The prototype bank in the queries' dtype, padded so every class has K rows (a class
        with fewer repeats its first prototype, which leaves its maximum unchanged); cached
        until the statistics change."""
        key = (dtype, device)
        if key not in self._forward_prototypes:
            bank, valid = self.prototypes()
            first = bank[:, :1].expand_as(bank)
            bank = torch.where(valid[..., None], bank, first)
            self._forward_prototypes[key] = bank.to(device=device, dtype=dtype).contiguous()
        return self._forward_prototypes[key]

    def distances(self, features: Tensor) -> Tensor:
        """``(N, C)``: distance from each feature to its nearest prototype of each class
        (unseen classes: a meaningless value, masked by `forward`)."""
        check_features(features, self.dim, "PrototypeHead.forward")
        num = features.shape[0]
        if self.num_classes == 0 or num == 0:
            return features.new_zeros(num, self.num_classes)
        bank = self._bank_for(features.dtype, features.device)
        if self.protos_per_class == 1:
            # queries as (N, 1, D) tokens against C prototypes: one fused op, (N, C) out
            return min_distance(features[:, None, :], bank[:, 0], self.metric).values
        # K prototypes of a class as the K "positions" of a (C, K, D) token batch, queries as
        # the op's prototypes: its min over positions is the max-similarity reduction over a
        # class's prototypes, fused, giving (C, N) without a (N, C, K) intermediate.
        return min_distance(bank, features, self.metric).values.T.contiguous()

    def forward(self, features: Tensor) -> Tensor:
        """``(N, D)`` features -> ``(N, C)`` logits (``-inf`` for classes without samples).

        Differentiable with respect to ``features`` (the prototypes are statistics).
        """
        d = self.distances(features)
        logits = self.scale * (1 - d) if self.metric == "cosine" else -self.scale * d
        return logits.masked_fill(~self.seen().to(logits.device), float("-inf"))

    @torch.no_grad()
    def predict(self, features: Tensor, topk: int = 1) -> Tensor:
        """``(N, topk)`` int64 class indices, best first (ties: the lowest class).

        By `protokern.nearest_prototypes` over the seen classes' prototypes: no ``(N, C)``
        matrix. A class's distance is its nearest prototype's, so the ``topk * K`` nearest
        prototypes (K per class) hold the ``topk`` nearest classes."""
        seen_mask = self.seen()
        seen = int(seen_mask.sum())
        if not isinstance(topk, int) or not 1 <= topk <= max(seen, 1) or seen == 0:
            raise ValueError(f"PrototypeHead.predict: topk must be an int in [1, {seen}] (the "
                             f"classes with samples), got {topk!r}")
        check_features(features, self.dim, "PrototypeHead.predict")
        classes = seen_mask.nonzero().flatten().to(features.device)
        bank = self._bank_for(features.dtype, features.device)[classes]  # (S, K, D)
        per_class = bank.shape[1]
        _, nearest = nearest_prototypes(features, bank.reshape(-1, bank.shape[-1]),
                                        topk * per_class, self.metric)
        owners = classes[nearest // per_class]  # (N, topk * K), classes in order of distance
        if per_class == 1:
            return owners
        # each row's first topk distinct classes, in order (there are at least topk)
        first = _first_occurrences(owners)
        keep = first & (first.cumsum(1) <= topk)
        return owners[keep].view(-1, topk)

    # ------------------------------------------------------------------------------------------
    # TEEN

    @torch.no_grad()
    def calibrate_teen(self, alpha: float, temperature: float,
                       base_classes: Sequence[int] | Tensor | None = None,
                       new_classes: Sequence[int] | Tensor | None = None) -> Tensor:
        """Training-free calibration of new-class prototypes toward similar base prototypes
        (TEEN, Wang et al., "Few-Shot Class-Incremental Learning via Training-Free Prototype
        Calibration", NeurIPS 2023).

        For every new class ``c`` with mean ``p_c`` and the base classes ``b`` with means
        ``p_b`` (``metric="cosine"``, as in the authors' code, all means L2-normalised first,
        written ``p̄``)::

            w_cb = softmax_b( cos(p_c, p_b) / temperature )
            Δ_c  = normalize( Σ_b w_cb p̄_b )
            p̂_c  = (1 - alpha) p̄_c + alpha Δ_c

        (the paper's code writes the temperature as a multiplier, ``softmax_t = 1 /
        temperature``, e.g. 16). With ``metric="sqeuclidean"`` the similarity is the negative
        squared distance and nothing is normalised:
        ``w_cb = softmax_b(-|p_c - p_b|² / temperature)``,
        ``p̂_c = (1 - alpha) p_c + alpha Σ_b w_cb p_b``.

        Args:
            alpha: weight of the base-prototype shift, in [0, 1].
            temperature: softmax temperature, > 0.
            base_classes: defaults to the classes of the first session that have samples.
            new_classes: defaults to the classes of later sessions that have samples.

        Returns:
            The calibrated prototypes ``(len(new_classes), D)`` float64; they replace those
            classes' means in `forward` until the class receives new samples.
        """
        where = "PrototypeHead.calibrate_teen"
        if self.protos_per_class != 1:
            raise ValueError(f"{where}: TEEN calibrates one prototype per class; this head has "
                             f"protos_per_class={self.protos_per_class}")
        if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"{where}: alpha must be a number in [0, 1], got {alpha!r}")
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"{where}: temperature must be a positive number, got "
                             f"{temperature!r}")
        seen = self.seen()
        base = self._class_list(base_classes, seen & (self.class_session == 0), "base_classes")
        new = self._class_list(new_classes, seen & (self.class_session > 0), "new_classes")
        if len(base) == 0:
            raise ValueError(f"{where}: no base class with samples to calibrate toward")
        for name, chosen in (("base_classes", base), ("new_classes", new)):
            if not seen[chosen].all():
                raise ValueError(f"{where}: {name} {chosen.tolist()} include classes without "
                                 f"samples")
        means = self.class_means()
        base_p, new_p = means[base], means[new]
        if self.metric == "cosine":
            base_p = torch.nn.functional.normalize(base_p, dim=1)
            new_p = torch.nn.functional.normalize(new_p, dim=1)
            similarity = new_p @ base_p.T
        else:
            similarity = -torch.cdist(new_p, base_p).square()
        weights = torch.softmax(similarity / temperature, dim=1)
        shift = weights @ base_p
        if self.metric == "cosine":
            shift = torch.nn.functional.normalize(shift, dim=1)
        calibrated = (1 - alpha) * new_p + alpha * shift
        self.teen_prototypes[new] = calibrated
        self.teen_calibrated[new] = True
        self._forward_prototypes.clear()
        return calibrated

    def _class_list(self, classes: Sequence[int] | Tensor | None, default: Tensor,
                    name: str) -> Tensor:
        if classes is None:
            return default.nonzero().flatten()
        chosen = torch.as_tensor(classes, dtype=torch.int64, device=default.device).flatten()
        if chosen.numel() and (chosen.min() < 0 or chosen.max() >= self.num_classes):
            raise ValueError(f"PrototypeHead.calibrate_teen: {name} must lie in "
                             f"[0, {self.num_classes}), got {chosen.tolist()}")
        return chosen

    # ------------------------------------------------------------------------------------------
    # Saving and loading across growth

    def get_extra_state(self) -> dict:
        return {"dim": self.dim, "metric": self.metric,
                "protos_per_class": self.protos_per_class, "scale": self.scale,
                "kmeans_iterations": self.kmeans_iterations, "seed": self.seed}

    def set_extra_state(self, state: dict) -> None:
        # the k-means settings too: centers are recomputed after loading and must not change
        self.scale = state["scale"]
        self.kmeans_iterations, self.seed = state["kmeans_iterations"], state["seed"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            for name in ("dim", "metric", "protos_per_class"):
                if extra[name] != getattr(self, name):
                    raise ValueError(f"PrototypeHead.load_state_dict: the saved head has "
                                     f"{name}={extra[name]!r}, this one {getattr(self, name)!r}")
        counts = state_dict.get(prefix + "class_counts")
        sums = state_dict.get(prefix + "class_sums")
        if counts is not None and sums is not None and sums.shape[0] != counts.shape[0]:
            raise ValueError(f"PrototypeHead.load_state_dict: class_sums {shape_of(sums)} and "
                             f"class_counts {shape_of(counts)} disagree on the class count")
        per_class = {"class_sums": (self.dim,), "class_counts": (), "class_session": (),
                     "teen_prototypes": (self.dim,), "teen_calibrated": (),
                     "memory_features": (self.dim,), "memory_labels": ()}
        resize_buffers_for_load(self, state_dict, prefix, per_class,
                                "PrototypeHead.load_state_dict")
        self._centers.clear()
        self._forward_prototypes.clear()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_classes={self.num_classes}, metric={self.metric!r}, "
                f"protos_per_class={self.protos_per_class}, scale={self.scale}")
