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
from protokern.models.protopnet import build_protopnet
from protokern.models.losses import LossCoefficients
from protokern.models.training import TrainingConfig, train_protopnet

PLANTED = "planted-parts"


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
    parser.add_argument("--weights", default=None, help="local backbone state-dict file")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--prototypes-per-class", type=int, default=10)
    parser.add_argument("--prototype-dim", type=int, default=128)
    parser.add_argument("--prototype-patch", type=int, nargs=2, default=(1, 1),
                        metavar=("PH", "PW"))
    parser.add_argument("--metric", choices=("sqeuclidean", "cosine"), default="sqeuclidean")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--warm-epochs", type=int, default=defaults.warm_epochs)
    parser.add_argument("--push-start", type=int, default=defaults.push_start)
    parser.add_argument("--push-every", type=int, default=defaults.push_every)
    parser.add_argument("--last-layer-iterations", type=int,
                        default=defaults.last_layer_iterations)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--features-lr", type=float, default=defaults.joint_lr["features"])
    parser.add_argument("--add-on-lr", type=float, default=defaults.joint_lr["add_on_layers"])
    parser.add_argument("--prototypes-lr", type=float,
                        default=defaults.joint_lr["prototype_vectors"])
    parser.add_argument("--last-layer-lr", type=float, default=defaults.last_layer_lr)
    parser.add_argument("--cluster", type=float, default=coefficients.cluster)
    parser.add_argument("--separation", type=float, default=coefficients.separation)
    parser.add_argument("--l1", type=float, default=coefficients.l1)
    parser.add_argument("--planted-classes", type=int, default=10,
                        help=f"with --data {PLANTED}: classes")
    parser.add_argument("--planted-per-class", type=int, nargs=2, default=(100, 30),
                        metavar=("TRAIN", "TEST"), help=f"with --data {PLANTED}: images per class")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--nproc", type=int, default=1,
                        help="data-parallel processes to spawn on this machine (CUDA: one GPU "
                             "each); --batch-size is the global batch. Under torchrun leave it 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


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
    config = TrainingConfig(
        epochs=args.epochs, warm_epochs=args.warm_epochs, push_start=args.push_start,
        push_every=args.push_every, last_layer_iterations=args.last_layer_iterations,
        batch_size=args.batch_size,
        warm_lr={"add_on_layers": args.add_on_lr, "prototype_vectors": args.prototypes_lr},
        joint_lr={"features": args.features_lr, "add_on_layers": args.add_on_lr,
                  "prototype_vectors": args.prototypes_lr},
        last_layer_lr=args.last_layer_lr,
        coefficients=LossCoefficients(cluster=args.cluster, separation=args.separation,
                                      l1=args.l1),
        seed=args.seed)
    main = is_main_process()
    if main:
        print(f"training ProtoPNet ({args.backbone}, {model.num_prototypes} prototypes, "
              f"{len(class_names)} classes) on {len(train_set)} images, testing on "
              f"{len(test_set)}")
    result = train_protopnet(model, train_set, test_set, config, args.output, model_config,
                             resume=args.resume, progress=not args.no_progress,
                             extra_state={"class_names": class_names})
    if main and result.history:
        last = result.history[-1]
        accuracy = last.get("test_accuracy_after_last_layer", last["test_accuracy"])
        print(f"test accuracy after epoch {last['epoch']}: {100 * accuracy:.1f}%")
    if main:
        print(f"checkpoint and logs in {args.output}")
