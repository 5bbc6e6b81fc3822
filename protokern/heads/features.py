"""A fixed, seeded feature extractor for running CIL heads on images without training.

Class-incremental heads such as NCM, FeCAM and TEEN sit on a frozen backbone. For the
generated planted-parts images `protokern cil` uses a small random-init CNN: its weights are
drawn from ``seed`` alone (no download, no training), so features are reproducible and cheap
to compute on a CPU. Random convolutions with ReLU and max-pooling still respond to colour and
local shape, which is what tells planted motifs apart.
"""

import torch
from torch import Tensor, nn
from tqdm import tqdm


class RandomConvFeatures(nn.Module):
    """Three 3x3 conv + ReLU + 2x2 max-pool stages, weights Kaiming-normal from ``seed``.

    Maps ``(B, 3, S, S)`` images in [0, 1] to ``(B, width, S / 8, S / 8)`` feature maps
    (``S`` divisible by 8). Inputs are centred (``x - 0.5``) so that the ReLUs see both signs.
    """

    def __init__(self, width: int = 64, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        channels = 3
        for out in (width // 2, width, width):
            conv = nn.Conv2d(channels, out, 3, padding=1)
            with torch.no_grad():
                fan_in = channels * 9
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator)
                                  * (2.0 / fan_in) ** 0.5)
                conv.bias.zero_()
            layers += [conv, nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.layers = nn.Sequential(*layers)
        self.requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] % 8 or (
                images.shape[-2] % 8):
            raise ValueError(f"RandomConvFeatures: images must be (B, 3, S, S) with S "
                             f"divisible by 8, got {tuple(images.shape)}")
        return self.layers(images - 0.5)


@torch.no_grad()
def extract_feature_maps(images: Tensor, width: int = 64, seed: int = 0,
                         batch_size: int = 128, progress: bool = True) -> Tensor:
    """``(N, 3, S, S)`` images -> ``(N, width, S / 8, S / 8)`` float32 feature maps."""
    extractor = RandomConvFeatures(width, seed).eval()
    chunks = range(0, images.shape[0], batch_size)
    maps = [extractor(images[i:i + batch_size].float())
            for i in tqdm(chunks, desc="features", disable=not progress, leave=False)]
    return torch.cat(maps) if maps else images.new_zeros(0, width, 1, 1)
