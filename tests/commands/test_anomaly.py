"""`protokern anomaly` end to end at a small size (its AUROCs, heatmaps, summary, and
anomalib's formulation selecting the same bank), and its AUROC against the pairwise
definition."""

import json

import pytest
import torch

from protokern import cli
from protokern.commands.anomaly import auroc, cdist_k_center, cdist_scores, patch_features
from protokern.nn import PatchMemoryBank

SMALL = ["--train-images", "12", "--test-images", "12", "--image-size", "32",
         "--coreset-ratio", "0.05", "--heatmaps", "2", "--no-progress"]


def pairwise_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of (positive, negative) pairs the positive wins, ties counting one half."""
    positives, negatives = scores[labels.bool()], scores[~labels.bool()]
    wins = (positives[:, None] > negatives).double() + 0.5 * (positives[:, None] == negatives)
    return float(wins.mean())


@pytest.mark.parametrize("seed", range(4))
def test_auroc_is_the_pairwise_definition(seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.rand(200, generator=generator) < 0.3
    scores = torch.randint(0, 25, (200,), generator=generator).float()  # many ties
    scores = scores + labels * (seed - 1.5)
    assert auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)


def test_auroc_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        auroc(torch.rand(5), torch.zeros(5))
    with pytest.raises(ValueError, match=r"\(5,\) and labels \(4,\)"):
        auroc(torch.rand(5), torch.ones(4))


def test_cdist_formulation_is_the_same_detector():
    torch.manual_seed(0)
    features = patch_features(torch.rand(3, 3, 16, 16)).double()
    points = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    memory = PatchMemoryBank(features.shape[1], coreset_ratio=0.1, num_neighbors=3, seed=5)
    memory.fit(features)
    start = int(torch.randint(len(points), (), generator=torch.Generator().manual_seed(5)))
    bank = points[cdist_k_center(points, int(memory.bank_size), start)]
    assert torch.equal(bank, memory.bank)
    test = patch_features(torch.rand(2, 3, 16, 16)).double()
    for got, expected in zip(memory.score(test), cdist_scores(bank, test, 3), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_anomaly_end_to_end(tmp_path, capsys):
    out = tmp_path / "anomaly"
    assert cli.main(["anomaly", "--output", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    for line in ("image AUROC:", "pixel AUROC:", "anomalib's cdist formulation:",
                 "heatmaps: 2 PNGs"):
        assert line in printed
    summary = json.loads((out / "summary.json").read_text())
    # a detector that works even at this size: far better than chance on both
    assert summary["image_auroc"] > 0.8 and summary["pixel_auroc"] > 0.8
    assert summary["bank_size"] == int(12 * 16 * 16 * 0.05)
    assert summary["cdist"]["image_scores_max_abs_difference"] < 1e-3
    pngs = sorted((out / "heatmaps").glob("*.png"))
    assert [p.name for p in pngs] == ["test_0000_defect.png", "test_0006_normal.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    again = tmp_path / "again"
    assert cli.main(["anomaly", "--output", str(again), "--no-compare", *SMALL]) == 0
    repeated = json.loads((again / "summary.json").read_text())
    assert (repeated["image_auroc"], repeated["pixel_auroc"]) == (summary["image_auroc"],
                                                                  summary["pixel_auroc"])
