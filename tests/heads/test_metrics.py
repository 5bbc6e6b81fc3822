"""CIL metrics on hand-made accuracy matrices, expected values computed by hand."""

import math

import pytest
import torch

from protokern.heads import cil_metrics

NAN = float("nan")
A = torch.tensor([[0.9, NAN, NAN],
                  [0.7, 0.8, NAN],
                  [0.6, 0.5, 0.9]])


def test_equal_task_weights():
    m = cil_metrics(A)
    # steps: 0.9; (0.7 + 0.8) / 2 = 0.75; (0.6 + 0.5 + 0.9) / 3 = 0.6666667
    assert m.step_accuracy == pytest.approx((0.9, 0.75, 2 / 3))
    assert m.average_incremental_accuracy == pytest.approx((0.9 + 0.75 + 2 / 3) / 3)  # 0.7722
    assert m.last_accuracy == pytest.approx(2 / 3)
    # task 0: max(0.9, 0.7) - 0.6 = 0.3; task 1: 0.8 - 0.5 = 0.3
    assert m.forgetting == pytest.approx(0.3)
    assert m.old_accuracy == pytest.approx(0.55) and m.new_accuracy == pytest.approx(0.9)
    assert m.harmonic_mean == pytest.approx(2 * 0.55 * 0.9 / 1.45)  # 0.682759


def test_weighted_by_task_sizes():
    m = cil_metrics(A, task_sizes=torch.tensor([10, 20, 30]))
    # step 1: (7 + 16) / 30; step 2: (6 + 10 + 27) / 60; old: (6 + 10) / 30
    assert m.step_accuracy == pytest.approx((0.9, 23 / 30, 43 / 60))
    assert m.average_incremental_accuracy == pytest.approx((0.9 + 23 / 30 + 43 / 60) / 3)
    assert m.old_accuracy == pytest.approx(16 / 30)
    assert m.harmonic_mean == pytest.approx(2 * (16 / 30) * 0.9 / (16 / 30 + 0.9))
    assert m.forgetting == pytest.approx(0.3)  # per task, not weighted


def test_forgetting_uses_best_earlier_accuracy_not_first():
    # task 0 improves after task 1 (0.5 -> 0.8) then drops to 0.4: forgetting 0.8 - 0.4
    a = torch.tensor([[0.5, NAN, NAN], [0.8, 1.0, NAN], [0.4, 1.0, 0.7]])
    assert cil_metrics(a).forgetting == pytest.approx((0.4 + 0.0) / 2)


def test_single_task_and_zero_accuracies():
    m = cil_metrics(torch.tensor([[0.8]]))
    assert m.last_accuracy == pytest.approx(0.8) and m.new_accuracy == pytest.approx(0.8)
    assert math.isnan(m.forgetting) and math.isnan(m.old_accuracy)
    assert math.isnan(m.harmonic_mean)
    zero = cil_metrics(torch.tensor([[0.0, NAN], [0.0, 0.0]]))
    assert zero.harmonic_mean == 0.0


def test_errors():
    with pytest.raises(ValueError, match=r"\(T, T\)"):
        cil_metrics(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN at or below the diagonal"):
        cil_metrics(torch.tensor([[0.5, NAN], [NAN, 0.5]]))
    with pytest.raises(ValueError, match="task_sizes"):
        cil_metrics(A, task_sizes=torch.tensor([1, 2]))
