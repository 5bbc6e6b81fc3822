"""`protokern anomaly`: a PatchCore-style anomaly detector on generated images with planted
defects, on the CPU, in a few minutes.

It fits `protokern.nn.PatchMemoryBank` (greedy k-center coreset, nearest-patch scores,
PatchCore's reweighting) on the patch features of normal images, scores test images with
scratches, stains and foreign parts (`protokern.data.PlantedDefects`), and prints the image
AUROC (defective vs normal images) and the pixel AUROC (defect pixels vs the rest, from the
upsampled, blurred patch scores, as PatchCore evaluates localisation), and the time and peak
memory of the detector next to anomalib's formulation of it (a Python-loop coreset with an
``(N, D)`` temporary per step, and ``cdist`` scoring over the full ``(n, bank)`` matrix) on the
same features. It writes heatmap PNGs and a summary.json.

Features: PatchCore reads two intermediate levels of an ImageNet-pretrained WideResNet. No
weights are downloaded here: the two levels are stood in for by the image's colours at two
scales (means over 2x2 and 4x4 pixels), each with its 3x3 neighbourhood, PatchCore's local
aggregation, at a stride of 2 pixels.
"""

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from protokern.bench.measure import fix_malloc_threshold, reset_rss_peak, rss_bytes
from protokern.data.planted_defects import PlantedDefects
from protokern.nn import PatchMemoryBank
from protokern.nn.coreset import johnson_lindenstrauss_dim, sparse_random_projection

FEATURE_STRIDE = 2
"""Pixels per patch-feature position."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``protokern anomaly``; the defaults are the run the README reports."""
    parser.add_argument("--output", default="protokern-anomaly",
                        help="folder for the heatmap PNGs and summary.json")
    parser.add_argument("--train-images", type=int, default=100,
                        help="normal images the memory bank is built from")
    parser.add_argument("--test-images", type=int, default=100,
                        help="test images, half of them with a planted defect")
    parser.add_argument("--image-size", type=int, default=64, help="side of the square images")
    parser.add_argument("--coreset-ratio", type=float, default=0.02,
                        help="share of the normal patches the coreset keeps")
    parser.add_argument("--neighbors", type=int, default=9,
                        help="PatchCore's reweighting neighbours (1: the plain maximum)")
    parser.add_argument("--projection", default="none",
                        help="coreset on a sparse random projection: a dimension, 'auto' "
                             "(Johnson-Lindenstrauss at eps 0.9, as anomalib, which pays for "
                             "features of hundreds of dimensions, not these 54) or 'none'")
    parser.add_argument("--heatmaps", type=int, default=8, help="test images drawn as PNG")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip anomalib's cdist formulation (its time and peak memory)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data and the coreset")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def patch_features(images: Tensor) -> Tensor:
    """``(B, 3, S, S)`` images -> ``(B, 54, S/2, S/2)`` patch features (module docstring): two
    colour scales, each with its 3x3 neighbourhood."""
    fine = F.avg_pool2d(images, 2)  # (B, 3, S/2, S/2)
    coarse = F.interpolate(F.avg_pool2d(images, 4), scale_factor=2, mode="bilinear",
                           align_corners=False)
    levels = [F.unfold(F.pad(level, (1, 1, 1, 1), mode="replicate"), 3).view(
        images.shape[0], 27, *fine.shape[2:]) for level in (fine, coarse)]
    return torch.cat(levels, 1)


def anomaly_maps(patch_scores: Tensor, image_size: int, sigma: float = 2.0) -> Tensor:
    """``(B, h, w)`` patch scores -> ``(B, S, S)`` pixel scores: bilinear upsampling, then a
    Gaussian blur (PatchCore blurs with sigma 4 at 224 pixels; sigma scales with the image)."""
    maps = F.interpolate(patch_scores[:, None], size=(image_size, image_size), mode="bilinear",
                         align_corners=False)
    radius = int(3 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    maps = F.conv2d(F.pad(maps, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    maps = F.conv2d(F.pad(maps, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return maps[:, 0]


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of ``scores`` ``(N,)`` for binary ``labels`` ``(N,)``: the
    probability that a positive outscores a negative, ties counting one half (Mann-Whitney U
    from mid-ranks). ValueError without both classes."""
    scores, labels = scores.reshape(-1).double(), labels.reshape(-1).bool()
    if scores.shape != labels.shape:
        raise ValueError(f"auroc: scores {tuple(scores.shape)} and labels "
                         f"{tuple(labels.shape)} differ in length")
    positives = int(labels.sum())
    negatives = labels.numel() - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"auroc: labels need both classes, got {positives} positives and "
                         f"{negatives} negatives")
    order = scores.argsort()
    _, inverse, counts = torch.unique_consecutive(scores[order], return_inverse=True,
                                                  return_counts=True)
    ends = counts.cumsum(0).double()
    mid_ranks = (ends - (counts.double() - 1) / 2)[inverse]  # 1-based, ties averaged
    positive_ranks = mid_ranks[labels[order]].sum()
    return float((positive_ranks - positives * (positives + 1) / 2) / (positives * negatives))


def cdist_k_center(features: Tensor, num_centers: int, start: int) -> Tensor:
    """anomalib's `KCenterGreedy`: the same selection as `protokern.nn.coreset.k_center_greedy`
    with an ``(N, D)`` temporary ``features - center`` every step."""
    selected = [start]
    nearest = torch.linalg.norm(features - features[start], dim=1)
    nearest[start] = float("-inf")
    for _ in range(num_centers - 1):
        center = int(nearest.argmax())
        selected.append(center)
        nearest = torch.minimum(nearest, torch.linalg.norm(features - features[center], dim=1))
        nearest[selected] = float("-inf")
    return torch.tensor(selected)


def cdist_scores(bank: Tensor, features: Tensor, neighbors: int) -> tuple[Tensor, Tensor]:
    """anomalib's `PatchcoreModel` scoring: the full ``(n, bank)`` ``cdist`` matrix, the
    nearest row of each patch, and equation 7's reweighting: ``(B, h, w)`` and ``(B,)``."""
    batch, dim, height, width = features.shape
    embedding = features.permute(0, 2, 3, 1).reshape(-1, dim)
    distances = torch.cdist(embedding, bank)  # (n, bank): what PatchMemoryBank never holds
    patch_scores, locations = distances.min(1)
    patch_scores, locations = patch_scores.view(batch, -1), locations.view(batch, -1)
    image_scores = patch_scores.amax(1)
    if neighbors > 1:
        rows = torch.arange(batch)
        worst = patch_scores.argmax(1)
        support = torch.cdist(bank[locations[rows, worst]], bank).topk(neighbors, largest=False
                                                                       ).indices
        queries = embedding.view(batch, -1, dim)[rows, worst]
        to_support = torch.cdist(queries[:, None], bank[support])[:, 0]
        image_scores = image_scores * (1 - to_support.softmax(1)[:, 0])
    return patch_scores.view(batch, height, width), image_scores


def measured(step: Callable[[], object]) -> tuple[object, float, int]:
    """``step()``'s result, seconds and peak resident memory beyond what was resident before
    (``VmHWM`` after a reset; `protokern.bench.measure`)."""
    reset_rss_peak()
    baseline = rss_bytes("VmRSS")
    started = time.perf_counter()
    result = step()
    return result, time.perf_counter() - started, rss_bytes("VmHWM") - baseline


def render_heatmap(image: Tensor, pixel_scores: Tensor, mask: Tensor, path: Path,
                   high: float) -> Path:
    """A PNG of the image, its heatmap over it, and the true defect mask, side by side."""
    rgb = image.permute(1, 2, 0).clamp(0, 1)
    heat = (pixel_scores / high).clamp(0, 1)[..., None]
    grey = rgb.mean(-1, keepdim=True).expand(-1, -1, 3)
    overlay = 0.3 * grey + 0.7 * torch.cat([heat, 0.4 * (1 - (2 * heat - 1).abs()), 1 - heat], -1)
    truth = mask.float()[..., None].expand(-1, -1, 3)
    gap = torch.ones(rgb.shape[0], 2, 3)
    row = torch.cat([rgb, gap, overlay, gap, truth], 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((row.numpy() * 255).astype(np.uint8)).resize(
        (row.shape[1] * 4, row.shape[0] * 4), Image.NEAREST).save(path)
    return path


def run(args: argparse.Namespace) -> int:
    """``protokern anomaly``: prints the results and writes them under ``--output``."""
    started = time.perf_counter()
    fix_malloc_threshold()  # freed blocks leave the resident set: peaks are per stage
    output = Path(args.output)
    projection = None if args.projection == "none" else (
        args.projection if args.projection == "auto" else int(args.projection))
    print(f"Generating planted-defects data: {args.train_images} normal train images, "
          f"{args.test_images} test images (half defective), {args.image_size}x"
          f"{args.image_size}")
    train_set = PlantedDefects(args.train_images, args.image_size, args.seed, "train")
    test_set = PlantedDefects(args.test_images, args.image_size, args.seed, "test")
    train_features = patch_features(train_set.images)
    test_features = patch_features(test_set.images)
    patches = train_features.shape[0] * train_features.shape[2] * train_features.shape[3]
    memory = PatchMemoryBank(train_features.shape[1], coreset_ratio=args.coreset_ratio,
                             num_neighbors=args.neighbors, projection=projection,
                             seed=args.seed, progress=not args.no_progress)
    _, fit_seconds, fit_peak = measured(lambda: memory.fit(train_features))
    print(f"PatchMemoryBank: {int(memory.bank_size)} of {patches} normal patches "
          f"(D={memory.dim}) kept by the greedy coreset in {fit_seconds:.1f} s")
    scores, score_seconds, score_peak = measured(lambda: memory.score(test_features))
    pixel_scores = anomaly_maps(scores.patch_scores, args.image_size)
    image_auroc = auroc(scores.image_scores, test_set.labels)
    pixel_auroc = auroc(pixel_scores, test_set.masks)

    summary = {
        "image_auroc": image_auroc, "pixel_auroc": pixel_auroc,
        "train_images": args.train_images, "test_images": args.test_images,
        "image_size": args.image_size, "normal_patches": patches, "dim": memory.dim,
        "bank_size": int(memory.bank_size), "neighbors": args.neighbors,
        "projection": args.projection,
        "protokern": {"coreset_seconds": fit_seconds, "coreset_peak_bytes": fit_peak,
                      "score_seconds": score_seconds, "score_peak_bytes": score_peak},
    }
    if not args.no_compare:
        points = train_features.permute(0, 2, 3, 1).reshape(-1, memory.dim)
        start = int(torch.randint(patches, (), generator=torch.Generator().manual_seed(
            args.seed)))
        chosen_on = points
        if projection is not None:  # the same projection the bank's coreset used
            dim = johnson_lindenstrauss_dim(patches, memory.eps) if projection == "auto" else (
                projection)
            chosen_on = sparse_random_projection(points, dim, args.seed)
        selected, loop_seconds, loop_peak = measured(
            lambda: cdist_k_center(chosen_on, int(memory.bank_size), start))
        bank = points[selected]
        (_, cdist_images), cdist_seconds, cdist_peak = measured(
            lambda: cdist_scores(bank, test_features, args.neighbors))
        summary["cdist"] = {"coreset_seconds": loop_seconds, "coreset_peak_bytes": loop_peak,
                            "score_seconds": cdist_seconds, "score_peak_bytes": cdist_peak,
                            "same_bank": bool(torch.equal(bank, memory.bank)),
                            "image_scores_max_abs_difference": float(
                                (cdist_images - scores.image_scores).abs().max())}

    high = float(pixel_scores.quantile(0.999))
    written = []
    for k in range(min(args.heatmaps, len(test_set))):
        index = k * len(test_set) // max(args.heatmaps, 1)  # defective and normal ones
        kind = "normal" if test_set.labels[index] == 0 else "defect"
        written.append(render_heatmap(test_set.images[index], pixel_scores[index],
                                      test_set.masks[index],
                                      output / "heatmaps" / f"test_{index:04d}_{kind}.png", high))
    summary["total_seconds"] = time.perf_counter() - started
    output.mkdir(parents=True, exist_ok=True)
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(f"\nimage AUROC: {image_auroc:.3f} (defective vs normal test images)")
    print(f"pixel AUROC: {pixel_auroc:.3f} (defect pixels vs the rest, from the heatmaps)")
    mib = 2 ** 20
    print(f"protokern: coreset {fit_seconds:.2f} s, peak {fit_peak / mib:.0f} MiB; scoring "
          f"{score_seconds:.2f} s, peak {score_peak / mib:.0f} MiB")
    if "cdist" in summary:
        c = summary["cdist"]
        print(f"anomalib's cdist formulation: coreset {c['coreset_seconds']:.2f} s, peak "
              f"{c['coreset_peak_bytes'] / mib:.0f} MiB; scoring {c['score_seconds']:.2f} s, "
              f"peak {c['score_peak_bytes'] / mib:.0f} MiB (same bank: {c['same_bank']}, "
              f"image scores within {c['image_scores_max_abs_difference']:.1e})")
    print(f"heatmaps: {len(written)} PNGs (image, heatmap, true defect) in {output / 'heatmaps'}")
    print(f"total time {summary['total_seconds']:.0f} s")
    return 0
