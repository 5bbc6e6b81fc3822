"""`protokern train` on an image folder, resumed, then `protokern explain` on its checkpoint, end
to end with tiny settings: they write what they say (checkpoints, logs, a non-empty PNG)."""

import json

import numpy as np
from PIL import Image

from protokern import cli
from protokern.data import PlantedParts


def _write_image_folder(root, data: PlantedParts) -> None:
    for i in range(len(data)):
        folder = root / f"class_{int(data.labels[i])}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (data.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def test_train_on_an_image_folder_resume_then_explain(tmp_path, capsys):
    data = tmp_path / "data"
    _write_image_folder(data / "train", PlantedParts(2, 6, 32, seed=0, split="train",
                                                     motif_size=8))
    _write_image_folder(data / "test", PlantedParts(2, 3, 32, seed=0, split="test",
                                                    motif_size=8))
    out = tmp_path / "run"
    common = ["train", "--data", str(data), "--output", str(out), "--image-size", "32",
              "--prototypes-per-class", "2", "--prototype-dim", "16", "--warm-epochs", "1",
              "--push-start", "2", "--last-layer-iterations", "1", "--batch-size", "4",
              "--no-progress"]
    assert cli.main([*common, "--epochs", "1"]) == 0
    assert cli.main([*common, "--epochs", "2", "--resume"]) == 0  # continues at epoch 1
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    capsys.readouterr()

    image = next((data / "test" / "class_1").glob("*.png"))
    explained = tmp_path / "explained"
    assert cli.main(["explain", "--checkpoint", str(out / "checkpoint.pt"), str(image),
                     "--output", str(explained), "--top-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert "class_" in printed and printed.count("prototype ") >= 2
    png = explained / f"{image.stem}.png"
    assert png.stat().st_size > 1000
