"""Push finds the patches a brute force over the whole (small) dataset finds."""

import pytest
import torch
from cases import METRICS

from protokern.data import PlantedParts
from protokern.models.backbones import build_backbone
from protokern.models.protopnet import ProtoPNet
from protokern.models.push import push_prototypes
from protokern.testing import TOLERANCE


def brute_force_push(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                     classes: torch.Tensor, metric: str):
    """For each prototype: (image, row, col, distance) of its nearest same-class patch,
    from every distance of every image, in float64 (first image, then first position, on
    ties)."""
    x, p = features.double(), prototypes.double()
    _, _, ph, pw = p.shape
    windows = x.unfold(2, ph, 1).unfold(3, pw, 1)  # (N, D, H', W', ph, pw)
    windows = windows.permute(0, 2, 3, 1, 4, 5).flatten(3)  # (N, H', W', D*ph*pw)
    flat_p = p.flatten(1)  # (M, K)
    if metric == "cosine":
        dot = torch.einsum("nhwk,mk->nmhw", windows, flat_p)
        norms = (windows.norm(dim=-1).clamp_min(1e-8)[:, None]
                 * flat_p.norm(dim=1).clamp_min(1e-8)[None, :, None, None])
        distances = 1 - dot / norms
    else:
        distances = ((windows[:, None] - flat_p[None, :, None, None]) ** 2).sum(-1)
    n, m, h, w = distances.shape
    distances = distances.masked_fill(labels[:, None, None, None] != classes[None, :, None, None],
                                      float("inf"))
    best = distances.permute(1, 0, 2, 3).reshape(m, -1).min(1)
    image, position = best.indices // (h * w), best.indices % (h * w)
    return image, position // w, position % w, best.values, distances


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("patch", [(1, 1), (2, 2)])
def test_push_matches_brute_force(cpu_backend, metric, patch):
    data = PlantedParts(3, 7, 32, seed=3, motif_size=8)
    model = ProtoPNet(build_backbone(), 3, 32, prototypes_per_class=3, prototype_dim=16,
                      prototype_patch=patch, metric=metric).eval()
    original = model.prototype_layer.prototype_vectors.detach().clone()
    with torch.no_grad():
        features = model.conv_features(data.images)
    image, row, col, distance, all_distances = brute_force_push(
        features, data.labels, original, model.prototype_classes, metric)

    record = push_prototypes(model, data, batch_size=4, progress=False)  # 6 batches

    tol = TOLERANCE[torch.float32]
    chosen = all_distances[record.image_index, torch.arange(len(image)), record.position[:, 0],
                           record.position[:, 1]]
    # the chosen patch is the brute force's, or one whose distance ties it (DESIGN §5)
    assert (chosen - distance <= tol * distance.abs().max().clamp_min(1)).all()
    runner_up = all_distances.permute(1, 0, 2, 3).flatten(1).sort(1).values[:, 1]
    clear = runner_up - distance > tol * distance.abs().max().clamp_min(1)
    assert clear.any()
    assert torch.equal(record.image_index[clear], image[clear])
    assert torch.equal(record.position[clear], torch.stack([row, col], 1)[clear])
    # each prototype's image is of its class, and the prototype is now that patch exactly
    assert torch.equal(data.labels[record.image_index], model.prototype_classes)
    ph, pw = patch
    pushed = model.prototype_layer.prototype_vectors
    pairs = zip(record.image_index.tolist(), record.position.tolist(), strict=True)
    for m, (i, (r, c)) in enumerate(pairs):
        assert torch.equal(pushed[m], features[i, :, r:r + ph, c:c + pw])
        x0, y0, x1, y1 = record.box[m].tolist()
        assert record.source_patches[m].shape == (3, y1 - y0, x1 - x0)
    # so a pushed prototype's nearest patch on its source image is at distance ~0 (cosine:
    # the same direction)
    values, _ = model.prototype_layer(features[record.image_index])
    own = values[torch.arange(len(image)), torch.arange(len(image))]
    assert own.abs().max() <= 1e-5


def test_push_leaves_prototypes_of_a_class_without_images():
    data = PlantedParts(2, 3, 32, seed=0, motif_size=8)
    model = ProtoPNet(build_backbone(), 3, 32, prototypes_per_class=2, prototype_dim=8)
    before = model.prototype_layer.prototype_vectors.detach().clone()
    record = push_prototypes(model, data, progress=False)
    assert record.image_index[4:].tolist() == [-1, -1]  # class 2 has no image
    assert torch.equal(model.prototype_layer.prototype_vectors[4:], before[4:])
    assert (record.image_index[:4] >= 0).all()
