"""Data-parallel ProtoPNet on 2 gloo processes (CPU) gives the one-process results: the
gradients and weights of a step, a whole (short) schedule, and push, whose result must be
the same bit for bit, ties across processes included. ``protokern train --nproc 2`` runs.

The one-process reference runs in the test's own process with one thread, as each gloo
process has (so push's features are computed alike, bit for bit). The gradient and schedule
comparisons run the model in float64, so that the only difference
between one and two processes, the order of float sums, stays near 1e-15 and a wrongly
combined term (a loss weight, a batch-norm statistic) cannot hide under float32 rounding.
"""

import json
from dataclasses import asdict

import pytest
import torch
from gloo import run_on_gloo
from helpers import torch_threads
from torch.utils.data import Subset, TensorDataset

from protokern import cli
from protokern.data import PlantedParts
from protokern.models.checkpoint import load_checkpoint
from protokern.models.losses import LossCoefficients
from protokern.models.protopnet import build_protopnet
from protokern.models.push import push_prototypes
from protokern.models.training import (
    TrainingConfig,
    shuffled_batches,
    train_epoch,
    train_protopnet,
)

RELATIVE = 1e-10  # float64; measured differences are about 1e-15


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_protopnet(2, 32, prototypes_per_class=2, prototype_dim=8).double()


def _sgd_epoch(dataset, batch_size: int) -> dict:
    """One epoch of plain SGD on every parameter (the last layer too, so that its L1 term
    matters): SGD's step is proportional to the gradient, which Adam's first step is not."""
    model = _tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator()
    generator.manual_seed(7)
    metrics = train_epoch(model, shuffled_batches(dataset, batch_size, generator), optimizer,
                          LossCoefficients(l1=1e-2), "test", progress=False)
    return {"gradients": {n: p.grad.clone() for n, p in model.named_parameters()},
            "state": {n: t.clone() for n, t in model.state_dict().items()},
            "metrics": metrics}


def one_step_and_uneven_epoch(rank: int, world_size: int) -> dict:
    data = PlantedParts(2, 6, 32, seed=0, motif_size=8)  # 12 images
    return {"one_step": _sgd_epoch(Subset(data, range(8)), 8),  # one batch, 4 + 4
            "uneven": _sgd_epoch(data, 5)}  # batches of 5, 5, 2: shares 3 + 2, 3 + 2, 1 + 1


def _assert_close(actual: dict, expected: dict, what: str) -> None:
    for name, tensor in expected.items():
        if tensor.is_floating_point():
            scale = tensor.abs().max().clamp_min(1e-12)
            error = float((actual[name] - tensor).abs().max() / scale)
            assert error <= RELATIVE, f"{what} {name}: relative difference {error:.2e}"
        else:
            assert torch.equal(actual[name], tensor), f"{what} {name}"


def _assert_identical(first: dict, second: dict, what: str) -> None:
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), f"{what} {name} differs between processes"


def test_data_parallel_step_equals_one_process_on_the_whole_batch(one_thread):
    single = one_step_and_uneven_epoch(0, 1)
    ranks = run_on_gloo(one_step_and_uneven_epoch, 2)
    for case in ("one_step", "uneven"):
        expected = single[case]
        for key in ("gradients", "state"):
            _assert_identical(ranks[0][case][key], ranks[1][case][key], f"{case} {key}")
            _assert_close(ranks[0][case][key], expected[key], f"{case} {key}")
        for name, value in expected["metrics"].items():  # losses and accuracy of all images
            got = ranks[0][case]["metrics"][name]
            assert abs(got - value) <= RELATIVE * max(1, abs(value)), (case, name, got, value)


def _push_data() -> TensorDataset:
    """10 images in batches of 2 (classes 0, 1 each); rank 0 of 2 searches batches 0-1 (images
    0-3), rank 1 batches 2-4 (images 4-9). Batch 3 (images 6, 7) repeats batch 0."""
    data = PlantedParts(2, 5, 32, seed=1, motif_size=8)
    order = [0, 5, 1, 6, 2, 7, 0, 5, 3, 8]
    return TensorDataset(data.images[order], data.labels[order])


def push_on_planted_ties(rank: int, world_size: int) -> dict:
    dataset = _push_data()
    torch.manual_seed(0)
    model = build_protopnet(2, 32, prototypes_per_class=3, prototype_dim=8).eval()
    with torch.no_grad():
        features = model.conv_features(dataset.tensors[0][:2])  # batch 0, as push computes it
        prototypes = model.prototype_layer.prototype_vectors
        # prototype 0 (class 0) is a patch of image 0, prototype 3 (class 1) one of image 1:
        # images 6 and 7, on the other process, hold the same patches at distance 0 too
        prototypes[0] = features[0, :, 2:3, 1:2]
        prototypes[3] = features[1, :, 1:2, 3:4]
    record = push_prototypes(model, dataset, batch_size=2, progress=False)
    return {"record": asdict(record), "prototypes": model.prototype_layer.prototype_vectors.clone()}


def test_distributed_push_equals_one_process_push_with_ties_across_processes(one_thread):
    single = push_on_planted_ties(0, 1)
    ranks = run_on_gloo(push_on_planted_ties, 2)
    expected = single["record"]
    assert expected["image_index"][[0, 3]].tolist() == [0, 1]  # not 6, 7: lowest image wins
    assert expected["position"][[0, 3]].tolist() == [[2, 1], [1, 3]]
    assert expected["distance"][[0, 3]].tolist() == [0.0, 0.0]
    assert expected["image_index"].unique().numel() > 2  # the other prototypes found others
    for result in ranks:
        for key in ("image_index", "position", "box", "distance"):
            assert torch.equal(result["record"][key], expected[key]), key
        assert all(torch.equal(a, b) for a, b in zip(result["record"]["source_patches"],
                                                      expected["source_patches"], strict=True))
        assert torch.equal(result["prototypes"], single["prototypes"])


def schedule(rank: int, world_size: int, folder: str) -> dict:
    train = PlantedParts(2, 6, 32, seed=0, split="train", motif_size=8)
    test = PlantedParts(2, 3, 32, seed=0, split="test", motif_size=8)
    config = TrainingConfig(epochs=2, warm_epochs=1, push_start=2, last_layer_iterations=2,
                            batch_size=4)
    result = train_protopnet(_tiny_model(), train, test, config, folder, progress=False)
    return {"state": result.model.state_dict(), "history": result.history,
            "push": asdict(result.push_record)}


def test_data_parallel_schedule_equals_one_process_and_only_rank_0_writes(tmp_path, one_thread):
    single = schedule(0, 1, str(tmp_path / "one"))
    ranks = run_on_gloo(schedule, 2, str(tmp_path / "two"))
    _assert_identical(ranks[0]["state"], ranks[1]["state"], "state")
    _assert_close(ranks[0]["state"], single["state"], "state")
    for key in ("image_index", "position"):
        assert torch.equal(ranks[0]["push"][key], single["push"][key]), key
    assert [r["epoch"] for r in ranks[0]["history"]] == [0, 1]
    for row, expected in zip(ranks[0]["history"], single["history"], strict=True):
        accuracies = [key for key in expected if key.endswith("accuracy")]
        assert [row[key] for key in accuracies] == [expected[key] for key in accuracies]
    written = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert written == ["checkpoint.pt", "log.csv", "log.jsonl"]  # one set, no temporaries
    rows = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]


def test_train_command_nproc_2(tmp_path, capfd):
    out = tmp_path / "run"
    assert cli.main(["train", "--nproc", "2", "--data", "planted-parts", "--planted-classes", "2",
                     "--planted-per-class", "4", "2", "--image-size", "32",
                     "--prototypes-per-class", "2", "--prototype-dim", "8", "--epochs", "1",
                     "--warm-epochs", "1", "--last-layer-iterations", "1", "--batch-size", "4",
                     "--output", str(out), "--no-progress"]) == 0
    printed = capfd.readouterr().out
    assert printed.count("checkpoint and logs in") == 1  # rank 0 alone prints
    _, checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["epoch"] == 0 and checkpoint["push"] is not None
