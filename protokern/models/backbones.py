"""Backbones for ProtoPNet: a small built-in CNN, or torchvision/timm networks when installed.

A backbone maps ``(B, 3, S, S)`` images in [0, 1] to a ``(B, C, H, W)`` feature map; it
normalises its input itself, so datasets, push and explanations all work on plain [0, 1]
images. Pretrained weights come only from a local file (``weights=PATH``), never a download.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as buffers (saved with the model)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean)[:, None, None])
        self.register_buffer("std", torch.tensor(std)[:, None, None])

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


@dataclass(frozen=True)
class ReceptiveField:
    """Where a feature cell looks in the image: cell ``(i, j)`` is centred on pixel
    ``(start + i * jump, start + j * jump)`` and sees a ``size x size`` square around it
    (pixel coordinates: pixel ``k`` spans ``[k, k + 1)``, its centre at ``k + 0.5``)."""

    size: int
    jump: int
    start: float

    def box(self, row: int, col: int, patch: tuple[int, int], image_size: int
            ) -> tuple[int, int, int, int]:
        """Pixel box ``(x0, y0, x1, y1)`` (x1/y1 exclusive, clipped to the image) seen by the
        ``patch`` window of cells whose top-left cell is ``(row, col)``."""
        ph, pw = patch
        half = self.size / 2
        x0 = self.start + col * self.jump - half
        y0 = self.start + row * self.jump - half
        x1 = self.start + (col + pw - 1) * self.jump + half
        y1 = self.start + (row + ph - 1) * self.jump + half
        return (max(0, math.floor(x0)), max(0, math.floor(y0)),
                min(image_size, math.ceil(x1)), min(image_size, math.ceil(y1)))

    def center(self, row: int, col: int, patch: tuple[int, int]) -> tuple[float, float]:
        """Pixel coordinates ``(x, y)`` of the centre of a ``patch`` window of cells."""
        ph, pw = patch
        return (self.start + (col + (pw - 1) / 2) * self.jump,
                self.start + (row + (ph - 1) / 2) * self.jump)


def receptive_field(features: nn.Module) -> ReceptiveField:
    """The receptive field of a backbone's output cells, from its convolutions and poolings
    taken in registration order (a residual network's shortcut branches, named
    ``downsample``, are skipped: its main path bounds the field)."""
    size, jump, start = 1, 1, 0.5
    for name, module in features.named_modules():
        if "downsample" in name.split(".") or not isinstance(
                module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            continue
        kernel, stride, padding = (_first(module.kernel_size), _first(module.stride),
                                   _first(module.padding))
        dilation = _first(getattr(module, "dilation", 1))
        kernel = dilation * (kernel - 1) + 1
        size += (kernel - 1) * jump
        start += ((kernel - 1) / 2 - padding) * jump
        jump *= stride
    return ReceptiveField(size, jump, start)


def _first(value) -> int:
    return value[0] if isinstance(value, (tuple, list)) else int(value)


def small_cnn(widths: tuple[int, ...] = (32, 64, 128)) -> nn.Sequential:
    """The built-in CPU backbone: per width, a 3x3 conv, batch norm, ReLU and 2x2 max pool,
    so a ``S x S`` image gives an ``S/2^n x S/2^n`` map of ``widths[-1]`` channels."""
    layers: list[nn.Module] = []
    channels = 3
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        channels = width
    return nn.Sequential(*layers)


@torch.no_grad()
def feature_shape(features: nn.Module, image_size: int) -> tuple[int, int, int]:
    """``(C, H, W)`` of the backbone's output for one ``image_size`` square image (run once,
    in eval mode so that batch norm accepts a batch of one; the mode is restored)."""
    was_training = features.training
    features.eval()
    try:
        parameter = next(features.parameters(), None)
        device = parameter.device if parameter is not None else None
        out = features(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        features.train(was_training)
    if out.dim() != 4:
        raise ValueError(f"feature_shape: the backbone must return a (B, C, H, W) map, got "
                         f"shape {tuple(out.shape)} for a {image_size}x{image_size} image")
    return tuple(out.shape[1:])


TORCHVISION_ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet152", "vgg16", "vgg19",
                             "densenet121", "densenet161")


def build_backbone(name: str = "small_cnn", weights: str | Path | None = None) -> nn.Sequential:
    """A backbone ``Normalize -> features`` by name.

    ``"small_cnn"`` is built in (input normalised around 0.5). Names in
    `TORCHVISION_ARCHITECTURES` use torchvision, ``"timm:<name>"`` uses timm (feature map of its
    last stage); both with ImageNet normalisation, random weights unless ``weights`` names a
    local state-dict file of the full network (a classifier head in it is ignored).

    Raises:
        ValueError: an unknown name. ImportError: torchvision/timm needed and missing.
        FileNotFoundError: ``weights`` does not exist.
    """
    if name == "small_cnn":
        features: nn.Module = small_cnn()
        norm = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        if weights is not None:
            features.load_state_dict(_load_state_dict(weights))
        return nn.Sequential(norm, features)
    if name.startswith("timm:"):
        import timm  # optional: only for timm backbones

        network = timm.create_model(name.removeprefix("timm:"), pretrained=False)
        if weights is not None:
            network.load_state_dict(_load_state_dict(weights), strict=False)
        network.reset_classifier(0, "")  # keep the (B, C, H, W) map
        features = network
    elif name in TORCHVISION_ARCHITECTURES:
        import torchvision  # optional: only for torchvision backbones

        network = getattr(torchvision.models, name)(weights=None)
        if weights is not None:
            state = {k: v for k, v in _load_state_dict(weights).items()
                     if not k.startswith(("fc.", "classifier."))}
            network.load_state_dict(state, strict=False)
        if name.startswith("resnet"):
            features = nn.Sequential(*list(network.children())[:-2])  # no avgpool, fc
        else:
            features = network.features
            if name.startswith("vgg"):
                features = nn.Sequential(*list(features.children())[:-1])  # ProtoPNet: no last pool
    else:
        raise ValueError(f"build_backbone: unknown backbone {name!r}; expected 'small_cnn', "
                         f"one of {TORCHVISION_ARCHITECTURES} or 'timm:<model name>'")
    return nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), features)


def _load_state_dict(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"build_backbone: weights file {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state
