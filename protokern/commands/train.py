"""`protokern train`: the ProtoPNet schedule on a local image folder (or generated data).

``--data DIR`` reads ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (the layout of the
CUB-200 crops ProtoPNet trains on); ``--data planted-parts`` generates the demo's dataset.
Writes ``checkpoint.pt``, ``log.jsonl`` and ``log.csv`` to ``--output``; ``--resume``
continues there.

Data parallel on several processes (`protokern.distributed.processes`): ``--nproc N`` spawns N local
processes (gloo on CPU, NCCL with one GPU each on CUDA); or let torchrun start them::

    torchrun --standalone --nproc-per-node 2 -m protokern train --data DIR ...

Both give the result of one process on the same ``--batch-size`` (the global batch, split
between the processes), up to float rounding.
"""

import argparse
from pathlib import Path

import torch

from protokern.data import ImageFolder, PlantedParts
from protokern.distributed.processes import is_main_process, launch, process_group
from protokern.models.losses import LossCoefficients
from protokern.models.protopnet import build_protopnet
from protokern.models.training import TrainingConfig, train_protopnet

PLANTED = "planted-parts"


PAPER_LR: dict[str, float] = dict(TrainingConfig().joint_lr)
"""The paper's joint-stage rates per parameter group, meant for a backbone pretrained on
ImageNet: ``features`` (the backbone) 1e-4, ``add_on_layers`` and ``prototype_vectors`` 3e-3."""

FROM_SCRATCH_LR: dict[str, float] = {"features": 3e-3, "add_on_layers": 3e-3,
                                     "prototype_vectors": 3e-3}
"""The rates for a backbone that starts from random weights (``protokern demo``'s): the paper's
backbone rate of 1e-4 is for fine-tuning ImageNet weights, too small to train random ones."""

_LR_OPTIONS = {"features": "--features-lr", "add_on_layers": "--add-on-lr",
               "prototype_vectors": "--prototypes-lr"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``protokern train``; defaults are the paper's unless said otherwise."""
    defaults = TrainingConfig()
    coefficients = LossCoefficients()
    parser.add_argument("--data", required=True,
                        help=f"folder with train/<class>/ and test/<class>/ images, or {PLANTED!r}")
    parser.add_argument("--output", default="protokern-train", help="checkpoint and log folder")
    parser.add_argument("--resume", action="store_true", help="continue from --output")
    parser.add_argument("--backbone", default="small_cnn",
                        help="small_cnn, a torchvision name (resnet34, vgg19, densenet121, ...)"
                             " or timm:<name>")
    parser.add_argument("--weights", default=None,
                        help="local backbone state-dict file (pretrained weights; without it the "
                             "backbone starts from random weights)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="images are resized to this square size")
    parser.add_argument("--prototypes-per-class", type=int, default=10,
                        help="prototypes made for each class")
    parser.add_argument("--prototype-dim", type=int, default=128,
                        help="channels of the add-on layers' output, the prototypes' D")
    parser.add_argument("--prototype-patch", type=int, nargs=2, default=(1, 1),
                        metavar=("PH", "PW"), help="prototype size in feature-map positions")
    parser.add_argument("--metric", choices=("sqeuclidean", "cosine"), default="sqeuclidean",
                        help="distance between patches and prototypes")
    parser.add_argument("--epochs", type=int, default=defaults.epochs,
                        help="epochs in all, warm-up included")
    parser.add_argument("--warm-epochs", type=int, default=defaults.warm_epochs,
                        help="first epochs training only the add-on layers and prototypes")
    parser.add_argument("--push-start", type=int, default=defaults.push_start,
                        help="first push after this many epochs (and always after the last)")
    parser.add_argument("--push-every", type=int, default=defaults.push_every,
                        help="epochs between pushes")
    parser.add_argument("--last-layer-iterations", type=int,
                        default=defaults.last_layer_iterations,
                        help="last-layer-only epochs after each push")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="images per step (the global batch with several processes)")
    for group, help_text in (("features", "backbone learning rate, joint stage"),
                             ("add_on_layers", "add-on layers' learning rate"),
                             ("prototype_vectors", "prototypes' learning rate")):
        parser.add_argument(_LR_OPTIONS[group], type=float, default=None,
                            help=f"{help_text} (default: {PAPER_LR[group]:g} with --weights, "
                                 f"the paper's; {FROM_SCRATCH_LR[group]:g} without, from "
                                 f"scratch)")
    parser.add_argument("--last-layer-lr", type=float, default=defaults.last_layer_lr,
                        help="last layer's learning rate")
    parser.add_argument("--cluster", type=float, default=coefficients.cluster,
                        help="weight of the cluster cost")
    parser.add_argument("--separation", type=float, default=coefficients.separation,
                        help="weight of the separation cost (negative: the loss rewards distance "
                             "from other classes' prototypes)")
    parser.add_argument("--l1", type=float, default=coefficients.l1,
                        help="weight of the last layer's L1 penalty on other classes")
    parser.add_argument("--planted-classes", type=int, default=10,
                        help=f"with --data {PLANTED}: classes")
    parser.add_argument("--planted-per-class", type=int, nargs=2, default=(100, 30),
                        metavar=("TRAIN", "TEST"), help=f"with --data {PLANTED}: images per class")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to train (cuda when a GPU is visible)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="data-parallel processes to spawn on this machine (CUDA: one GPU "
                             "each); --batch-size is the global batch. Under torchrun leave it 1")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the weights, the data order and the planted data")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def learning_rates(args: argparse.Namespace) -> tuple[dict[str, float], str]:
    """The joint stage's rate per parameter group (`TrainingConfig.joint_lr` keys), and one line
    saying which rates these are and why.

    A rate given on the command line always wins. The others are the paper's (`PAPER_LR`) with
    ``--weights``, for a pretrained backbone, and `FROM_SCRATCH_LR` without.
    """
    given = {"features": args.features_lr, "add_on_layers": args.add_on_lr,
             "prototype_vectors": args.prototypes_lr}
    if args.weights:
        base, why = PAPER_LR, "the paper's, for the pretrained backbone of --weights"
    else:
        base, why = FROM_SCRATCH_LR, ("from scratch: no --weights, so the backbone starts from "
                                      "random weights; the paper's rates are for a pretrained "
                                      "one")
    rates = {group: base[group] if given[group] is None else given[group] for group in base}
    chosen = [option for group, option in _LR_OPTIONS.items() if given[group] is not None]
    if len(chosen) == len(_LR_OPTIONS):
        why = "as given"
    elif chosen:
        why += f"; {', '.join(chosen)} as given"
    line = (f"learning rates: backbone {rates['features']:g}, add-on "
            f"{rates['add_on_layers']:g}, prototypes {rates['prototype_vectors']:g} ({why})")
    return rates, line


def training_config(args: argparse.Namespace) -> tuple[TrainingConfig, str]:
    """The `TrainingConfig` the arguments describe, and `learning_rates`'s line about its
    rates."""
    rates, line = learning_rates(args)
    config = TrainingConfig(
        epochs=args.epochs, warm_epochs=args.warm_epochs, push_start=args.push_start,
        push_every=args.push_every, last_layer_iterations=args.last_layer_iterations,
        batch_size=args.batch_size,
        warm_lr={"add_on_layers": rates["add_on_layers"],
                 "prototype_vectors": rates["prototype_vectors"]},
        joint_lr=rates,
        last_layer_lr=args.last_layer_lr,
        coefficients=LossCoefficients(cluster=args.cluster, separation=args.separation,
                                      l1=args.l1),
        seed=args.seed)
    return config, line


def load_datasets(args: argparse.Namespace):
    """``(train, test, class names)`` from ``--data``."""
    if args.data == PLANTED:
        train_set = PlantedParts(args.planted_classes, args.planted_per_class[0],
                                 args.image_size, args.seed, "train")
        test_set = PlantedParts(args.planted_classes, args.planted_per_class[1],
                                args.image_size, args.seed, "test")
        return train_set, test_set, [f"motif {k}" for k in range(args.planted_classes)]
    root = Path(args.data)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"protokern train: --data {args.data!r} has no {split}/ "
                                    f"folder; expected DIR/train/<class>/ and DIR/test/<class>/")
    train_set = ImageFolder(root / "train", args.image_size)
    test_set = ImageFolder(root / "test", args.image_size, classes=train_set.classes)
    return train_set, test_set, train_set.classes


def run(args: argparse.Namespace) -> int:
    """``protokern train``: trains (in ``--nproc`` processes), then prints the final test
    accuracy."""
    if args.nproc < 1:
        raise ValueError(f"protokern train: --nproc must be >= 1, got {args.nproc}")
    if torch.device(args.device).type == "cuda" and args.nproc > torch.cuda.device_count():
        raise ValueError(f"protokern train: --nproc {args.nproc} needs a GPU per process, "
                         f"this machine has {torch.cuda.device_count()}")
    if args.nproc > 1:
        launch(args.nproc, train_in_process_group, args)
    else:
        train_in_process_group(args)
    return 0


def train_in_process_group(args: argparse.Namespace) -> None:
    """The training of one process: of the group torchrun or `launch` describes in the
    environment, or alone."""
    with process_group(args.device) as device:
        train(args, device)


def train(args: argparse.Namespace, device: torch.device) -> None:
    """Build the data and model from ``args``, train on ``device``; rank 0 prints."""
    torch.manual_seed(args.seed)
    train_set, test_set, class_names = load_datasets(args)
    model_config = {"num_classes": len(class_names), "image_size": args.image_size,
                    "backbone": args.backbone, "weights": args.weights,
                    "prototypes_per_class": args.prototypes_per_class,
                    "prototype_dim": args.prototype_dim,
                    "prototype_patch": tuple(args.prototype_patch), "metric": args.metric}
    model = build_protopnet(**model_config).to(device)
    config, rates_line = training_config(args)
    main = is_main_process()
    if main:
        print(f"training ProtoPNet ({args.backbone}, {model.num_prototypes} prototypes, "
              f"{len(class_names)} classes) on {len(train_set)} images, testing on "
              f"{len(test_set)}")
        print(rates_line)
    result = train_protopnet(model, train_set, test_set, config, args.output, model_config,
                             resume=args.resume, progress=not args.no_progress,
                             extra_state={"class_names": class_names})
    if main and result.history:
        last = result.history[-1]
        accuracy = last.get("test_accuracy_after_last_layer", last["test_accuracy"])
        print(f"test accuracy after epoch {last['epoch']}: {100 * accuracy:.1f}%")
    if main:
        print(f"checkpoint and logs in {args.output}")
