"""Saving and loading ProtoPNet checkpoints: weights, the recipe to rebuild the model, the
optimiser states, the push record and the training history, in one file."""

from pathlib import Path
from typing import Any

import torch

from protokern.models.backbones import build_backbone
from protokern.models.protopnet import ProtoPNet


def build_protopnet(num_classes: int, image_size: int, backbone: str = "small_cnn",
                    weights: str | None = None, **options: Any) -> ProtoPNet:
    """A ProtoPNet from its recipe (the ``model_config`` stored in a checkpoint).

    ``options`` go to `ProtoPNet`: prototypes_per_class, prototype_dim, prototype_patch,
    metric.
    """
    return ProtoPNet(build_backbone(backbone, weights), num_classes, image_size, **options)


def save_checkpoint(path: str | Path, model: ProtoPNet, model_config: dict[str, Any],
                    **state: Any) -> None:
    """Write the model, its recipe and any other ``state`` (optimisers, epoch, history,
    push record, class names) atomically: a crash mid-write leaves the old file intact."""
    path = Path(path)
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": model.state_dict(), "model_config": model_config, **state}, temporary)
    temporary.replace(path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[ProtoPNet, dict[str, Any]]:
    """The rebuilt model (weights loaded, eval mode) and the whole checkpoint dict.

    Raises:
        FileNotFoundError: no file at ``path``. ValueError: the file is not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint at {str(path)!r}")
    checkpoint = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise ValueError(f"load_checkpoint: {str(path)!r} is not a protokern checkpoint "
                         f"(no model_config)")
    # the backbone weights are in the state dict: do not read the original weights file again
    config = {**checkpoint["model_config"], "weights": None}
    model = build_protopnet(**config).to(device)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint
