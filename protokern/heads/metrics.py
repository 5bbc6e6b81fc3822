"""Class-incremental metrics from the accuracy matrix.

The accuracy matrix ``A`` ``(T, T)``: ``A[i, j]`` is the accuracy on task ``j``'s test samples
after learning tasks ``0..i`` (class-incremental: predictions over every class seen so far);
entries with ``j > i`` are not defined (NaN).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class CILMetrics:
    """Summary of a class-incremental run (accuracies as fractions in [0, 1]).

    Attributes:
        step_accuracy: ``(T,)``: accuracy on all test samples of tasks ``0..i`` after task i.
        average_incremental_accuracy: mean of ``step_accuracy`` (Rebuffi et al., iCaRL).
        last_accuracy: ``step_accuracy[-1]``.
        forgetting: mean over tasks ``j < T-1`` of ``max_{j <= i < T-1} A[i, j] - A[T-1, j]``
            (Chaudhry et al. 2018); NaN when T = 1.
        old_accuracy: after the last task, accuracy on the test samples of tasks ``< T-1``;
            NaN when T = 1.
        new_accuracy: after the last task, accuracy on its own test samples, ``A[T-1, T-1]``.
        harmonic_mean: ``2 * old * new / (old + new)`` (0 when both are 0; NaN when T = 1).
    """

    step_accuracy: tuple[float, ...]
    average_incremental_accuracy: float
    last_accuracy: float
    forgetting: float
    old_accuracy: float
    new_accuracy: float
    harmonic_mean: float


def cil_metrics(accuracy_matrix: Tensor, task_sizes: Tensor | None = None) -> CILMetrics:
    """Metrics of an accuracy matrix.

    Args:
        accuracy_matrix: ``(T, T)``; only entries ``j <= i`` are read.
        task_sizes: ``(T,)`` test samples per task, to weight tasks when pooling them into
            one accuracy (step, old); default: equal weights.
    """
    a = torch.as_tensor(accuracy_matrix, dtype=torch.float64)
    if a.dim() != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"cil_metrics: accuracy_matrix must be (T, T) with T >= 1, got "
                         f"{tuple(a.shape)}")
    tasks = a.shape[0]
    if task_sizes is None:
        sizes = torch.ones(tasks, dtype=torch.float64)
    else:
        sizes = torch.as_tensor(task_sizes, dtype=torch.float64)
        if sizes.shape != (tasks,) or (sizes <= 0).any():
            raise ValueError(f"cil_metrics: task_sizes must be ({tasks},) positive counts, got "
                             f"{sizes.tolist()}")
    lower = torch.ones(tasks, tasks, dtype=torch.bool).tril()
    if torch.isnan(a[lower]).any():
        raise ValueError("cil_metrics: accuracy_matrix has NaN at or below the diagonal")

    def pooled(row: int, upto: int) -> float:  # tasks 0..upto-1 after task `row`
        w = sizes[:upto]
        return float((a[row, :upto] * w).sum() / w.sum())

    steps = tuple(pooled(i, i + 1) for i in range(tasks))
    last = tasks - 1
    if tasks == 1:
        forgetting = old = harmonic = math.nan
    else:
        best_before = torch.stack([a[j:last, j].max() for j in range(last)])
        forgetting = float((best_before - a[last, :last]).mean())
        old = pooled(last, last)
        new = float(a[last, last])
        harmonic = 0.0 if old + new == 0 else 2 * old * new / (old + new)
    return CILMetrics(
        step_accuracy=steps,
        average_incremental_accuracy=sum(steps) / tasks,
        last_accuracy=steps[-1],
        forgetting=forgetting,
        old_accuracy=old,
        new_accuracy=float(a[last, last]),
        harmonic_mean=harmonic,
    )
