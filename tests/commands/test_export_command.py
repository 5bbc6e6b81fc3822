"""`protokern export` on a ProtoPNet checkpoint: it writes an ONNX file that onnxruntime runs at
any batch size, prints its size and the difference from eager, and names ``--checkpoint`` when
the file is missing or no checkpoint."""

import re

import pytest
import torch

from protokern import cli
from protokern.deploy import ONNX_PACKAGES, run_onnx
from protokern.models.checkpoint import save_checkpoint
from protokern.models.protopnet import build_protopnet

for _name in ONNX_PACKAGES:
    pytest.importorskip(_name, reason=f"{_name} (protokern's onnx extra) is not installed")

CONFIG = {"num_classes": 2, "image_size": 32, "prototypes_per_class": 2, "prototype_dim": 8}
"""The recipe `protokern train` stores, at a tiny size."""


def test_export_writes_a_file_that_matches_eager(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_protopnet(**CONFIG).eval()
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, model, CONFIG, epoch=3)
    out = tmp_path / "model.onnx"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(out),
                     "--batch-size", "5"]) == 0
    printed = capsys.readouterr().out
    assert f"({out.stat().st_size} bytes)" in printed
    differences = re.search(r"on 5 random images: max \|difference\| logits (\S+), min "
                            r"distances (\S+); indices equal at (\d+) of 20", printed)
    assert differences, printed
    assert float(differences[1]) <= 1e-5 and float(differences[2]) <= 1e-5
    assert int(differences[3]) == 20
    images = torch.rand(1, 3, 32, 32)  # yet another batch size
    logits, min_distances, indices = run_onnx(out, (images,))
    with torch.no_grad():
        eager = model(images)
    assert torch.allclose(logits, eager.logits, atol=1e-5)
    assert torch.allclose(min_distances, eager.min_distances, atol=1e-5)
    assert torch.equal(indices, eager.indices)


def test_a_missing_or_wrong_checkpoint_names_the_argument(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default --out would go
    with pytest.raises(SystemExit, match=r"--checkpoint .*: no checkpoint at"):
        cli.main(["export", "--checkpoint", str(tmp_path / "absent.pt")])
    not_one = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, not_one)  # a torch file, but no checkpoint
    with pytest.raises(SystemExit, match=r"--checkpoint .*not a protokern checkpoint"):
        cli.main(["export", "--checkpoint", str(not_one)])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(SystemExit, match=r"--checkpoint .*not a readable protokern checkpoint"):
        cli.main(["export", "--checkpoint", str(garbage)])
    assert not (tmp_path / "model.onnx").exists()  # refused before any export
