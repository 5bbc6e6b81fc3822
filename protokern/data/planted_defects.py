"""The "planted defects" dataset, for anomaly detection: images of normal parts on a textured
background (the planted-parts generator's backgrounds and grey motifs), and the same scenes
with one defect planted, whose pixel mask is known.

Defects, like those of MVTec AD's categories: a ``scratch`` (a thin coloured line), a ``stain``
(a coloured disc) and a ``foreign`` part (a coloured motif no normal image shows). Their
colours are saturated hues, which neither the backgrounds (every channel in [0.25, 0.75]) nor
the grey parts have. Everything is drawn from ``seed``; the splits use separate streams.
"""

import math

import torch
from torch import Tensor
from torch.utils.data import Dataset

from protokern.data.planted_parts import _background, _free_position, _hue_to_rgb, _motifs

SPLITS = ("train", "test")
DEFECTS = ("scratch", "stain", "foreign")


def _scratch(size: int, generator: torch.Generator) -> Tensor:
    """A ``(size, size)`` mask of a 2-pixel-wide segment, 10 to 24 pixels long."""
    length = 10 + 14 * float(torch.rand((), generator=generator))
    angle = math.pi * float(torch.rand((), generator=generator))
    x0, y0 = (4 + (size - 8) * torch.rand(2, generator=generator)).tolist()
    dx, dy = math.cos(angle), math.sin(angle)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    along = (xs - x0) * dx + (ys - y0) * dy  # position along the line, from its start
    across = -(xs - x0) * dy + (ys - y0) * dx
    return (along >= 0) & (along <= length) & (across.abs() <= 1.0)


def _stain(size: int, generator: torch.Generator) -> Tensor:
    """A ``(size, size)`` mask of a disc of radius 2.5 to 5 pixels."""
    radius = 2.5 + 2.5 * float(torch.rand((), generator=generator))
    cx, cy = (radius + (size - 2 * radius) * torch.rand(2, generator=generator)).tolist()
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2


class PlantedDefects(Dataset):
    """Normal and defective images with each defect's pixel mask.

    Args:
        num_images: images in this split.
        image_size: S, images are ``S x S``.
        seed: draws the parts (shared by the splits) and the images.
        split: ``"train"``: normal images only (what an anomaly detector is fitted on);
            ``"test"``: ``defect_fraction`` of them defective, the rest normal.
        defect_fraction: the share of defective test images.
        motif_size: side of a part in pixels.
        num_part_kinds: kinds of normal parts; each image shows ``parts_per_image`` of them.

    Attributes:
        images: ``(N, 3, S, S)`` float32 in [0, 1].
        masks: ``(N, S, S)`` bool, the defect's pixels (all False for a normal image).
        labels: ``(N,)`` int64, 1 for a defective image.
        defects: ``(N,)`` int64, the index in `DEFECTS` of the image's defect, -1 if normal.
    """

    def __init__(self, num_images: int = 100, image_size: int = 64, seed: int = 0,
                 split: str = "train", *, defect_fraction: float = 0.5, motif_size: int = 12,
                 num_part_kinds: int = 3, parts_per_image: int = 2) -> None:
        if split not in SPLITS:
            raise ValueError(f"PlantedDefects: split must be one of {SPLITS}, got {split!r}")
        for name, value, low in (("num_images", num_images, 1), ("motif_size", motif_size, 4),
                                 ("num_part_kinds", num_part_kinds, 1),
                                 ("parts_per_image", parts_per_image, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"PlantedDefects: {name} must be an int >= {low}, got "
                                 f"{value!r}")
        if not isinstance(image_size, int) or image_size < 2 * motif_size:
            raise ValueError(f"PlantedDefects: image_size must be an int >= 2 * motif_size "
                             f"({2 * motif_size}), got {image_size!r}")
        if not 0 <= defect_fraction <= 1:
            raise ValueError(f"PlantedDefects: defect_fraction must be in [0, 1], got "
                             f"{defect_fraction!r}")
        # one class motif (the foreign part, recoloured per image) after the normal parts
        motifs = _motifs(1, num_part_kinds, motif_size, torch.Generator().manual_seed(seed))
        self.parts, foreign = motifs[1:], (motifs[0].amax(0) > 0.5)
        generator = torch.Generator().manual_seed(seed * len(SPLITS) + 1 + SPLITS.index(split))
        defective = round(num_images * defect_fraction) if split == "test" else 0
        self.labels = (torch.arange(num_images) < defective).long()
        self.images = torch.empty(num_images, 3, image_size, image_size)
        self.masks = torch.zeros(num_images, image_size, image_size, dtype=torch.bool)
        self.defects = torch.full((num_images,), -1, dtype=torch.int64)
        for i in range(num_images):
            image = _background(image_size, generator)
            taken: list[tuple[int, int]] = []
            for kind in torch.randint(num_part_kinds, (parts_per_image,),
                                      generator=generator).tolist():
                x, y = _free_position(image_size, motif_size, taken, generator)
                taken.append((x, y))
                scale = 0.8 + 0.4 * torch.rand((), generator=generator)
                image[:, y:y + motif_size, x:x + motif_size] = (self.parts[kind] * scale
                                                                ).clamp(0, 1)
            if self.labels[i]:
                kind = int(torch.randint(len(DEFECTS), (), generator=generator))
                colour = _hue_to_rgb(torch.rand(1, generator=generator))[0]
                if DEFECTS[kind] == "foreign":
                    x, y = _free_position(image_size, motif_size, taken, generator)
                    mask = torch.zeros(image_size, image_size, dtype=torch.bool)
                    mask[y:y + motif_size, x:x + motif_size] = foreign
                else:
                    mask = (_scratch if DEFECTS[kind] == "scratch" else _stain)(image_size,
                                                                                generator)
                image = torch.where(mask, colour[:, None, None], image)
                self.masks[i], self.defects[i] = mask, kind
            self.images[i] = image

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])
