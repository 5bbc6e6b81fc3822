"""Explanations: the predicted class's prototypes ranked by contribution, with heatmaps
that peak where the prototype matched, drawn to a non-empty PNG."""

import torch

from protokern.data import PlantedParts
from protokern.models.backbones import build_backbone
from protokern.models.explain import explain_image, render_explanation, top_prototype_positions
from protokern.models.protopnet import ProtoPNet, distance_to_similarity
from protokern.models.push import push_prototypes


def test_explanation_ranks_the_predicted_class_prototypes(tmp_path):
    data = PlantedParts(3, 4, 32, seed=1, motif_size=8)
    model = ProtoPNet(build_backbone(), 3, 32, prototypes_per_class=4, prototype_dim=16)
    model.last_layer.weight.data += 0.3 * torch.rand_like(model.last_layer.weight)
    record = push_prototypes(model, data, progress=False)
    image = data.images[5]
    explanation = explain_image(model, image, top_k=3)

    with torch.no_grad():
        output = model.eval()(image[None])
    assert explanation.predicted_class == int(output.logits.argmax())
    similarities = distance_to_similarity(output.min_distances[0], model.metric)
    weights = model.last_layer.weight[explanation.predicted_class]
    own = (model.prototype_classes == explanation.predicted_class).nonzero()[:, 0]
    expected = own[(similarities[own] * weights[own]).argsort(descending=True)[:3]]
    assert [e.prototype for e in explanation.evidence] == expected.tolist()
    for e in explanation.evidence:
        assert abs(e.contribution - e.similarity * e.weight) <= 1e-5 * max(1, abs(e.contribution))
        assert abs(e.similarity - float(similarities[e.prototype])) <= 1e-5 * e.similarity
        assert e.heatmap.shape == (32, 32)
        x0, y0, x1, y1 = e.box
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32

    predicted, top, centers = top_prototype_positions(model, image[None])
    assert int(predicted) == explanation.predicted_class
    assert int(top) == explanation.evidence[0].prototype
    assert tuple(centers[0].tolist()) == explanation.evidence[0].center

    png = render_explanation(explanation, image, tmp_path / "e.png", record)
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
