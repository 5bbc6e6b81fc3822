"""Push (prototype projection): replace each prototype by its nearest training patch.

For every prototype, the nearest patch of the add-on feature maps among the training images of
the prototype's class (the paper's class-specific push), over the whole dataset. Each batch
goes through the fused `protokern.min_distance` once, giving ``(B, M)`` minima and positions;
a running minimum and argmin over batches is all that is kept, so memory does not grow with
the dataset and no distance map is ever stored.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from protokern.distributed.collectives import gather_from_processes
from protokern.distributed.processes import is_distributed, world
from protokern.models.protopnet import ProtoPNet
from protokern.ops import min_distance


@dataclass
class PushSearch:
    """Per prototype, its nearest patch among the searched images of its class; all ``M`` rows.

    Attributes:
        distance: ``(M,)`` float64 (``inf`` where no image of the class was searched).
        image_index: ``(M,)`` int64 index of the image over all the batches, in order (-1
            where none).
        position: ``(M,)`` int64 flat row-major index into ``H' x W'`` of the patch.
        patch: ``(M, D, ph, pw)`` the patch, in the prototypes' dtype (the prototype itself
            where none was found), ready to copy into the prototypes.
    """

    distance: Tensor
    image_index: Tensor
    position: Tensor
    patch: Tensor


@torch.no_grad()
def push_search(features_batches: Iterable[Tensor] | Iterable[tuple[Tensor, Tensor]],
                prototypes: Tensor, labels: Iterable[Tensor] | None,
                prototype_classes: Tensor | None,
                metric: str = "sqeuclidean", *, progress: bool = False) -> PushSearch:
    """ProtoPNet's push search, streamed: per prototype, the nearest patch over every batch of
    features among the images of its class, with no distance map held.

    Each batch goes through the fused `protokern.min_distance` once (``(B, M)`` minima and
    positions); a running minimum, argmin and patch per prototype is all that is carried
    across batches, so memory does not grow with the data set. For a ported model: feed it
    the add-on features of the training set, then copy ``result.patch`` into the prototypes
    (where ``result.image_index >= 0``).

    Args:
        features_batches: ``(B, D, H, W)`` feature maps (or ``(B, L, D)`` tokens), one per
            batch, e.g. a generator over a DataLoader; ``B`` may vary. With ``labels=None``,
            ``(features, labels)`` pairs instead (one pass over a loader).
        prototypes: ``(M, D)``, ``(M, D, 1, 1)`` or ``(M, D, ph, pw)``.
        labels: ``(B,)`` int labels of each batch's images, zipped with ``features_batches``
            (the same number of batches; ValueError otherwise), or None (pairs).
        prototype_classes: ``(M,)`` the class of each prototype (class-specific push), or
            None to search every image.
        metric: as in `protokern.min_distance` (ProtoPNet: ``"sqeuclidean"``).
        progress: a tqdm bar over the batches.

    Ties between images go to the earliest image (over the batches, in order), within an
    image to the lowest position (`min_distance`'s rule).
    """
    four_d = prototypes if prototypes.dim() == 4 else prototypes[:, :, None, None]
    num, _, ph, pw = four_d.shape
    device = prototypes.device
    best_distance = torch.full((num,), float("inf"), device=device, dtype=torch.float64)
    best_image = torch.full((num,), -1, dtype=torch.int64, device=device)
    best_position = torch.zeros(num, dtype=torch.int64, device=device)
    best_patch = four_d.detach().clone()
    offset = 0
    batches = features_batches if labels is None else zip(features_batches, labels,
                                                          strict=True)
    for features, batch_labels in tqdm(batches, desc="push", disable=not progress, leave=False):
        if features.dim() == 3:  # tokens (B, L, D) -> (B, D, L, 1), as min_distance reads them
            features = features.transpose(1, 2).unsqueeze(-1)
        values, indices = min_distance(features, four_d, metric)  # (B, M)
        values = values.double()
        if prototype_classes is not None:
            other_class = batch_labels.to(device)[:, None] != prototype_classes[None, :]
            values = values.masked_fill(other_class, float("inf"))
        batch_min, batch_image = values.min(0)  # (M,): first image on ties
        better = batch_min < best_distance  # strict: an earlier batch keeps its tie
        if better.any():
            which = better.nonzero()[:, 0]
            image = batch_image[which]
            position = indices[image, which]
            width = features.shape[3] - pw + 1
            rows, cols = position // width, position % width
            for m, b, r, c in zip(which.tolist(), image.tolist(), rows.tolist(), cols.tolist(),
                                  strict=True):
                best_patch[m] = features[b, :, r:r + ph, c:c + pw]
            best_distance[which] = batch_min[which]
            best_image[which] = image + offset
            best_position[which] = position
        offset += features.shape[0]
    return PushSearch(best_distance, best_image, best_position,
                      best_patch.view(prototypes.shape))


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

    With several processes (`protokern.distributed.processes`), each searches a contiguous run
    of whole batches of the dataset, the same batches one process would read, so its distances
    are the ones a single process computes; per prototype the smallest distance over the processes
    wins, ties going to the lowest image index, and every process sets the winning patch. The
    result equals a single-process push; every process must hold the whole ``dataset``.
    """
    was_training = model.training
    model.eval()
    prototypes = model.prototype_layer.prototype_vectors
    shard = _shard_of_this_process(len(dataset), batch_size)
    distance, image, position, patch = _nearest_patches(model, Subset(dataset, shard),
                                                        shard.start, batch_size, progress)
    if is_distributed():
        distance, image, position, patch = _nearest_across_processes(distance, image,
                                                                     position, patch)
    found = image >= 0
    prototypes.data[found] = patch[found]
    model.train(was_training)
    return _record(model, dataset, image, position, distance)


def _shard_of_this_process(num_images: int, batch_size: int) -> range:
    """The images this process searches: a contiguous run of whole ``batch_size`` batches,
    runs in rank order (a process may get none)."""
    rank, size = world()
    batches = -(-num_images // batch_size)
    first, last = rank * batches // size, (rank + 1) * batches // size
    return range(min(first * batch_size, num_images), min(last * batch_size, num_images))


def _nearest_patches(model: ProtoPNet, dataset: Dataset, first_index: int, batch_size: int,
                     progress: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per prototype, the nearest same-class patch in ``dataset`` (whose image ``i`` is image
    ``first_index + i`` of the whole data): ``(M,)`` float64 distances (inf where none),
    ``(M,)`` image indices (-1 where none), ``(M,)`` flat positions and ``(M, D, ph, pw)``
    patches (the prototype itself where none)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    device = model.prototype_layer.prototype_vectors.device
    pairs = ((model.conv_features(images.to(device)), labels) for images, labels in loader)
    found = push_search(pairs, model.prototype_layer.prototype_vectors, None,
                        model.prototype_classes, model.metric, progress=progress)
    image = torch.where(found.image_index >= 0, found.image_index + first_index, -1)
    return found.distance, image, found.position, found.patch


def _nearest_across_processes(distance: Tensor, image: Tensor, position: Tensor, patch: Tensor
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every process's `_nearest_patches` results reduced to the global ones, identical on
    every process: per prototype the smallest distance, on ties the lowest image index."""
    distances = gather_from_processes(distance)  # (P, M)
    images = gather_from_processes(image)
    tied = distances == distances.min(0).values  # all processes tie where none found (inf)
    # a process that found nothing has image -1 but distance inf, so it is never tied with a
    # process that found something
    winner = torch.where(tied, images, torch.iinfo(torch.int64).max).argmin(0)  # (M,)
    columns = torch.arange(len(winner), device=winner.device)
    return (distances[winner, columns], images[winner, columns],
            gather_from_processes(position)[winner, columns],
            gather_from_processes(patch)[winner, columns])


def _record(model: ProtoPNet, dataset: Dataset, image_index: Tensor, position: Tensor,
            distance: Tensor) -> PushRecord:
    """Boxes and source images of the pushed prototypes."""
    _, _, ph, pw = model.prototype_layer.prototype_vectors.shape
    width = model.feature_size[1] - pw + 1
    rows, cols = position // width, position % width
    size = model.image_size
    boxes = torch.tensor([model.receptive_field.box(r, c, (ph, pw), size)
                          for r, c in zip(rows.tolist(), cols.tolist(), strict=True)],
                         dtype=torch.int64)
    source_patches = []
    for (x0, y0, x1, y1), index in zip(boxes.tolist(), image_index.tolist(), strict=True):
        image = dataset[index][0] if index >= 0 else torch.zeros(3, 0, 0)
        crop = image[:, y0:y1, x0:x1] if index >= 0 else image
        source_patches.append((crop * 255).round().clamp(0, 255).to(torch.uint8))
    return PushRecord(image_index.cpu(), torch.stack([rows, cols], 1).cpu(), boxes,
                      distance.float().cpu(), source_patches)
