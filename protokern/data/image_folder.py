"""Real datasets from a local folder laid out as ``ROOT/<class name>/<image file>``.

The layout of torchvision's ``ImageFolder`` (and of the CUB-200 crops ProtoPNet trains on),
read with Pillow so that torchvision is not needed. Nothing is downloaded.
"""

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageFolder(Dataset):
    """Images of ``root/<class>/*`` resized to ``image_size x image_size``, in [0, 1].

    Classes are the sub-folders of ``root`` in sorted order (label = position in
    ``classes``). ``dataset[i]`` is ``(image (3, S, S) float32, label)``; images load lazily.

    Raises:
        FileNotFoundError: ``root`` is not a folder or holds no class folder with an image.
    """

    def __init__(self, root: str | Path, image_size: int = 224,
                 classes: list[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder: root {str(self.root)!r} is not a folder")
        if classes is None:
            classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.classes = list(classes)
        self.image_size = image_size
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            files = sorted(f for f in folder.iterdir()
                           if f.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
            self.samples.extend((f, label) for f in files)
        if not self.samples:
            raise FileNotFoundError(
                f"ImageFolder: no images ({', '.join(IMAGE_SUFFIXES)}) in class folders of "
                f"{str(self.root)!r}; expected ROOT/<class name>/<image file>")
        self.labels = torch.tensor([label for _, label in self.samples])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return load_image(path, self.image_size), label


def load_image(path: str | Path, image_size: int) -> Tensor:
    """One image file as ``(3, image_size, image_size)`` float32 in [0, 1] (RGB, resized)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
