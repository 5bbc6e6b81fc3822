"""`protokern demo` runs end to end with tiny settings, and writes what it says (its summary,
logs, non-empty PNG explanations)."""

import json

from protokern import cli

TINY_DEMO = ["--classes", "3", "--train-per-class", "8", "--test-per-class", "4",
             "--image-size", "32", "--epochs", "2",
             "--warm-epochs", "1", "--last-layer-iterations", "2", "--batch-size", "8",
             "--explanations", "2", "--no-progress"]


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--output", str(out), *TINY_DEMO]) == 0
    printed = capsys.readouterr().out
    for line in ("test accuracy:", "top prototype inside the planted motif:",
                 "prototype layer, forward + backward", "explanations: 2 PNGs"):
        assert line in printed
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["test_accuracy"] <= 1 and 0 <= summary["top_prototype_in_motif"] <= 1
    assert summary["prototype_layer_fused_ms"] > 0 and summary["prototype_layer_naive_ms"] > 0
    assert summary["fused_vs_naive_max_abs_difference"] < 1e-3
    pngs = sorted((out / "explanations").glob("*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 1000 for p in pngs)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and [r["stage"] for r in rows] == ["warm", "joint"]
    assert "pushed_test_accuracy" in rows[-1]
    assert (out / "log.csv").read_text().count("\n") == 3  # header + 2 epochs
