"""Saving and loading ProtoPNet checkpoints: weights, the recipe to rebuild the model, the
optimiser states, the push record and the training history, in one file.

A checkpoint holds only what ``torch.load(..., weights_only=True)`` accepts (tensors, dicts,
lists, tuples, strings, numbers): it is read that way, so opening one never runs code from it.
Writing is atomic (a temporary file, flushed to disk, then renamed over the old one), so a
crash mid-write leaves the previous checkpoint intact.
"""

import os
from pathlib import Path
from typing import Any

import torch

from protokern.models.protopnet import ProtoPNet, build_protopnet


class CheckpointError(ValueError):
    """A file that is not a readable protokern checkpoint: truncated, corrupted, holding
    objects other than tensors and plain containers, or a torch file of something else."""


def save_checkpoint(path: str | Path, model: ProtoPNet, model_config: dict[str, Any],
                    **state: Any) -> None:
    """Write the model, its recipe and any other ``state`` (optimisers, epoch, history,
    push record as a dict, class names; tensors, containers and primitives only) atomically:
    a crash mid-write leaves the old file intact and no temporary file behind."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save({"model": model.state_dict(), "model_config": model_config, **state},
                       file)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the rename points at them
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The checkpoint dict at ``path`` (tensors on ``device``), read with ``weights_only``.

    Args:
        required: keys the caller needs besides ``model`` and ``model_config`` (e.g. the
            training state).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file cannot be read (truncated, corrupted, unsafe objects) or is
            not a protokern checkpoint; the message names the path and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # a zip, pickle or weights-only failure: all mean "unreadable"
        raise CheckpointError(
            f"{str(path)!r} ({path.stat().st_size} bytes) is not a readable protokern "
            f"checkpoint (truncated, corrupted, or holding objects other than tensors and "
            f"plain containers, which weights_only loading refuses): "
            f"{_first_sentence(error)}") from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{str(path)!r} is not a protokern checkpoint: it holds a "
                              f"{type(checkpoint).__name__}, not a dict")
    missing = [key for key in ("model", "model_config", *required) if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{str(path)!r} is not a protokern checkpoint: no "
                              f"{', '.join(map(repr, missing))} in it (keys: "
                              f"{sorted(map(str, checkpoint))[:10]})")
    return checkpoint


def _first_sentence(error: Exception) -> str:
    """``Type: what went wrong`` from a `torch.load` error, without its advice on loading
    untrusted files with ``weights_only=False``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    marker = "WeightsUnpickler error:"
    refused = [line.split(marker, 1)[1] for line in lines if marker in line]
    text = (refused or lines or [""])[0].strip()
    return f"{type(error).__name__}: {text.split('. ')[0]}" if text else type(error).__name__


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[ProtoPNet, dict[str, Any]]:
    """The rebuilt model (weights loaded, eval mode) and the whole checkpoint dict.

    Raises:
        FileNotFoundError: no file at ``path``. CheckpointError (a ValueError): the file is
        not a readable checkpoint (see `read_checkpoint`).
    """
    checkpoint = read_checkpoint(path, device)
    # the backbone weights are in the state dict: do not read the original weights file again
    config = {**checkpoint["model_config"], "weights": None}
    model = build_protopnet(**config).to(device)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint
