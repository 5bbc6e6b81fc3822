"""A short run of ProtoPNet's schedule on planted-parts data learns, logs and resumes."""

import json

import torch

from protokern.data import PlantedParts
from protokern.models.checkpoint import load_checkpoint
from protokern.models.protopnet import build_protopnet
from protokern.models.training import TrainingConfig, evaluate, train_protopnet


def tiny_config(epochs: int) -> TrainingConfig:
    return TrainingConfig(epochs=epochs, warm_epochs=1, push_start=epochs,
                          last_layer_iterations=5, batch_size=10,
                          joint_lr={"features": 3e-3, "add_on_layers": 3e-3,
                                    "prototype_vectors": 3e-3}, joint_lr_step=100)


def test_short_training_learns_well_above_chance(tmp_path):
    train = PlantedParts(3, 30, 32, seed=0, split="train", motif_size=10)
    test = PlantedParts(3, 15, 32, seed=0, split="test", motif_size=10)
    model = build_protopnet(3, 32, prototypes_per_class=3, prototype_dim=32)
    result = train_protopnet(model, train, test, tiny_config(12), tmp_path, progress=False)
    accuracy = evaluate(model, test, progress=False)
    # "well above chance": at least twice chance (1/3) after 12 short epochs
    assert accuracy >= 2 / 3, f"test accuracy {accuracy:.2f} (chance 0.33)"
    assert result.history[-1]["test_accuracy_after_last_layer"] == accuracy
    assert result.push_record is not None


def test_resume_continues_from_the_checkpoint(tmp_path):
    train = PlantedParts(2, 6, 32, seed=0, split="train", motif_size=8)
    test = PlantedParts(2, 3, 32, seed=0, split="test", motif_size=8)
    recipe = dict(num_classes=2, image_size=32, prototypes_per_class=2, prototype_dim=8)
    train_protopnet(build_protopnet(**recipe), train, test, tiny_config(2), tmp_path, recipe,
                    progress=False)
    resumed = train_protopnet(build_protopnet(**recipe), train, test, tiny_config(3),
                              tmp_path, recipe, resume=True, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]  # epochs 0 and 1 were not run again
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2]
    assert "pushed_test_accuracy" in rows[1] and "pushed_test_accuracy" in rows[2]
    loaded, checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["epoch"] == 2
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
