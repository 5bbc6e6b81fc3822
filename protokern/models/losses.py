"""ProtoPNet's training objective (Chen et al. 2019, eq. 1 and the last-layer objective).

``loss = CE + 0.8 * cluster - 0.08 * separation + 1e-4 * L1``, where, per image,
``cluster`` is the distance from the closest prototype of its class and ``separation`` the
distance from the closest prototype of another class (averaged over the batch), and ``L1`` is
the L1 norm of the last-layer weights from prototypes to classes not their own.
"""

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from protokern.models.protopnet import ProtoPNet, ProtoPNetOutput


@dataclass(frozen=True)
class LossCoefficients:
    """Weights of the terms; the defaults are the paper's."""

    cross_entropy: float = 1.0
    cluster: float = 0.8
    separation: float = -0.08
    l1: float = 1e-4


@dataclass(frozen=True)
class LossTerms:
    """The unweighted terms (scalar tensors) and their weighted sum ``total``."""

    total: Tensor
    cross_entropy: Tensor
    cluster: Tensor
    separation: Tensor
    l1: Tensor

    def as_floats(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name).detach()) for f in fields(self)}


def cluster_and_separation(min_distances: Tensor, labels: Tensor, prototype_class_identity: Tensor
                           ) -> tuple[Tensor, Tensor]:
    """Mean over the batch of the min distance to a prototype of the image's class (cluster)
    and to a prototype of any other class (separation).

    ``min_distances`` ``(B, M)``, ``labels`` ``(B,)``, ``prototype_class_identity`` ``(M, K)``.
    """
    own = prototype_class_identity.t()[labels].bool()  # (B, M): prototype of the image's class
    inf = min_distances.new_tensor(float("inf"))
    cluster = torch.where(own, min_distances, inf).amin(1).mean()
    separation = torch.where(own, inf, min_distances).amin(1).mean()
    return cluster, separation


def wrong_class_l1(model: ProtoPNet) -> Tensor:
    """L1 norm of the last-layer weights connecting prototypes to classes not their own."""
    mask = 1 - model.prototype_class_identity.t()  # (K, M)
    return (model.last_layer.weight * mask).abs().sum()


def protopnet_loss(model: ProtoPNet, output: ProtoPNetOutput, labels: Tensor,
                   coefficients: LossCoefficients = LossCoefficients()) -> LossTerms:
    """The paper's objective for one batch; ``labels`` ``(B,)`` int64."""
    cross_entropy = torch.nn.functional.cross_entropy(output.logits, labels)
    cluster, separation = cluster_and_separation(output.min_distances, labels,
                                                 model.prototype_class_identity)
    l1 = wrong_class_l1(model)
    total = (coefficients.cross_entropy * cross_entropy + coefficients.cluster * cluster
             + coefficients.separation * separation + coefficients.l1 * l1)
    return LossTerms(total, cross_entropy, cluster, separation, l1)
