"""ProtoPNet's loss terms against values computed by hand."""

import math

import torch

from protokern.models.backbones import build_backbone
from protokern.models.losses import (
    LossCoefficients,
    cluster_and_separation,
    protopnet_loss,
    wrong_class_l1,
)
from protokern.models.protopnet import ProtoPNet, ProtoPNetOutput


def test_cluster_and_separation_by_hand():
    # 2 classes x 2 prototypes; image 0 is class 0, image 1 is class 1
    identity = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])
    distances = torch.tensor([[3.0, 1.0, 0.5, 4.0],
                              [2.0, 6.0, 7.0, 5.0]])
    cluster, separation = cluster_and_separation(distances, torch.tensor([0, 1]), identity)
    assert cluster.item() == (1.0 + 5.0) / 2  # own-class minima: 1 (image 0), 5 (image 1)
    assert separation.item() == (0.5 + 2.0) / 2  # other-class minima


def test_total_loss_by_hand():
    model = ProtoPNet(build_backbone(), num_classes=2, image_size=16, prototypes_per_class=2)
    model.last_layer.weight.data = torch.tensor([[1.0, 1.0, -0.5, -0.25],
                                                 [-0.5, 0.0, 1.0, 1.0]])
    logits = torch.tensor([[2.0, 0.0], [0.5, 1.5]])
    distances = torch.tensor([[3.0, 1.0, 0.5, 4.0], [2.0, 6.0, 7.0, 5.0]])
    output = ProtoPNetOutput(logits, distances, torch.zeros(2, 4, dtype=torch.int64))
    terms = protopnet_loss(model, output, torch.tensor([0, 1]))

    cross_entropy = (-math.log(math.exp(2) / (math.exp(2) + 1))
                     - math.log(math.exp(1.5) / (math.exp(0.5) + math.exp(1.5)))) / 2
    l1 = 0.5 + 0.25 + 0.5 + 0.0  # weights from prototypes to the other class only
    assert math.isclose(terms.cross_entropy.item(), cross_entropy, rel_tol=1e-6)
    assert terms.cluster.item() == 3.0 and terms.separation.item() == 1.25
    assert math.isclose(terms.l1.item(), l1, rel_tol=1e-6)
    assert math.isclose(wrong_class_l1(model).item(), l1, rel_tol=1e-6)
    total = cross_entropy + 0.8 * 3.0 - 0.08 * 1.25 + 1e-4 * l1
    assert math.isclose(terms.total.item(), total, rel_tol=1e-6)
    assert LossCoefficients() == LossCoefficients(1.0, 0.8, -0.08, 1e-4)  # the paper's
