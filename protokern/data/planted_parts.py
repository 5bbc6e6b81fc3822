"""The "planted parts" dataset: each class is a small motif planted on a textured background.

Every image shows its class's motif once, at a random position, among distractor motifs that
all classes share, on a random textured background. What tells the classes apart is therefore
one small part of the image, whose box is known: a prototype model should both classify the
images and point at the motif. Everything is drawn from ``seed``: the motifs (shared by the
splits) and the images of each split (separate streams), so a dataset is reproducible.
"""

import torch
from torch import Tensor
from torch.utils.data import Dataset

SPLITS = ("train", "test")


def _motifs(num_classes: int, num_distractors: int, size: int, generator: torch.Generator
            ) -> Tensor:
    """Distinct motifs ``(num_classes + num_distractors, 3, size, size)`` in [0, 1].

    A motif is a random 4x4 binary pattern (5 to 11 cells on, no two motifs alike) scaled up
    to ``size``, its "off" cells dark. Class ``k`` colours its "on" cells in the saturated hue
    ``k / num_classes``; the distractors in light grey, so that they stand out from the
    background as much as the class motifs do without telling any class apart.
    """
    count = num_classes + num_distractors
    patterns: list[Tensor] = []
    while len(patterns) < count:
        pattern = torch.rand(4, 4, generator=generator) < 0.5
        if 5 <= int(pattern.sum()) <= 11 and all(not torch.equal(pattern, p) for p in patterns):
            patterns.append(pattern)
    grid = torch.stack(patterns).float()[:, None]  # (count, 1, 4, 4)
    masks = torch.nn.functional.interpolate(grid, size=(size, size), mode="nearest")
    colours = torch.full((count, 3), 0.85)
    colours[:num_classes] = _hue_to_rgb(torch.arange(num_classes) / num_classes)
    return masks * colours[:, :, None, None] + (1 - masks) * 0.05


def _hue_to_rgb(hue: Tensor) -> Tensor:
    """``(N, 3)`` fully saturated, bright RGB colours of hues ``(N,)`` in [0, 1)."""
    k = (hue[:, None] * 6 + torch.tensor([5.0, 3.0, 1.0])) % 6
    return 1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _background(size: int, generator: torch.Generator) -> Tensor:
    """A ``(3, size, size)`` texture: smooth colour blobs plus fine grain, in [0.25, 0.75]."""
    coarse = torch.rand(1, 3, 6, 6, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic",
                                             align_corners=False)[0]
    grain = 0.15 * (torch.rand(3, size, size, generator=generator) - 0.5)
    return (0.25 + 0.5 * smooth + grain).clamp(0.0, 1.0)


def _free_position(size: int, motif_size: int, taken: list[tuple[int, int]],
                   generator: torch.Generator) -> tuple[int, int]:
    """A top-left corner ``(x, y)`` whose motif box overlaps none of ``taken`` (tries 100
    times, then accepts an overlap rather than loop forever on a crowded image)."""
    for _ in range(100):
        x, y = torch.randint(0, size - motif_size + 1, (2,), generator=generator).tolist()
        if all(abs(x - tx) >= motif_size or abs(y - ty) >= motif_size for tx, ty in taken):
            return x, y
    return x, y


class PlantedParts(Dataset):
    """Images whose class is given by one planted motif, with the motif's box.

    Args:
        num_classes: K, one motif per class.
        images_per_class: images of each class in this split.
        image_size: S, images are ``S x S``.
        seed: draws the motifs (the same for both splits) and the images.
        split: ``"train"`` or ``"test"``: independent images of the same classes.
        motif_size: side of a motif in pixels.
        num_distractors: motifs shared by all classes (drawn apart from the class motifs).
        distractors_per_image: how many of them each image shows, at random positions.

    Attributes:
        images: ``(N, 3, S, S)`` float32 in [0, 1], ``N = K * images_per_class``.
        labels: ``(N,)`` int64, classes in order ``0, ..., 0, 1, ...``.
        boxes: ``(N, 4)`` int64, the class motif's box ``(x0, y0, x1, y1)``, x1/y1 exclusive.
        motifs: ``(K + num_distractors, 3, motif_size, motif_size)``: class motifs, then
            distractors.
    """

    def __init__(self, num_classes: int = 10, images_per_class: int = 60, image_size: int = 64,
                 seed: int = 0, split: str = "train", *, motif_size: int = 14,
                 num_distractors: int = 4, distractors_per_image: int = 2) -> None:
        if split not in SPLITS:
            raise ValueError(f"PlantedParts: split must be one of {SPLITS}, got {split!r}")
        for name, value, low in (("num_classes", num_classes, 1),
                                 ("images_per_class", images_per_class, 1),
                                 ("motif_size", motif_size, 4),
                                 ("num_distractors", num_distractors, 0),
                                 ("distractors_per_image", distractors_per_image, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"PlantedParts: {name} must be an int >= {low}, got {value!r}")
        if not isinstance(image_size, int) or image_size < motif_size:
            raise ValueError(f"PlantedParts: image_size must be an int >= motif_size "
                             f"({motif_size}), got {image_size!r}")
        if distractors_per_image > num_distractors:
            raise ValueError(f"PlantedParts: distractors_per_image ({distractors_per_image}) "
                             f"exceeds num_distractors ({num_distractors})")
        self.num_classes = num_classes
        self.image_size = image_size
        self.split = split
        self.motifs = _motifs(num_classes, num_distractors, motif_size,
                              torch.Generator().manual_seed(seed))
        generator = torch.Generator().manual_seed(seed * len(SPLITS) + 1 + SPLITS.index(split))

        count = num_classes * images_per_class
        self.labels = torch.arange(num_classes).repeat_interleave(images_per_class)
        self.images = torch.empty(count, 3, image_size, image_size)
        self.boxes = torch.empty(count, 4, dtype=torch.int64)
        for i, label in enumerate(self.labels.tolist()):
            image = _background(image_size, generator)
            taken: list[tuple[int, int]] = []
            chosen = torch.randperm(num_distractors, generator=generator)[:distractors_per_image]
            for motif in [label] + (num_classes + chosen).tolist():
                x, y = _free_position(image_size, motif_size, taken, generator)
                taken.append((x, y))
                # brightness jitter, so that a motif is a shape and a hue, not exact pixels
                scale = 0.8 + 0.4 * torch.rand((), generator=generator)
                image[:, y:y + motif_size, x:x + motif_size] = (self.motifs[motif] * scale
                                                                ).clamp(0, 1)
            x, y = taken[0]
            self.images[i] = image
            self.boxes[i] = torch.tensor([x, y, x + motif_size, y + motif_size])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])
