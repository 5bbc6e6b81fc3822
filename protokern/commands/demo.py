"""`protokern demo`: train a ProtoPNet on generated planted-parts images, on the CPU, in minutes.

Generates the data (each class a small motif at a random place among shared distractors),
runs the paper's schedule (warm-up, joint, push, last layer) on the built-in small CNN, then
prints the test accuracy, how often the top prototype of the predicted class points inside the
planted motif, and the time of the prototype layer on protokern's fused op vs ProtoPNet's own
convolutions on the same features, and writes PNG explanations to the output folder.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from protokern import backends
from protokern.baselines import protopnet_min_distance
from protokern.commands.train import FROM_SCRATCH_LR
from protokern.data import PlantedParts
from protokern.models.explain import explain_image, render_explanation, top_prototype_positions
from protokern.models.protopnet import build_protopnet
from protokern.models.training import TrainingConfig, train_protopnet
from protokern.ops import min_distance
from protokern.timing import median_milliseconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``protokern demo``; the defaults are the run the README reports."""
    parser.add_argument("--output", default="protokern-demo",
                        help="folder for the checkpoint, logs and explanation PNGs")
    parser.add_argument("--classes", type=int, default=10,
                        help="classes, one planted motif each")
    parser.add_argument("--train-per-class", type=int, default=100,
                        help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=30, help="test images per class")
    parser.add_argument("--image-size", type=int, default=64, help="side of the square images")
    parser.add_argument("--epochs", type=int, default=25,
                        help="epochs in all, warm-up included (push after the last)")
    parser.add_argument("--warm-epochs", type=int, default=1,
                        help="first epochs training only the add-on layers and prototypes")
    parser.add_argument("--last-layer-iterations", type=int, default=10,
                        help="last-layer-only epochs after the push")
    parser.add_argument("--batch-size", type=int, default=50, help="images per step")
    parser.add_argument("--features-lr", type=float, default=FROM_SCRATCH_LR["features"],
                        help="backbone learning rate; the backbone learns from scratch here, "
                             "the paper's 1e-4 is for one pretrained on ImageNet")
    parser.add_argument("--prototypes-lr", type=float,
                        default=FROM_SCRATCH_LR["prototype_vectors"],
                        help="prototypes' learning rate")
    parser.add_argument("--metric", choices=("sqeuclidean", "cosine"), default="sqeuclidean",
                        help="distance between patches and prototypes")
    parser.add_argument("--explanations", type=int, default=5,
                        help="test images to explain as PNG")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the data, the weights and the data order")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def motif_hits(model, dataset: PlantedParts, batch_size: int = 100) -> tuple[float, float, int]:
    """Test accuracy, and the share of correctly classified images whose top prototype (the
    largest contribution to the predicted class) is centred inside the planted motif's box;
    with the number of correctly classified images."""
    correct_total = hits = 0
    for start in range(0, len(dataset), batch_size):
        images = dataset.images[start:start + batch_size]
        labels = dataset.labels[start:start + batch_size]
        boxes = dataset.boxes[start:start + batch_size].double()
        predicted, _, centers = top_prototype_positions(model, images)
        correct = predicted == labels
        inside = ((boxes[:, 0] <= centers[:, 0]) & (centers[:, 0] < boxes[:, 2])
                  & (boxes[:, 1] <= centers[:, 1]) & (centers[:, 1] < boxes[:, 3]))
        correct_total += int(correct.sum())
        hits += int((correct & inside).sum())
    return correct_total / len(dataset), hits / max(correct_total, 1), correct_total


def time_prototype_layer(model, images: torch.Tensor, repeats: int = 10
                         ) -> tuple[float, float, float]:
    """Median milliseconds of the prototype layer, forward + backward, on the add-on features
    of ``images``: protokern's `min_distance` vs ProtoPNet's convolutions. Also returns the
    largest |difference| of their minima, a check that the two compute the same thing."""
    with torch.no_grad():
        features = model.conv_features(images)
    prototypes = model.prototype_layer.prototype_vectors.detach()
    metric = model.metric

    def run(fn):
        x = features.clone().requires_grad_()
        p = prototypes.clone().requires_grad_()
        values = fn(x, p)
        values.sum().backward()
        return values.detach()

    def fused(x, p):
        return min_distance(x, p, metric).values

    def naive(x, p):
        return protopnet_min_distance(x, p, metric)[0]

    difference = float((run(fused) - run(naive)).abs().max())
    times = {name: median_milliseconds(lambda fn=fn: run(fn), repeats=repeats, warmup=0)
             for name, fn in (("fused", fused), ("naive", naive))}
    return times["fused"], times["naive"], difference


def run(args: argparse.Namespace) -> int:
    """``protokern demo``: prints the results and writes them under ``--output``."""
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    output = Path(args.output)
    progress = not args.no_progress
    print(f"Generating planted-parts data: {args.classes} classes, {args.train_per_class} train "
          f"+ {args.test_per_class} test images per class, {args.image_size}x{args.image_size}")
    train_set = PlantedParts(args.classes, args.train_per_class, args.image_size, args.seed,
                             "train")
    test_set = PlantedParts(args.classes, args.test_per_class, args.image_size, args.seed,
                            "test")
    model_config = {"num_classes": args.classes, "image_size": args.image_size,
                    "metric": args.metric}
    model = build_protopnet(**model_config)
    backend = backends.resolve("min_distance", backends.explicit_choice(),
                               torch.empty(1, model.prototype_layer.dim, *model.feature_size),
                               model.prototype_layer.prototype_vectors,
                               metric=args.metric).name
    print(f"ProtoPNet: small CNN backbone, {model.num_prototypes} prototypes "
          f"{tuple(model.prototype_layer.prototype_vectors.shape)}, feature map "
          f"{model.feature_size}, protokern backend {backend!r}")
    config = TrainingConfig(
        epochs=args.epochs, warm_epochs=args.warm_epochs, push_start=args.epochs,
        last_layer_iterations=args.last_layer_iterations, batch_size=args.batch_size,
        warm_lr={"add_on_layers": FROM_SCRATCH_LR["add_on_layers"],
                 "prototype_vectors": args.prototypes_lr},
        joint_lr={"features": args.features_lr, "add_on_layers": FROM_SCRATCH_LR["add_on_layers"],
                  "prototype_vectors": args.prototypes_lr},
        joint_lr_step=max(args.epochs, 1), seed=args.seed)
    result = train_protopnet(model, train_set, test_set, config, output, model_config,
                             progress=progress)
    trained_seconds = time.perf_counter() - started

    accuracy, in_motif, correct = motif_hits(model, test_set)
    fused_ms, naive_ms, difference = time_prototype_layer(model,
                                                          test_set.images[:args.batch_size])

    written = []
    for k in range(min(args.explanations, len(test_set))):
        index = k * len(test_set) // max(args.explanations, 1)  # spread over the classes
        image = test_set.images[index]
        explanation = explain_image(model, image, top_k=3)
        path = output / "explanations" / f"test_{index:04d}.png"
        written.append(render_explanation(
            explanation, image, path, result.push_record,
            title=f"test image {index} (true class {int(test_set.labels[index])})"))

    total_seconds = time.perf_counter() - started
    summary = {
        "test_accuracy": accuracy,
        "top_prototype_in_motif": in_motif,
        "correct_test_images": correct,
        "test_images": len(test_set),
        "backend": backend,
        "prototype_layer_shape": {"batch": args.batch_size, "features": list(
            model.feature_size), "dim": model.prototype_layer.dim,
            "prototypes": model.num_prototypes},
        "prototype_layer_fused_ms": fused_ms,
        "prototype_layer_naive_ms": naive_ms,
        "fused_vs_naive_max_abs_difference": difference,
        "training_seconds": trained_seconds,
        "total_seconds": total_seconds,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ntest accuracy: {100 * accuracy:.1f}% ({correct}/{len(test_set)})")
    print(f"top prototype inside the planted motif: {100 * in_motif:.1f}% of the correctly "
          f"classified test images")
    print(f"prototype layer, forward + backward on ({args.batch_size}, "
          f"{model.prototype_layer.dim}, {model.feature_size[0]}, {model.feature_size[1]}) "
          f"features x {model.num_prototypes} prototypes: fused ({backend}) {fused_ms:.2f} ms, "
          f"naive ProtoPNet convolutions {naive_ms:.2f} ms (max |difference| {difference:.1e})")
    print(f"explanations: {len(written)} PNGs in {output / 'explanations'}")
    print(f"checkpoint, log.csv, log.jsonl and summary.json in {output}")
    print(f"total time {total_seconds:.0f} s (training {trained_seconds:.0f} s)")
    return 0
