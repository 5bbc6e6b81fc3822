"""ProtoPNet on protokern ops is a drop-in for the paper's formulas: same logits, same
gradients, with the same weights wired through naive PyTorch (written here, independently)."""

import pytest
import torch
from cases import METRICS
from torch.nn import functional

from protokern.models.backbones import build_backbone, receptive_field, small_cnn
from protokern.models.protopnet import ProtoPNet, distance_to_similarity
from protokern.testing import TOLERANCE, relative_error

# A float32 network against the same network in float64: the backbone's convolutions and
# batch norm round too, so the whole model is held to this, not to the op's 1e-5.
NETWORK_TOLERANCE = 1e-4


def paper_logits(model: ProtoPNet, images: torch.Tensor) -> torch.Tensor:
    """The paper's forward pass: L2 by convolutions, min by -max_pool(-d), log activation
    (cosine: normalised dot products), last layer."""
    x = model.add_on_layers(model.features(images))
    p = model.prototype_layer.prototype_vectors
    if model.metric == "cosine":
        patch_norm = functional.conv2d(x ** 2, torch.ones_like(p)).sqrt().clamp_min(1e-8)
        proto_norm = p.flatten(1).norm(dim=1).clamp_min(1e-8).view(1, -1, 1, 1)
        distances = 1 - functional.conv2d(x, p) / (patch_norm * proto_norm)
    else:
        x2 = functional.conv2d(x ** 2, torch.ones_like(p))
        xp = functional.conv2d(x, p)
        p2 = (p ** 2).sum((1, 2, 3)).view(1, -1, 1, 1)
        distances = functional.relu(x2 - 2 * xp + p2)
    min_distances = -functional.max_pool2d(-distances, distances.shape[2:]).flatten(1)
    if model.metric == "cosine":
        similarities = 1 - min_distances
    else:
        similarities = torch.log((min_distances + 1) / (min_distances + 1e-4))
    return model.last_layer(similarities)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("patch", [(1, 1), (2, 2), (1, 2)])
def test_logits_and_gradients_match_the_paper_formulas(cpu_backend, metric, patch):
    torch.manual_seed(1)
    model = ProtoPNet(build_backbone(), num_classes=3, image_size=32, prototypes_per_class=4,
                      prototype_dim=16, prototype_patch=patch, metric=metric)
    model.last_layer.weight.data += 0.1 * torch.randn_like(model.last_layer.weight)
    images = torch.rand(5, 3, 32, 32)
    weights = torch.randn(5, 3)
    ours = model(images).logits
    (ours * weights).sum().backward()
    our_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = model.double()  # the paper's formulas in float64: the ground truth
    reference.zero_grad()
    expected = paper_logits(reference, images.double())
    (expected * weights.double()).sum().backward()
    assert relative_error(ours, expected) <= NETWORK_TOLERANCE
    for name, parameter in reference.named_parameters():
        assert relative_error(our_grads[name], parameter.grad) <= NETWORK_TOLERANCE, name


def test_forward_returns_logits_min_distances_and_positions():
    model = ProtoPNet(build_backbone(), num_classes=4, image_size=32)
    images = torch.rand(2, 3, 32, 32)
    out = model(images)
    assert out.logits.shape == (2, 4)
    assert out.min_distances.shape == out.indices.shape == (2, 40)
    assert model.prototype_layer.prototype_vectors.shape == (40, 128, 1, 1)
    features = model.conv_features(images)
    flat = features.flatten(2)  # (B, D, HW)
    chosen = flat.gather(2, out.indices[:, None, :].expand(-1, 128, -1))  # (B, D, M)
    direct = ((chosen - model.prototype_layer.prototype_vectors[:, :, 0, 0].t()) ** 2).sum(1)
    assert relative_error(out.min_distances, direct) <= TOLERANCE[torch.float32]


def test_last_layer_starts_at_plus_one_own_class_minus_half_others():
    model = ProtoPNet(build_backbone(), num_classes=3, image_size=16, prototypes_per_class=2)
    expected = torch.tensor([[1, 1, -.5, -.5, -.5, -.5], [-.5, -.5, 1, 1, -.5, -.5],
                             [-.5, -.5, -.5, -.5, 1, 1]])
    assert torch.equal(model.last_layer.weight.data, expected)
    assert model.prototype_classes.tolist() == [0, 0, 1, 1, 2, 2]


def test_log_activation_and_cosine_similarity():
    d = torch.tensor([0.0, 1.0, 3.0])
    expected = torch.log(torch.tensor([1 / 1e-4, 2 / 1.0001, 4 / 3.0001]))
    assert relative_error(distance_to_similarity(d, "sqeuclidean"), expected) <= 1e-6
    assert torch.equal(distance_to_similarity(d, "cosine"), 1 - d)


def test_receptive_field_of_the_small_cnn():
    field = receptive_field(small_cnn())
    # three (3x3 conv, 2x2 pool) stages: 1 + 2 + 1 + 2*2 + 2 + 2*4 + 4 = 22, jump 8
    assert (field.size, field.jump, field.start) == (22, 8, 4.0)
    assert field.box(0, 0, (1, 1), 64) == (0, 0, 15, 15)
    assert field.box(7, 7, (1, 1), 64) == (49, 49, 64, 64)
    assert field.center(2, 3, (1, 1)) == (28.0, 20.0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_classes"):
        ProtoPNet(build_backbone(), num_classes=0, image_size=32)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet9000")
    with pytest.raises(FileNotFoundError, match="weights"):
        build_backbone("small_cnn", weights="/nonexistent/weights.pt")
