"""Push (prototype projection): replace each prototype by its nearest training patch.

For every prototype, the nearest patch of the add-on feature maps among the training images of
the prototype's class (the paper's class-specific push), over the whole dataset. Each batch
goes through the fused `protokern.min_distance` once, giving ``(B, M)`` minima and positions;
a running minimum and argmin over batches is all that is kept, so memory does not grow with
the dataset and no distance map is ever stored.
"""

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from protokern.models.protopnet import ProtoPNet
from protokern.ops import min_distance


@dataclass
class PushRecord:
    """Where every prototype came from; all tensors have M rows.

    Attributes:
        image_index: ``(M,)`` int64, the index in the dataset of the source image (-1 for a
            prototype whose class has no image; it is left unchanged).
        position: ``(M, 2)`` int64, ``(row, col)`` of the patch's top-left cell in the feature
            map.
        box: ``(M, 4)`` int64, the patch's receptive field in the image ``(x0, y0, x1, y1)``,
            x1/y1 exclusive.
        distance: ``(M,)`` the distance before the prototype was replaced.
        source_patches: M uint8 tensors ``(3, y1 - y0, x1 - x0)``: the image region in ``box``
            of each source image (empty for an unchanged prototype), for explanations.
    """

    image_index: Tensor
    position: Tensor
    box: Tensor
    distance: Tensor
    source_patches: list[Tensor]


@torch.no_grad()
def push_prototypes(model: ProtoPNet, dataset: Dataset, batch_size: int = 64,
                    progress: bool = True) -> PushRecord:
    """Project every prototype onto its nearest same-class training patch, in place.

    ``dataset[i]`` is ``(image (3, S, S) in [0, 1], label)``; it is read in order, without
    augmentation. Ties between images go to the lowest image index, ties within an image to
    the lowest position (`min_distance`'s rule). The model is put in eval mode for the pass and
    its mode restored.
    """
    was_training = model.training
    model.eval()
    layer = model.prototype_layer
    prototypes = layer.prototype_vectors
    num, _, ph, pw = prototypes.shape
    device = prototypes.device
    classes = model.prototype_classes  # (M,)

    best_distance = torch.full((num,), float("inf"), device=device, dtype=torch.float64)
    best_image = torch.full((num,), -1, dtype=torch.int64, device=device)
    best_position = torch.zeros(num, dtype=torch.int64, device=device)
    best_patch = prototypes.detach().clone()
    offset = 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for images, labels in tqdm(loader, desc="push", disable=not progress, leave=False):
        images, labels = images.to(device), labels.to(device)
        features = model.conv_features(images)  # (B, D, H, W)
        values, indices = min_distance(features, prototypes, layer.metric)  # (B, M)
        values = values.double().masked_fill(labels[:, None] != classes[None, :], float("inf"))
        batch_min, batch_image = values.min(0)  # (M,): first image on ties
        better = batch_min < best_distance  # strict: an earlier batch keeps its tie
        if better.any():
            which = better.nonzero()[:, 0]
            image = batch_image[which]
            position = indices[image, which]
            width = features.shape[3] - pw + 1
            rows, cols = position // width, position % width
            for m, b, r, c in zip(which.tolist(), image.tolist(), rows.tolist(), cols.tolist()):
                best_patch[m] = features[b, :, r:r + ph, c:c + pw]
            best_distance[which] = batch_min[which]
            best_image[which] = image + offset
            best_position[which] = position
        offset += len(images)

    found = best_image >= 0
    prototypes.data[found] = best_patch[found]
    model.train(was_training)
    return _record(model, dataset, best_image, best_position, best_distance)


def _record(model: ProtoPNet, dataset: Dataset, image_index: Tensor, position: Tensor,
            distance: Tensor) -> PushRecord:
    """Boxes and source images of the pushed prototypes."""
    num, _, ph, pw = model.prototype_layer.prototype_vectors.shape
    width = model.feature_size[1] - pw + 1
    rows, cols = position // width, position % width
    size = model.image_size
    boxes = torch.tensor([model.receptive_field.box(r, c, (ph, pw), size)
                          for r, c in zip(rows.tolist(), cols.tolist())], dtype=torch.int64)
    source_patches = []
    for (x0, y0, x1, y1), index in zip(boxes.tolist(), image_index.tolist()):
        image = dataset[index][0] if index >= 0 else torch.zeros(3, 0, 0)
        crop = image[:, y0:y1, x0:x1] if index >= 0 else image
        source_patches.append((crop * 255).round().clamp(0, 255).to(torch.uint8))
    return PushRecord(image_index.cpu(), torch.stack([rows, cols], 1).cpu(), boxes,
                      distance.float().cpu(), source_patches)
