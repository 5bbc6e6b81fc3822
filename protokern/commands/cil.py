"""`protokern cil`: a class-incremental scenario for every head, with a metrics table.

Data: the generated planted-parts images through a fixed seeded random CNN
(`protokern.heads.features`), or any ``(features, labels)`` file:

- ``.pt``: ``torch.save`` of a dict ``{"features": (N, D) or (N, D, H, W), "labels": (N,)}``
  (optionally ``"test_features"``, ``"test_labels"``) or of a pair ``(features, labels)``;
- ``.npz``: ``numpy.savez`` with the same keys.

Without a test split the file's samples are split per class (``--test-fraction``). Class
labels are renumbered ``0..C-1`` (in sorted order, or shuffled with ``--shuffle-classes``) and
cut into ``--tasks`` consecutive tasks.
"""

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from protokern.heads.metrics import CILMetrics, cil_metrics
from protokern.heads.scenario import HEADS, POOLS, run_scenario, split_into_tasks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``protokern cil``."""
    parser.add_argument("--data", default="planted",
                        help="'planted' (generated images) or a .pt/.npz file of "
                             "(features, labels)")
    parser.add_argument("--tasks", type=int, default=5, help="number of tasks")
    parser.add_argument("--heads", default=",".join(HEADS),
                        help="comma-separated heads")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the test split of a file and --shuffle-classes")
    parser.add_argument("--shuffle-classes", action="store_true",
                        help="random class order instead of sorted")
    parser.add_argument("--pool", choices=POOLS, default="max",
                        help="how vector heads reduce feature maps over positions")
    parser.add_argument("--tukey", type=float, default=None, metavar="LAMBDA",
                        help="Tukey's power transform x**LAMBDA of every feature first (FeCAM "
                             "uses 0.5); features must be non-negative (default: none)")
    parser.add_argument("--test-fraction", type=float, default=0.25,
                        help="file without a test split: fraction of each class held out")
    group = parser.add_argument_group("planted-parts data")
    group.add_argument("--classes", type=int, default=10, help="classes, one planted motif each")
    group.add_argument("--images-per-class", type=int, default=60,
                       help="training images per class")
    group.add_argument("--test-images-per-class", type=int, default=30,
                       help="test images per class")
    group.add_argument("--image-size", type=int, default=64, help="side of the square images")
    group.add_argument("--data-seed", type=int, default=0, help="seeds the generated images")
    group.add_argument("--feature-width", type=int, default=128,
                       help="channels of the random CNN's feature maps")
    group.add_argument("--feature-seed", type=int, default=0,
                       help="seeds the random CNN's weights")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the results to this file (undefined entries as null)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _as_tensor(value: object, name: str, path: Path) -> Tensor:
    tensor = torch.as_tensor(np.asarray(value)) if not isinstance(value, Tensor) else value
    if tensor.dim() == 0:
        raise ValueError(f"protokern cil: {path}: {name} must be an array, got a scalar")
    return tensor


def load_feature_file(path: Path) -> dict[str, Tensor]:
    """Read ``features``/``labels`` (and optional ``test_*``) from a .pt or .npz file."""
    if not path.exists():
        raise ValueError(f"protokern cil: no such file {path}")
    if path.suffix == ".npz":
        with np.load(path) as archive:
            raw = {key: archive[key] for key in archive.files}
    elif path.suffix == ".pt":
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(raw, (tuple, list)) and len(raw) == 2:
            raw = {"features": raw[0], "labels": raw[1]}
    else:
        raise ValueError(f"protokern cil: --data must be 'planted' or a .pt/.npz file, got "
                         f"{path}")
    if not isinstance(raw, dict) or "features" not in raw or "labels" not in raw:
        raise ValueError(f"protokern cil: {path} must hold 'features' and 'labels' (a dict, "
                         f".npz keys or a (features, labels) pair)")
    data = {key: _as_tensor(value, key, path) for key, value in raw.items()
            if key in ("features", "labels", "test_features", "test_labels")}
    for prefix in ("", "test_"):
        if prefix + "features" not in data:
            continue
        x, y = data[prefix + "features"], data[prefix + "labels"]
        if x.dim() not in (2, 4) or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"protokern cil: {path}: {prefix}features must be (N, D) or "
                             f"(N, D, H, W) and {prefix}labels (N,), got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        data[prefix + "features"] = x.float()
        data[prefix + "labels"] = y.long()
    return data


def _split_per_class(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Boolean train/test masks holding out ``ceil(fraction * n_c)`` samples of each class
    (at least one, and at least one kept for training)."""
    generator = torch.Generator().manual_seed(seed)
    test = torch.zeros_like(labels, dtype=torch.bool)
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        if len(members) < 2:
            raise ValueError(f"protokern cil: class {c} has {len(members)} sample; need >= 2 "
                             f"to hold one out for testing")
        held = min(max(1, math.ceil(fraction * len(members))), len(members) - 1)
        test[members[torch.randperm(len(members), generator=generator)[:held]]] = True
    return ~test, test


def _planted(args: argparse.Namespace) -> dict[str, Tensor]:
    from protokern.data import PlantedParts  # the generator is only needed for this path
    from protokern.heads.features import extract_feature_maps

    data: dict[str, Tensor] = {}
    for split, per_class, prefix in (("train", args.images_per_class, ""),
                                     ("test", args.test_images_per_class, "test_")):
        images = PlantedParts(num_classes=args.classes, images_per_class=per_class,
                              image_size=args.image_size, seed=args.data_seed, split=split)
        data[prefix + "features"] = extract_feature_maps(
            images.images, args.feature_width, args.feature_seed,
            progress=not args.no_progress)
        data[prefix + "labels"] = images.labels
    return data


def _undefined_as_null(value: object) -> object:
    """``value`` with every NaN float (an undefined entry: the accuracy matrix above the
    diagonal, the forgetting of a single task) replaced by ``None``, so `json.dumps` writes
    ``null``; JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _undefined_as_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_undefined_as_null(item) for item in value]
    return value


def _format_table(results: dict[str, CILMetrics], seconds: dict[str, float]) -> str:
    columns = ("head", "avg inc acc", "last acc", "forgetting", "old acc", "new acc",
               "harmonic", "time s")
    rows = [columns]
    for name, m in results.items():
        rows.append((name, *(f"{100 * v:.2f}" if not math.isnan(v) else "n/a" for v in (
            m.average_incremental_accuracy, m.last_accuracy, m.forgetting, m.old_accuracy,
            m.new_accuracy, m.harmonic_mean)), f"{seconds[name]:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``protokern cil``: every head through the tasks; prints the metrics table."""
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = [h for h in heads if h not in HEADS]
    if unknown or not heads:
        raise SystemExit(f"protokern cil: unknown head(s) {unknown or args.heads!r}; choose "
                         f"from {', '.join(HEADS)}")
    if not 0 < args.test_fraction < 1:
        raise SystemExit(f"protokern cil: --test-fraction must be in (0, 1), got "
                         f"{args.test_fraction}")
    try:
        data = _planted(args) if args.data == "planted" else load_feature_file(Path(args.data))
    except ValueError as error:
        raise SystemExit(str(error)) from error
    if "test_features" not in data:
        train_mask, test_mask = _split_per_class(data["labels"], args.test_fraction, args.seed)
        data["test_features"], data["test_labels"] = (data["features"][test_mask],
                                                      data["labels"][test_mask])
        data["features"], data["labels"] = data["features"][train_mask], data["labels"][
            train_mask]

    if (data["labels"] < 0).any() or (data["test_labels"] < 0).any():
        raise SystemExit("protokern cil: labels must be non-negative integers")
    # renumber classes 0..C-1 in task order
    classes = torch.cat([data["labels"], data["test_labels"]]).unique()
    if args.shuffle_classes:
        classes = classes[torch.randperm(len(classes),
                                         generator=torch.Generator().manual_seed(args.seed))]
    lookup = torch.full((int(classes.max()) + 1,), -1, dtype=torch.int64)
    lookup[classes] = torch.arange(len(classes))
    train = (data["features"], lookup[data["labels"]])
    test = (data["test_features"], lookup[data["test_labels"]])
    try:
        tasks = split_into_tasks(len(classes), args.tasks)
    except ValueError as error:
        raise SystemExit(f"protokern cil: --tasks: {error}") from error

    if args.tukey is not None:
        if not args.tukey > 0:
            raise SystemExit(f"protokern cil: --tukey must be > 0, got {args.tukey}")
        if (train[0] < 0).any() or (test[0] < 0).any():
            raise SystemExit("protokern cil: --tukey needs non-negative features")
        train, test = (train[0].pow(args.tukey), train[1]), (test[0].pow(args.tukey), test[1])
    dim = train[0].shape[1]
    shape = "x".join(str(s) for s in train[0].shape[1:])
    print(f"protokern cil: {len(classes)} classes in {len(tasks)} tasks "
          f"({', '.join(str(len(t)) for t in tasks)} classes), features {shape}, "
          f"{len(train[1])} train / {len(test[1])} test samples")
    results: dict[str, CILMetrics] = {}
    seconds: dict[str, float] = {}
    matrices: dict[str, list] = {}
    for name in heads:
        start = time.perf_counter()
        accuracy, sizes = run_scenario(HEADS[name][1](dim, args.pool), train, test, tasks,
                                       progress=not args.no_progress, name=name)
        seconds[name] = time.perf_counter() - start
        results[name] = cil_metrics(accuracy, sizes)
        matrices[name] = accuracy.tolist()
    print(_format_table(results, seconds))
    print("accuracies in %; forgetting = mean drop from each old task's best accuracy")
    if args.json is not None:
        payload = {"tasks": [[t.start, t.stop] for t in tasks], "heads": {
            name: {"metrics": dataclasses.asdict(m),
                   "accuracy_matrix": matrices[name], "seconds": seconds[name]}
            for name, m in results.items()}}
        # allow_nan=False: an infinite number here would be a bug, better raised than written
        args.json.write_text(json.dumps(_undefined_as_null(payload), indent=2,
                                        allow_nan=False))
    return 0
