"""`protokern cil` end to end: a small feature file (.pt and .npz) and tiny planted-parts."""

import json

import numpy as np
import pytest
import torch

from protokern.cli import main
from protokern.heads import HEADS


def separable_features(num_classes=6, per_class=12, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = 10 * torch.randn(num_classes, dim, generator=gen)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centers[labels] + 0.3 * torch.randn(len(labels), dim, generator=gen)
    return features, labels * 3 + 1  # labels need not be 0..C-1


def test_pt_file_every_head(tmp_path, capsys):
    features, labels = separable_features()
    path = tmp_path / "features.pt"
    torch.save({"features": features, "labels": labels}, path)
    out = tmp_path / "result.json"
    rc = main(["cil", "--data", str(path), "--tasks", "3", "--no-progress", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "6 classes in 3 tasks (2, 2, 2 classes)" in printed
    for name in HEADS:
        assert name in printed
    result = strict_json(out.read_text())
    assert set(result["heads"]) == set(HEADS) and result["tasks"] == [[0, 2], [2, 4], [4, 6]]
    # clusters 10 sigma apart: the mean-based heads make no mistake
    for name in ("ncm-cosine", "nme-sqeuclidean", "fecam-shared", "fecam-class"):
        metrics = result["heads"][name]["metrics"]
        assert metrics["last_accuracy"] == 1.0 and metrics["forgetting"] == 0.0, name
        matrix = result["heads"][name]["accuracy_matrix"]
        # the upper triangle is undefined (task not seen yet): null, not the invalid NaN
        assert len(matrix) == 3 and matrix[0][1:] == [None, None] and matrix[1][2] is None
        assert all(isinstance(matrix[i][j], float) for i in range(3) for j in range(i + 1))


def strict_json(text):
    """Parse as standard JSON: NaN / Infinity (which json.loads accepts by default) raise."""
    def refuse(constant):
        raise ValueError(f"invalid JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def test_json_single_task_writes_null_for_undefined_metrics(tmp_path):
    features, labels = separable_features(3, 6, 4)
    path, out = tmp_path / "features.pt", tmp_path / "result.json"
    torch.save({"features": features, "labels": labels}, path)
    assert main(["cil", "--data", str(path), "--tasks", "1", "--heads", "ncm-cosine",
                 "--no-progress", "--json", str(out)]) == 0
    text = out.read_text()
    assert "NaN" not in text
    metrics = strict_json(text)["heads"]["ncm-cosine"]["metrics"]
    # forgetting and old-task accuracy are undefined with one task
    assert metrics["forgetting"] is None and metrics["old_accuracy"] is None
    assert metrics["harmonic_mean"] is None and metrics["last_accuracy"] == 1.0


def test_npz_file_with_test_split_and_pair_pt(tmp_path, capsys):
    train_x, train_y = separable_features(4, 10, 5, seed=1)
    test_x, test_y = separable_features(4, 10, 5, seed=1)  # same centers, same draws
    path = tmp_path / "features.npz"
    np.savez(path, features=train_x.numpy(), labels=train_y.numpy(),
             test_features=test_x.numpy(), test_labels=test_y.numpy())
    assert main(["cil", "--data", str(path), "--tasks", "2", "--heads", "ncm-cosine,teen",
                 "--no-progress", "--shuffle-classes"]) == 0
    printed = capsys.readouterr().out
    assert "40 train / 40 test samples" in printed and "teen" in printed
    pair = tmp_path / "pair.pt"
    torch.save((train_x, train_y), pair)
    assert main(["cil", "--data", str(pair), "--tasks", "4", "--heads", "nme-sqeuclidean",
                 "--no-progress"]) == 0


def test_planted_parts_tiny(capsys):
    rc = main(["cil", "--classes", "4", "--images-per-class", "6", "--test-images-per-class",
               "3", "--image-size", "32", "--tasks", "2", "--feature-width", "16",
               "--heads", "ncm-cosine,fecam-shared,part-kmeans", "--no-progress",
               "--pool", "mean", "--tukey", "0.5"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "4 classes in 2 tasks" in printed and "features 16x4x4" in printed
    assert "24 train / 12 test samples" in printed and "part-kmeans" in printed


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="unknown head"):
        main(["cil", "--heads", "nope", "--no-progress"])
    with pytest.raises(SystemExit, match="no such file"):
        main(["cil", "--data", str(tmp_path / "missing.pt"), "--no-progress"])
    bad = tmp_path / "bad.pt"
    torch.save({"x": torch.zeros(3)}, bad)
    with pytest.raises(SystemExit, match="must hold 'features' and 'labels'"):
        main(["cil", "--data", str(bad), "--no-progress"])
    features, labels = separable_features(3, 4, 2)
    good = tmp_path / "good.pt"
    torch.save({"features": features, "labels": labels}, good)
    with pytest.raises(SystemExit, match="--tasks"):
        main(["cil", "--data", str(good), "--tasks", "5", "--no-progress"])
    with pytest.raises(SystemExit, match="--tukey needs non-negative features"):
        main(["cil", "--data", str(good), "--tasks", "2", "--tukey", "0.5", "--no-progress"])
