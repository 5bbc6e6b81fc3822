"""ProtoPNet's training schedule (Chen et al. 2019, section 2.2 and the authors' settings).

1. Warm-up: the backbone frozen, the add-on layers and prototypes trained (Adam, 3e-3 each).
2. Joint: backbone (1e-4), add-on (3e-3) and prototypes (3e-3), the rate divided by 10 every
   5 epochs; weight decay 1e-3 on the convolutions. The last layer stays fixed.
3. Push: every prototype projected onto its nearest same-class training patch
   (`protokern.models.push`), at chosen epochs and after the last one.
4. Last layer only: after each push, the last layer trained alone (Adam, 1e-4) to make it
   sparse in wrong-class connections (the L1 term).

Every epoch rewrites ``checkpoint.pt`` (atomically) and then ``log.jsonl`` and ``log.csv`` (one
row per epoch) in the output folder; `train_protopnet` with ``resume=True`` continues from
that checkpoint. A run killed at any point and resumed ends with the same weights, bit for
bit, as a run never interrupted: the checkpoint holds everything later epochs depend on
(weights and batch-norm statistics, optimiser and learning-rate schedule states, the push
record, the global RNG state), and each epoch's data order comes from the seed and the epoch
number alone. Work done in the interrupted epoch is redone.

Under a process group of several processes (`protokern.distributed.processes`; ``protokern train
--nproc N`` or ``torchrun``) training is data parallel: each global batch of the one-process
run is split between the processes, the model is wrapped in
`~torch.nn.parallel.DistributedDataParallel` with batch norm synchronised, and the loss is
weighted so that the averaged gradient is the gradient of the whole batch's mean loss; push
is distributed (`protokern.models.push`); evaluation and the last-layer stage run whole on
every process (they are cheap and keep the replicas identical without communication). Only
rank 0 writes files.
"""

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    TensorDataset,
)
from tqdm import tqdm

from protokern.distributed.batch_norm import synchronize_batch_norm
from protokern.distributed.collectives import sum_across_processes
from protokern.distributed.processes import barrier, is_distributed, is_main_process, world
from protokern.models.checkpoint import read_checkpoint, save_checkpoint
from protokern.models.losses import LossCoefficients, protopnet_loss
from protokern.models.protopnet import ProtoPNet, distance_to_similarity
from protokern.models.push import PushRecord, push_prototypes

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainingConfig:
    """The schedule; defaults are the paper's (epochs shortened: set ``epochs`` to taste).

    Epochs are counted from 0. A push follows epoch ``e`` when ``e + 1 >= push_start`` and
    ``(e + 1 - push_start) % push_every == 0``, and always follows the last epoch.
    """

    epochs: int = 20
    warm_epochs: int = 5
    push_start: int = 10
    push_every: int = 10
    last_layer_iterations: int = 20
    batch_size: int = 80
    warm_lr: dict[str, float] = field(
        default_factory=lambda: {"add_on_layers": 3e-3, "prototype_vectors": 3e-3})
    joint_lr: dict[str, float] = field(default_factory=lambda: {
        "features": 1e-4, "add_on_layers": 3e-3, "prototype_vectors": 3e-3})
    joint_lr_step: int = 5
    joint_lr_gamma: float = 0.1
    last_layer_lr: float = 1e-4
    weight_decay: float = 1e-3
    coefficients: LossCoefficients = field(default_factory=LossCoefficients)
    seed: int = 0

    def pushes_after(self, epoch: int) -> bool:
        done = epoch + 1
        return done == self.epochs or (
            done >= self.push_start and (done - self.push_start) % self.push_every == 0)


def _parameter_groups(model: ProtoPNet, rates: dict[str, float], weight_decay: float
                      ) -> list[dict[str, Any]]:
    """Adam groups named as in the paper's code; decay on the convolutions, not prototypes."""
    modules = {"features": model.features, "add_on_layers": model.add_on_layers}
    groups = []
    for name, lr in rates.items():
        if name == "prototype_vectors":
            groups.append({"params": [model.prototype_layer.prototype_vectors], "lr": lr,
                           "name": name})
        elif name in modules:
            groups.append({"params": list(modules[name].parameters()), "lr": lr,
                           "weight_decay": weight_decay, "name": name})
        else:
            raise ValueError(f"TrainingConfig: unknown parameter group {name!r}; expected "
                             f"features, add_on_layers or prototype_vectors")
    return groups


def _set_trainable(model: ProtoPNet, stage: str) -> None:
    """Which parameters learn in ``stage`` (``warm``, ``joint`` or ``last_layer``)."""
    model.features.requires_grad_(stage == "joint")
    model.add_on_layers.requires_grad_(stage in ("warm", "joint"))
    model.prototype_layer.requires_grad_(stage in ("warm", "joint"))
    model.last_layer.requires_grad_(stage == "last_layer")


@dataclass
class Optimizers:
    warm: torch.optim.Optimizer
    joint: torch.optim.Optimizer
    joint_schedule: torch.optim.lr_scheduler.LRScheduler
    last_layer: torch.optim.Optimizer

    @classmethod
    def for_model(cls, model: ProtoPNet, config: TrainingConfig) -> "Optimizers":
        warm = torch.optim.Adam(_parameter_groups(model, config.warm_lr, config.weight_decay))
        joint = torch.optim.Adam(_parameter_groups(model, config.joint_lr, config.weight_decay))
        schedule = torch.optim.lr_scheduler.StepLR(joint, config.joint_lr_step,
                                                   config.joint_lr_gamma)
        last = torch.optim.Adam(model.last_layer.parameters(), lr=config.last_layer_lr)
        return cls(warm, joint, schedule, last)

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).state_dict()
                for name in ("warm", "joint", "joint_schedule", "last_layer")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            getattr(self, name).load_state_dict(value)


def _device_of(model: ProtoPNet) -> torch.device:
    return model.prototype_layer.prototype_vectors.device


class ShareOfShuffledBatches(Sampler[list[int]]):
    """This process's share of each batch of a seeded shuffle of ``range(size)``.

    The global batches are those of ``DataLoader(..., batch_size, shuffle=True,
    generator=generator)``; process ``rank`` of ``P`` gets ``batch[rank::P]``. With one
    process that is the whole batch, so one process and several see the same global batches.
    With several, a last batch of fewer than ``P`` images is skipped (a process would get
    none).
    """

    def __init__(self, size: int, batch_size: int, generator: torch.Generator) -> None:
        self.batches = BatchSampler(RandomSampler(range(size), generator=generator),
                                    batch_size, drop_last=False)
        self.rank, self.processes = world()

    def __iter__(self):
        for batch in self.batches:
            if len(batch) >= self.processes:
                yield batch[self.rank::self.processes]

    def __len__(self) -> int:
        size, batch_size = len(self.batches.sampler), self.batches.batch_size
        last = size % batch_size
        return size // batch_size + (last >= self.processes if last else 0)


def shuffled_batches(dataset: Dataset, batch_size: int, generator: torch.Generator
                     ) -> DataLoader:
    """A loader of this process's share of each shuffled global batch of ``batch_size``
    (`ShareOfShuffledBatches`); reseed ``generator`` before each epoch."""
    return DataLoader(dataset, batch_sampler=ShareOfShuffledBatches(len(dataset), batch_size,
                                                                    generator),
                      generator=generator)


def train_epoch(model: ProtoPNet, loader: DataLoader, optimizer: torch.optim.Optimizer,
                coefficients: LossCoefficients, description: str, progress: bool = True
                ) -> dict[str, float]:
    """One pass over ``loader`` with ``optimizer``; mean loss terms and accuracy over every
    process's images.

    With several processes, ``loader`` yields this process's share of each global batch
    (`shuffled_batches`), ``model`` is wrapped in DistributedDataParallel for the epoch
    (its batch norm synchronised in place first), and this process's loss is weighted by
    ``P * share / batch``: DDP averages the P gradients, so the result is the gradient of the
    whole batch's mean loss even for unequal shares (the L1 term, the same everywhere, keeps
    weight 1 because the weights average to 1).
    """
    model.train()
    device = _device_of(model)
    network = (DistributedDataParallel(synchronize_batch_norm(model)) if is_distributed()
               else model)
    processes = world()[1]
    sums: dict[str, float] = {}
    correct = seen = 0
    for images, labels in tqdm(loader, desc=description, disable=not progress, leave=False):
        images, labels = images.to(device), labels.to(device)
        batch = int(sum_across_processes(torch.tensor([len(labels)], device=device)))
        output = network(images)
        terms = protopnet_loss(model, output, labels, coefficients)
        optimizer.zero_grad(set_to_none=True)
        (terms.total * (processes * len(labels) / batch)).backward()
        optimizer.step()
        for name, value in terms.as_floats().items():
            sums[name] = sums.get(name, 0.0) + value * len(labels)
        correct += int((output.logits.argmax(1) == labels).sum())
        seen += len(labels)
    totals = sum_across_processes(torch.tensor([*sums.values(), correct, seen],
                                               dtype=torch.float64, device=device)).tolist()
    seen = totals[-1]
    # totals ends with (correct, seen): zip stops at the last loss term on purpose.
    return {**{f"train_{k}": v / seen for k, v in zip(sums, totals[:-2], strict=True)},
            "train_accuracy": totals[-2] / seen}


@torch.no_grad()
def similarities_of(model: ProtoPNet, dataset: Dataset, batch_size: int, progress: bool = True
                    ) -> tuple[Tensor, Tensor]:
    """``(N, M)`` similarities and ``(N,)`` labels of a dataset, in eval mode."""
    model.eval()
    device = _device_of(model)
    out, all_labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for images, labels in tqdm(loader, desc="similarities", disable=not progress, leave=False):
        min_distances, _ = model.prototype_layer(model.conv_features(images.to(device)))
        out.append(distance_to_similarity(min_distances, model.metric))
        all_labels.append(labels.to(device))
    return torch.cat(out), torch.cat(all_labels)


@torch.no_grad()
def evaluate(model: ProtoPNet, dataset: Dataset, batch_size: int = 100, progress: bool = True
             ) -> float:
    """Accuracy of ``model`` on ``dataset``."""
    similarities, labels = similarities_of(model, dataset, batch_size, progress)
    return float((model.last_layer(similarities).argmax(1) == labels).float().mean())


def train_last_layer(model: ProtoPNet, train_set: Dataset, optimizer: torch.optim.Optimizer,
                     config: TrainingConfig, progress: bool = True) -> dict[str, float]:
    """The last-layer-only stage: ``config.last_layer_iterations`` epochs of CE + L1.

    With the backbone, add-on and prototypes fixed, every image's similarities are fixed
    too: they are computed once (eval mode), and the epochs run over them, not the images.
    """
    _set_trainable(model, "last_layer")
    similarities, labels = similarities_of(model, train_set, config.batch_size, progress)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(TensorDataset(similarities, labels), batch_size=config.batch_size,
                        shuffle=True, generator=generator)
    coefficients = config.coefficients
    mask = 1 - model.prototype_class_identity.t()
    for _ in tqdm(range(config.last_layer_iterations), desc="last layer", disable=not progress,
                  leave=False):
        for batch, batch_labels in loader:
            logits = model.last_layer(batch)
            loss = (coefficients.cross_entropy
                    * torch.nn.functional.cross_entropy(logits, batch_labels)
                    + coefficients.l1 * (model.last_layer.weight * mask).abs().sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    logits = model.last_layer(similarities)
    return {"last_layer_train_accuracy": float((logits.argmax(1) == labels).float().mean())}


def _write_logs(folder: Path, history: list[dict[str, Any]]) -> None:
    """``log.jsonl`` and ``log.csv`` of the whole history: rewritten rather than appended, so
    a run killed between checkpoint and log, then resumed, logs each epoch once."""
    with open(folder / "log.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in history)
    columns = list(dict.fromkeys(key for r in history for key in r))  # rows may gain columns
    with open(folder / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(history)


@dataclass
class TrainingResult:
    model: ProtoPNet
    history: list[dict[str, Any]]
    push_record: PushRecord | None


def train_protopnet(model: ProtoPNet, train_set: Dataset, test_set: Dataset,
                    config: TrainingConfig, output_dir: str | Path,
                    model_config: dict[str, Any] | None = None, resume: bool = False,
                    progress: bool = True, extra_state: dict[str, Any] | None = None
                    ) -> TrainingResult:
    """Run the whole schedule, logging and checkpointing into ``output_dir``.

    Args:
        model: a fresh model (with ``resume``, its weights are replaced by the checkpoint's).
        train_set, test_set: ``(image (3, S, S) in [0, 1], label)`` datasets.
        model_config: the `build_protopnet` recipe stored in the checkpoint.
        resume: continue after the last epoch recorded in ``output_dir/checkpoint.pt``.
        progress: progress bars (on rank 0 only).
        extra_state: stored in the checkpoint as is (e.g. class names; tensors, containers and
            primitives only).

    With several processes (`protokern.distributed.processes`) every process calls this with the
    same arguments and data; ``model``'s batch norm is synchronised in place. Only rank 0 writes.

    Raises:
        FileNotFoundError: ``resume`` without a checkpoint. CheckpointError: ``resume`` with a
        checkpoint that is unreadable or not from this function.
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    optimizers = Optimizers.for_model(model, config)
    history: list[dict[str, Any]] = []
    push_record = None
    first_epoch = 0
    checkpoint_path = folder / CHECKPOINT_NAME
    if resume:
        if not checkpoint_path.is_file():
            raise FileNotFoundError(f"train_protopnet: resume asked but there is no "
                                    f"{str(checkpoint_path)!r}")
        state = read_checkpoint(checkpoint_path, _device_of(model),
                                required=("epoch", "optimizers", "history", "push", "rng"))
        model.load_state_dict(state["model"])
        optimizers.load_state_dict(state["optimizers"])
        history, first_epoch = state["history"], state["epoch"] + 1
        push_record = PushRecord(**state["push"]) if state.get("push") else None
        torch.set_rng_state(state["rng"].cpu())
    progress = progress and is_main_process()
    generator = torch.Generator()
    loader = shuffled_batches(train_set, config.batch_size, generator)

    for epoch in range(first_epoch, config.epochs):
        start = time.perf_counter()
        generator.manual_seed(config.seed * 100_003 + epoch)  # a resumed run shuffles alike
        stage = "warm" if epoch < config.warm_epochs else "joint"
        _set_trainable(model, stage)
        optimizer = optimizers.warm if stage == "warm" else optimizers.joint
        row: dict[str, Any] = {"epoch": epoch, "stage": stage,
                               "lr": {g["name"]: g["lr"] for g in optimizer.param_groups}}
        row.update(train_epoch(model, loader, optimizer, config.coefficients,
                               f"epoch {epoch} {stage}", progress))
        if stage == "joint":
            optimizers.joint_schedule.step()
        row["test_accuracy"] = evaluate(model, test_set, progress=progress)
        if config.pushes_after(epoch):
            push_record = push_prototypes(model, train_set, config.batch_size, progress)
            row["pushed_test_accuracy"] = evaluate(model, test_set, progress=progress)
            if config.last_layer_iterations > 0:
                row.update(train_last_layer(model, train_set, optimizers.last_layer, config,
                                            progress))
                row["test_accuracy_after_last_layer"] = evaluate(model, test_set,
                                                                 progress=progress)
        row["seconds"] = time.perf_counter() - start
        history.append(row)
        if is_main_process():
            save_checkpoint(checkpoint_path, model, model_config or {}, epoch=epoch,
                            optimizers=optimizers.state_dict(), history=history,
                            push=asdict(push_record) if push_record else None,
                            training_config=asdict(config), rng=torch.get_rng_state(),
                            **(extra_state or {}))
            _write_logs(folder, history)
        barrier()  # no process starts the next epoch before this one's checkpoint exists
    model.eval()
    return TrainingResult(model, history, push_record)
