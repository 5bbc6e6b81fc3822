"""`protokern export --checkpoint CKPT --out model.onnx`: a trained ProtoPNet as an ONNX file.

The checkpoint's model (written by ``protokern train`` or ``protokern demo``) is exported in
eval mode with a dynamic batch (`protokern.deploy`): input ``images`` ``(B, 3, S, S)`` in
[0, 1], outputs ``logits`` ``(B, K)``, ``min_distances`` and ``indices`` ``(B, M)``. The file
is then run in onnxruntime on a sample batch of another size than the export's example, and
the command prints the file's size and the largest difference from the eager model.
"""

import argparse

import torch

from protokern.deploy import export_onnx, export_program, missing_onnx_packages, run_onnx
from protokern.models.checkpoint import load_checkpoint
from protokern.models.protopnet import ProtoPNetOutput

EXAMPLE_BATCH = 2
"""Images in the example batch the model is exported with (the batch stays dynamic)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``protokern export``."""
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint.pt written by protokern train or protokern demo")
    parser.add_argument("--out", default="model.onnx", help="the ONNX file to write")
    parser.add_argument("--batch-size", type=int, default=3,
                        help="random images in the batch compared with the eager model")
    parser.add_argument("--seed", type=int, default=0, help="draws the example and sample images")


def run(args: argparse.Namespace) -> int:
    """``protokern export``: writes the file, prints its size and the difference from eager."""
    missing = missing_onnx_packages()
    if missing:
        raise SystemExit(f"protokern export needs {', '.join(missing)} (protokern's onnx "
                         f"extra): pip install onnx onnxruntime onnxscript")
    if args.batch_size < 1:
        raise SystemExit(f"protokern export: --batch-size must be >= 1, got {args.batch_size}")
    try:
        model, _ = load_checkpoint(args.checkpoint)
    # a missing or unreadable file, or a checkpoint whose recipe or weights do not build
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise SystemExit(f"protokern export: --checkpoint {args.checkpoint!r}: {error}") from error
    generator = torch.Generator().manual_seed(args.seed)
    size = model.image_size
    example = torch.rand(EXAMPLE_BATCH, 3, size, size, generator=generator)
    sample = torch.rand(args.batch_size, 3, size, size, generator=generator)

    path = export_onnx(export_program(model, (example,)), args.out, ["images"],
                       ProtoPNetOutput._fields)
    logits, min_distances, indices = run_onnx(path, (sample,))
    with torch.no_grad():
        eager = model(sample)
    print(f"wrote {path}: {path.stat().st_size / 2**20:.2f} MiB ({path.stat().st_size} bytes); "
          f"input images (batch, 3, {size}, {size}), outputs {', '.join(ProtoPNetOutput._fields)}")
    same = int((indices == eager.indices).sum())
    print(f"onnxruntime vs eager on {args.batch_size} random images: max |difference| logits "
          f"{(logits - eager.logits).abs().max().item():.3g}, min distances "
          f"{(min_distances - eager.min_distances).abs().max().item():.3g}; indices equal at "
          f"{same} of {indices.numel()}")
    return 0
