"""Faults: a training run killed (SIGKILL) mid-epoch and resumed ends with the weights of an
uninterrupted run, bit for bit; a crash while saving leaves the previous checkpoint; a
truncated, corrupted or foreign checkpoint gives a clear `CheckpointError`, never a raw pickle
or zip traceback."""

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from protokern.data import PlantedParts
from protokern.models.checkpoint import (
    CheckpointError,
    build_protopnet,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from protokern.models.training import TrainingConfig, train_protopnet

RECIPE = {"num_classes": 2, "image_size": 32, "prototypes_per_class": 2, "prototype_dim": 8}
# epochs 0 (warm), 1 (joint, then push and last layer), 2 (joint, push, last layer)
CONFIG = TrainingConfig(epochs=3, warm_epochs=1, push_start=2, push_every=1,
                        last_layer_iterations=2, batch_size=4, seed=3)
# training-set reads: epoch 0 trains on 8 images; epoch 1 trains (8), pushes (8), crops the
# 4 source patches (4) and computes the last layer's similarities (8): 36 reads by the end of
# epoch 1's checkpoint. The 42nd read is in epoch 2's second batch.
KILL_AT_READ = 42


class KilledAtRead(Dataset):
    """``data`` that kills its own process (SIGKILL: no cleanup, as a crash or an OOM kill)
    at the ``kill_at``-th item read."""

    def __init__(self, data: Dataset, kill_at: int) -> None:
        self.data, self.kill_at, self.reads = data, kill_at, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        self.reads += 1
        if self.reads == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.data[index]


def train_in_this_process(folder: str, resume: bool, kill_at: int) -> None:
    """The run each subprocess makes (one thread, as every run compared here)."""
    torch.set_num_threads(1)
    train: Dataset = PlantedParts(2, 4, 32, seed=0, split="train", motif_size=8)
    test = PlantedParts(2, 2, 32, seed=0, split="test", motif_size=8)
    if kill_at:
        train = KilledAtRead(train, kill_at)
    torch.manual_seed(CONFIG.seed)
    train_protopnet(build_protopnet(**RECIPE), train, test, CONFIG, folder, RECIPE,
                    resume=resume, progress=False)


def _run(folder: Path, resume: bool = False, kill_at: int = 0, status: int = 0) -> None:
    """`train_in_this_process` in a new Python process, which must exit with ``status``."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from test_training_faults import "
            "train_in_this_process as t; t(sys.argv[2], sys.argv[3] == 'resume', int(sys.argv[4]))")
    command = [sys.executable, "-c", code, str(Path(__file__).parent), str(folder),
               "resume" if resume else "new", str(kill_at)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == status, result.stderr[-3000:]


def test_run_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _run(whole)
    _run(killed, kill_at=KILL_AT_READ, status=-signal.SIGKILL)
    interrupted = read_checkpoint(killed / "checkpoint.pt", required=("epoch",))
    assert interrupted["epoch"] == 1 and interrupted["push"] is not None  # killed in epoch 2
    assert not (killed / "checkpoint.pt.tmp").exists()
    _run(killed, resume=True)

    expected = read_checkpoint(whole / "checkpoint.pt")
    resumed = read_checkpoint(killed / "checkpoint.pt")
    assert resumed["epoch"] == expected["epoch"] == 2
    for name, tensor in expected["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    for key in ("image_index", "position", "distance"):
        assert torch.equal(resumed["push"][key], expected["push"][key]), key
    without_time = [{k: v for k, v in row.items() if k != "seconds"}
                    for row in expected["history"]]
    assert [{k: v for k, v in row.items() if k != "seconds"}
            for row in resumed["history"]] == without_time
    rows = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1, 2]  # each epoch logged once


def _tiny_checkpoint(path: Path, epoch: int) -> dict:
    torch.manual_seed(epoch)
    model = build_protopnet(**RECIPE)
    save_checkpoint(path, model, RECIPE, epoch=epoch)
    return model.state_dict()


def test_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    weights = _tiny_checkpoint(path, epoch=0)

    def write_half_then_fail(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        _tiny_checkpoint(path, epoch=1)
    monkeypatch.undo()
    model, checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] == 0
    assert all(torch.equal(model.state_dict()[name], t) for name, t in weights.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary left


def _truncated(path: Path) -> None:
    _tiny_checkpoint(path, epoch=0)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _foreign_object(path: Path) -> None:
    torch.save({"model": {}, "model_config": {}, "args": argparse.Namespace(lr=1)}, path)


@pytest.mark.parametrize("corrupt, reason", [
    (_truncated, "not a readable protokern checkpoint"),
    (_random_bytes, "not a readable protokern checkpoint"),
    (_empty, "not a readable protokern checkpoint"),
    (_foreign_object, "Unsupported global"),  # an arbitrary object: refused, never built
])
def test_unreadable_checkpoint_is_a_clear_error(tmp_path, corrupt, reason):
    path = tmp_path / "checkpoint.pt"
    corrupt(path)
    with pytest.raises(CheckpointError, match=reason) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value) and isinstance(error.value, ValueError)
    train = PlantedParts(2, 2, 32, seed=0, motif_size=8)
    with pytest.raises(CheckpointError, match=reason):
        train_protopnet(build_protopnet(**RECIPE), train, train, CONFIG, tmp_path, RECIPE,
                        resume=True, progress=False)


def test_torch_file_that_is_not_a_checkpoint_names_what_is_missing(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"conv.weight": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="no 'model', 'model_config'"):
        load_checkpoint(path)
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a dict"):
        load_checkpoint(path)
    _tiny_checkpoint(path, epoch=0)  # a model checkpoint, but without the training state
    load_checkpoint(path)
    train = PlantedParts(2, 2, 32, seed=0, motif_size=8)
    with pytest.raises(CheckpointError, match="no 'optimizers', 'history', 'push', 'rng'"):
        train_protopnet(build_protopnet(**RECIPE), train, train, CONFIG, tmp_path, RECIPE,
                        resume=True, progress=False)
