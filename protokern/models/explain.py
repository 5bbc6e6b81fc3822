"""Explanations of ProtoPNet decisions: "this part looks like that prototype".

For an image: the predicted class, its prototypes ranked by their contribution to the class
score (similarity x last-layer weight), each with its similarity heatmap over the image (the
distance map turned into similarities and upsampled), the position of its best match, and the
training patch it was pushed onto. `render_explanation` draws it to a PNG with matplotlib.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from protokern.models.protopnet import ProtoPNet, distance_to_similarity
from protokern.models.push import PushRecord


@dataclass
class PrototypeEvidence:
    """One prototype's part in a decision.

    Attributes:
        prototype: its index in ``0..M-1``.
        similarity: its similarity at the best-matching position.
        weight: its last-layer weight to the explained class.
        contribution: ``similarity * weight``, its share of the class score.
        position: ``(row, col)`` of the best match in the feature map.
        center: ``(x, y)`` pixel centre of the best match's receptive field.
        box: ``(x0, y0, x1, y1)`` its receptive field in the image, x1/y1 exclusive.
        heatmap: ``(S, S)`` similarity map upsampled (bilinear) to the image.
    """

    prototype: int
    similarity: float
    weight: float
    contribution: float
    position: tuple[int, int]
    center: tuple[float, float]
    box: tuple[int, int, int, int]
    heatmap: Tensor


@dataclass
class Explanation:
    """The decision on one image and the evidence for it (strongest first)."""

    predicted_class: int
    logits: Tensor
    evidence: list[PrototypeEvidence]


@torch.no_grad()
def top_prototype_positions(model: ProtoPNet, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For each image: predicted class ``(B,)``, the prototype of that class contributing most
    ``(B,)``, and the ``(B, 2)`` pixel centre ``(x, y)`` of its best match."""
    model.eval()
    output = model(images)
    predicted = output.logits.argmax(1)
    _, contributions = _contributions(model, output.min_distances, predicted)
    top = contributions.argmax(1)
    flat = output.indices.gather(1, top[:, None])[:, 0]
    rows, cols = _unflatten(model, flat)
    field, patch = model.receptive_field, model.prototype_layer.patch
    centers = torch.tensor([field.center(r, c, patch)
                            for r, c in zip(rows.tolist(), cols.tolist(), strict=True)])
    return predicted, top, centers.reshape(-1, 2)


def _contributions(model: ProtoPNet, min_distances: Tensor, classes: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """``(B, M)`` similarities, and similarity x weight to ``classes`` (-inf for prototypes of
    other classes)."""
    similarity = distance_to_similarity(min_distances, model.metric)
    contributions = similarity * model.last_layer.weight[classes]
    own = model.prototype_classes[None, :] == classes[:, None]
    return similarity, contributions.masked_fill(~own, float("-inf"))


def _unflatten(model: ProtoPNet, flat: Tensor) -> tuple[Tensor, Tensor]:
    width = model.feature_size[1] - model.prototype_layer.patch[1] + 1
    return flat // width, flat % width


@torch.no_grad()
def explain_image(model: ProtoPNet, image: Tensor, top_k: int = 3,
                  target_class: int | None = None) -> Explanation:
    """Explain the decision on ``image`` ``(3, S, S)`` in [0, 1] by the ``top_k`` prototypes of
    the predicted class (or of ``target_class``) with the largest contributions."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"explain_image: image must be (3, S, S), got {tuple(image.shape)}")
    model.eval()
    batch = image[None].to(model.prototype_class_identity.device)
    output = model(batch)
    explained = int(output.logits.argmax(1)) if target_class is None else target_class
    similarities, contributions = _contributions(
        model, output.min_distances, torch.tensor([explained], device=batch.device))
    similarities, contributions = similarities[0], contributions[0]
    count = min(top_k, int(torch.isfinite(contributions).sum()))
    ranked = contributions.topk(count).indices.tolist()
    maps = model.similarity_maps(batch)[0]  # (M, H', W')
    size = image.shape[-1]
    rows, cols = _unflatten(model, output.indices[0])
    patch = model.prototype_layer.patch
    evidence = []
    for m in ranked:
        r, c = int(rows[m]), int(cols[m])
        heatmap = torch.nn.functional.interpolate(maps[m][None, None], size=(size, size),
                                                  mode="bilinear", align_corners=False)[0, 0]
        evidence.append(PrototypeEvidence(
            m, float(similarities[m]), float(model.last_layer.weight[explained, m]),
            float(contributions[m]), (r, c),
            model.receptive_field.center(r, c, patch),
            model.receptive_field.box(r, c, patch, size), heatmap.cpu()))
    return Explanation(explained, output.logits[0].cpu(), evidence)


def render_explanation(explanation: Explanation, image: Tensor, path: str | Path,
                       push_record: PushRecord | None = None,
                       class_names: list[str] | None = None, title: str = "") -> Path:
    """Draw one row per prototype: the image with the matched part boxed, the similarity
    heatmap over it, and the prototype's source patch (when ``push_record`` is given), with
    similarity, weight and contribution. Writes a PNG at ``path`` and returns it."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    def name(k: int) -> str:
        return class_names[k] if class_names else f"class {k}"

    rows = max(1, len(explanation.evidence))
    figure, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    pixels = image.permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    for row, evidence in zip(axes, explanation.evidence, strict=True):
        x0, y0, x1, y1 = evidence.box
        row[0].imshow(pixels)
        row[0].add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                       edgecolor="yellow", linewidth=2))
        row[0].set_title("this part of the image", fontsize=9)
        row[1].imshow(pixels)
        row[1].imshow(evidence.heatmap.numpy(), cmap="jet", alpha=0.5)
        row[1].set_title(f"similarity map of prototype {evidence.prototype}", fontsize=9)
        source = push_record.source_patches[evidence.prototype] if push_record else None
        if source is not None and source.numel():
            row[2].imshow(source.permute(1, 2, 0).numpy())
            row[2].set_title(f"looks like prototype {evidence.prototype}\n"
                             f"(training image {int(push_record.image_index[evidence.prototype])})",
                             fontsize=9)
        else:
            row[2].text(0.5, 0.5, "prototype not pushed:\nno source patch", ha="center",
                        va="center")
        row[2].set_xlabel(f"similarity {evidence.similarity:.3f} x weight {evidence.weight:.3f}"
                          f" = {evidence.contribution:.3f}", fontsize=9)
        for axis in row:
            axis.set_xticks([])
            axis.set_yticks([])
    score = float(explanation.logits[explanation.predicted_class])
    figure.suptitle(f"{title}{' - ' if title else ''}explained: "
                    f"{name(explanation.predicted_class)} (score {score:.2f})")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
