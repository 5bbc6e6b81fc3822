"""`protokern explain --checkpoint FILE IMAGE...`: why a trained ProtoPNet decided what it did.

For each image: the predicted class and its top prototypes (similarity x weight), printed,
and drawn to a PNG beside the heatmaps and the training patches the prototypes came from.
"""

import argparse
from pathlib import Path

from protokern.data import load_image
from protokern.models.checkpoint import load_checkpoint
from protokern.models.explain import explain_image, render_explanation
from protokern.models.push import PushRecord


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``protokern explain``."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt of protokern train")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to explain")
    parser.add_argument("--output", default="protokern-explanations", help="folder for PNGs")
    parser.add_argument("--top-k", type=int, default=3, help="prototypes to show")
    parser.add_argument("--device", default="cpu", help="where to run the model")


def run(args: argparse.Namespace) -> int:
    model, checkpoint = load_checkpoint(args.checkpoint, args.device)
    push = PushRecord(**checkpoint["push"]) if checkpoint.get("push") else None
    if push is None:
        print("note: the checkpoint was saved before any push; prototypes have no source patch")
    names = checkpoint.get("class_names")
    output = Path(args.output)
    for image_path in args.images:
        image = load_image(image_path, model.image_size)
        explanation = explain_image(model, image, args.top_k)
        predicted = explanation.predicted_class
        label = names[predicted] if names else f"class {predicted}"
        png = render_explanation(explanation, image, output / f"{Path(image_path).stem}.png",
                                 push, names, title=Path(image_path).name)
        print(f"{image_path}: {label}")
        for e in explanation.evidence:
            print(f"  prototype {e.prototype}: similarity {e.similarity:.3f} x weight "
                  f"{e.weight:.2f} = {e.contribution:.3f} at pixel ({e.center[0]:.0f}, "
                  f"{e.center[1]:.0f})")
        print(f"  -> {png}")
    return 0
