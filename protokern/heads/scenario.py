"""A class-incremental scenario: classes split into tasks, heads learn them one after another.

After each task every head is evaluated on the test samples of all tasks so far (predicting
over every class seen so far), which fills the accuracy matrix of `protokern.heads.metrics`.
The heads here learn without gradients (statistics of frozen features), as NCM, SimpleCIL,
TEEN, FeCAM and a k-means-initialised part-prototype head do.
"""

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from protokern.heads.fecam_head import FeCAMHead
from protokern.heads.part_prototype_head import PartPrototypeHead
from protokern.heads.prototype_head import PrototypeHead


class Learner(Protocol):
    """What `run_scenario` drives: learn a task's classes, then predict over all seen."""

    def learn(self, classes: range, features: Tensor, labels: Tensor) -> None: ...

    def predict(self, features: Tensor) -> Tensor: ...


POOLS = ("max", "mean")


def pooled(features: Tensor, pool: str = "max") -> Tensor:
    """``(N, D)`` vectors stay; ``(N, D, H, W)`` maps are reduced over positions by ``pool``
    (``"max"`` or ``"mean"``; max keeps a small part's response from being averaged away)."""
    if pool not in POOLS:
        raise ValueError(f"pooled: pool must be one of {POOLS}, got {pool!r}")
    if features.dim() != 4:
        return features
    return features.amax((2, 3)) if pool == "max" else features.mean((2, 3))


def _batched_predict(predict_batch: Callable[[Tensor], Tensor], features: Tensor,
                     batch_size: int) -> Tensor:
    parts = [predict_batch(features[i:i + batch_size])
             for i in range(0, features.shape[0], batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


class PrototypeLearner:
    """`PrototypeHead` on pooled features; with ``teen=(alpha, temperature)`` it calibrates the
    classes of every task after the first (TEEN)."""

    def __init__(self, dim: int, metric: str = "cosine", protos_per_class: int = 1,
                 teen: tuple[float, float] | None = None, pool: str = "max",
                 batch_size: int = 1024) -> None:
        self.head = PrototypeHead(dim, metric=metric, protos_per_class=protos_per_class)
        self.teen, self.pool, self.batch_size = teen, pool, batch_size

    def learn(self, classes: range, features: Tensor, labels: Tensor) -> None:
        self.head.add_classes(len(classes))
        features = pooled(features, self.pool)
        for i in range(0, features.shape[0], self.batch_size):
            self.head.update(features[i:i + self.batch_size], labels[i:i + self.batch_size])
        if self.teen is not None and self.head.num_sessions > 1:
            self.head.calibrate_teen(*self.teen, new_classes=list(classes))

    def predict(self, features: Tensor) -> Tensor:
        return _batched_predict(lambda f: self.head.predict(f)[:, 0],
                                pooled(features, self.pool), self.batch_size)


class FeCAMLearner:
    """`FeCAMHead` on pooled features."""

    def __init__(self, dim: int, covariance: str = "shared", pool: str = "max",
                 batch_size: int = 1024) -> None:
        self.head = FeCAMHead(dim, covariance=covariance)
        self.pool, self.batch_size = pool, batch_size

    def learn(self, classes: range, features: Tensor, labels: Tensor) -> None:
        self.head.add_classes(len(classes))
        self.head.update(pooled(features, self.pool), labels)

    def predict(self, features: Tensor) -> Tensor:
        return _batched_predict(lambda f: self.head.predict(f)[:, 0],
                                pooled(features, self.pool), self.batch_size)


class PartLearner:
    """`PartPrototypeHead` whose prototypes are the k-means centers of each class's feature-map
    cells (ICICLE-style growth, no training): classifies by the last layer's initial
    ProtoPNet connections. Vectors are treated as 1x1 maps."""

    def __init__(self, dim: int, protos_per_class: int = 3, metric: str = "cosine",
                 batch_size: int = 256) -> None:
        self.head = PartPrototypeHead(dim, patch=1, metric=metric)
        self.protos_per_class, self.batch_size = protos_per_class, batch_size

    @staticmethod
    def _maps(features: Tensor) -> Tensor:
        return features[:, :, None, None] if features.dim() == 2 else features

    def learn(self, classes: range, features: Tensor, labels: Tensor) -> None:
        self.head.add_task(len(classes), self.protos_per_class, "kmeans",
                           self._maps(features), labels)

    @torch.no_grad()
    def predict(self, features: Tensor) -> Tensor:
        return _batched_predict(lambda f: self.head(f).logits.argmax(1), self._maps(features),
                                self.batch_size)


HEADS: dict[str, tuple[str, Callable[[int, str], Learner]]] = {
    "ncm-cosine": ("PrototypeHead, cosine, 1 prototype/class (SimpleCIL)",
                   lambda d, pool: PrototypeLearner(d, "cosine", pool=pool)),
    "nme-sqeuclidean": ("PrototypeHead, sqeuclidean, 1 prototype/class (iCaRL-NME)",
                        lambda d, pool: PrototypeLearner(d, "sqeuclidean", pool=pool)),
    "ncm-k4": ("PrototypeHead, cosine, 4 k-means prototypes/class, max similarity",
               lambda d, pool: PrototypeLearner(d, "cosine", protos_per_class=4, pool=pool)),
    "teen": ("PrototypeHead, cosine, TEEN calibration (alpha 0.5, temperature 1/16)",
             lambda d, pool: PrototypeLearner(d, "cosine", teen=(0.5, 1 / 16), pool=pool)),
    "fecam-shared": ("FeCAMHead, shared shrunk covariance (whitening + fused op)",
                     lambda d, pool: FeCAMLearner(d, "shared", pool=pool)),
    "fecam-class": ("FeCAMHead, per-class shrunk covariances",
                    lambda d, pool: FeCAMLearner(d, "per_class", pool=pool)),
    "part-kmeans": ("PartPrototypeHead, 3 k-means part prototypes/class, untrained",
                    lambda d, pool: PartLearner(d)),  # uses the maps, never pooled
}
"""Heads `protokern cil` can run: name -> (description, factory taking the feature dim and
the pooling of feature maps for vector heads)."""


def split_into_tasks(num_classes: int, num_tasks: int) -> list[range]:
    """Classes ``0..num_classes-1`` in ``num_tasks`` consecutive groups, sizes differing by at
    most one (the first tasks get the extra classes)."""
    if not isinstance(num_tasks, int) or not 1 <= num_tasks <= num_classes:
        raise ValueError(f"split_into_tasks: num_tasks must be an int in [1, {num_classes}] "
                         f"(num_classes), got {num_tasks!r}")
    base, extra = divmod(num_classes, num_tasks)
    tasks, start = [], 0
    for t in range(num_tasks):
        size = base + (t < extra)
        tasks.append(range(start, start + size))
        start += size
    return tasks


def run_scenario(learner: Learner, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                 tasks: list[range], progress: bool = True, name: str = "") -> tuple[Tensor,
                                                                                      Tensor]:
    """Teach ``learner`` the tasks in order; after each, test on every task so far.

    Args:
        learner: a `Learner`.
        train, test: ``(features (N, D) or (N, D, H, W), labels (N,) int64)``; labels are
            already the task-ordered class indices (task t's classes are ``tasks[t]``).
        tasks: consecutive class ranges covering ``0..C-1``.

    Returns:
        ``(accuracy_matrix (T, T) float64 with NaN above the diagonal, task_sizes (T,) int64
        test samples per task)``.
    """
    (train_x, train_y), (test_x, test_y) = train, test
    count = len(tasks)
    task_of_class = torch.empty(tasks[-1].stop, dtype=torch.int64)
    for t, classes in enumerate(tasks):
        task_of_class[classes.start:classes.stop] = t
    test_task = task_of_class[test_y]
    sizes = torch.bincount(test_task, minlength=count)
    if (sizes == 0).any():
        raise ValueError(f"run_scenario: tasks {(sizes == 0).nonzero().flatten().tolist()} have "
                         f"no test samples")
    accuracy = torch.full((count, count), float("nan"), dtype=torch.float64)
    for t in tqdm(range(count), desc=name or "tasks", disable=not progress, leave=False):
        chosen = task_of_class[train_y] == t
        learner.learn(tasks[t], train_x[chosen], train_y[chosen])
        seen = test_task <= t
        correct = learner.predict(test_x[seen]) == test_y[seen]
        for j in range(t + 1):
            accuracy[t, j] = correct[test_task[seen] == j].double().mean()
    return accuracy, sizes
