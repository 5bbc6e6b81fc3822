"""ProtoPNet ("This Looks Like That", Chen et al., NeurIPS 2019) on protokern's fused ops.

``image -> backbone -> add-on layers -> PrototypeLayer (min distance per prototype)
-> similarity -> last layer -> logits``, with the defaults of the paper: add-on 1x1 convs to
``D = 128`` ending in a sigmoid, 10 prototypes per class, the log activation
``log((d + 1) / (d + 1e-4))``, and a last layer of +1 from each prototype to its own class and
-0.5 to the others. The prototype layer is `protokern.nn.PrototypeLayer`, so the ``(B, M, H, W)``
distance tensor is never stored for training; `distance_map` exists for explanations.
"""

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from protokern.models.backbones import (
    ReceptiveField,
    build_backbone,
    feature_shape,
    receptive_field,
)
from protokern.nn import PrototypeLayer, port_state_dict

LOG_ACTIVATION_EPSILON = 1e-4
INCORRECT_CLASS_CONNECTION = -0.5


class ProtoPNetOutput(NamedTuple):
    """What `ProtoPNet.forward` returns."""

    logits: Tensor
    """``(B, K)`` class scores."""
    min_distances: Tensor
    """``(B, M)`` distance from each prototype to its closest patch."""
    indices: Tensor
    """``(B, M)`` int64 flat row-major index into ``H' x W'`` of that patch."""


def distance_to_similarity(distances: Tensor, metric: str) -> Tensor:
    """ProtoPNet's similarity of a distance: ``log((d + 1) / (d + 1e-4))`` for squared
    Euclidean distances, the cosine similarity ``1 - d`` for cosine distances."""
    if metric == "cosine":
        return 1 - distances
    return torch.log((distances + 1) / (distances + LOG_ACTIVATION_EPSILON))


def add_on_layers(in_channels: int, prototype_dim: int) -> nn.Sequential:
    """ProtoPNet's "bottleneck" add-on: 1x1 conv, ReLU, 1x1 conv, sigmoid (features in (0, 1),
    like the uniform [0, 1) prototypes)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, prototype_dim, 1), nn.ReLU(),
        nn.Conv2d(prototype_dim, prototype_dim, 1), nn.Sigmoid(),
    )


class ProtoPNet(nn.Module):
    """ProtoPNet over a backbone.

    Args:
        features: the backbone, ``(B, 3, S, S)`` images in [0, 1] -> ``(B, C, H, W)``.
        num_classes: K.
        image_size: S, to size the feature map and the receptive field.
        prototypes_per_class: prototypes of each class; ``M = K * prototypes_per_class``,
            prototype ``m`` belonging to class ``m // prototypes_per_class``.
        prototype_dim: D, the add-on layers' output channels.
        prototype_patch: ``(ph, pw)`` cells of the feature map per prototype.
        metric: ``"sqeuclidean"`` (the paper) or ``"cosine"``.

    Attributes:
        prototype_class_identity: ``(M, K)`` one-hot buffer, the class of each prototype.
        receptive_field: where a feature cell looks in the image.
    """

    def __init__(self, features: nn.Module, num_classes: int, image_size: int, *,
                 prototypes_per_class: int = 10, prototype_dim: int = 128,
                 prototype_patch: tuple[int, int] = (1, 1), metric: str = "sqeuclidean") -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("image_size", image_size),
                            ("prototypes_per_class", prototypes_per_class),
                            ("prototype_dim", prototype_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ProtoPNet: {name} must be a positive int, got {value!r}")
        self.features = features
        self.num_classes = num_classes
        self.image_size = image_size
        channels, height, width = feature_shape(features, image_size)
        self.feature_size = (height, width)
        self.receptive_field: ReceptiveField = receptive_field(features)
        self.add_on_layers = add_on_layers(channels, prototype_dim)
        num_prototypes = num_classes * prototypes_per_class
        self.prototype_layer = PrototypeLayer(num_prototypes, prototype_dim,
                                              tuple(prototype_patch), metric)
        classes = torch.arange(num_prototypes) // prototypes_per_class
        self.register_buffer("prototype_class_identity",
                             nn.functional.one_hot(classes, num_classes).float())
        self.last_layer = nn.Linear(num_prototypes, num_classes, bias=False)
        self.reset_last_layer(INCORRECT_CLASS_CONNECTION)
        self._init_add_on_layers()

    def _init_add_on_layers(self) -> None:
        # as the paper's code: Kaiming-normal (fan out) convolutions, zero biases
        for module in self.add_on_layers.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    @torch.no_grad()
    def reset_last_layer(self, incorrect_class_connection: float = INCORRECT_CLASS_CONNECTION
                         ) -> None:
        """+1 from each prototype to its class, ``incorrect_class_connection`` to the others."""
        identity = self.prototype_class_identity.t()  # (K, M)
        self.last_layer.weight.copy_(identity + incorrect_class_connection * (1 - identity))

    @property
    def metric(self) -> str:
        return self.prototype_layer.metric

    @property
    def num_prototypes(self) -> int:
        return self.prototype_layer.num_prototypes

    @property
    def prototype_classes(self) -> Tensor:
        """``(M,)`` int64, the class of each prototype."""
        return self.prototype_class_identity.argmax(1)

    def conv_features(self, images: Tensor) -> Tensor:
        """``(B, D, H, W)`` features the prototypes are compared with."""
        return self.add_on_layers(self.features(images))

    def forward(self, images: Tensor) -> ProtoPNetOutput:
        """``images`` ``(B, 3, S, S)`` in [0, 1] -> logits ``(B, K)``, min distances and their
        indices ``(B, M)``."""
        min_distances, indices = self.prototype_layer(self.conv_features(images))
        similarities = distance_to_similarity(min_distances, self.metric)
        return ProtoPNetOutput(self.last_layer(similarities), min_distances, indices)

    def load_original_state_dict(self, state_dict: dict[str, Tensor],
                                 layout: str = "protopnet",
                                 prefixes: dict[str, str] | None = None) -> None:
        """Load an original checkpoint's weights (`protokern.nn.port_state_dict`'s layouts:
        ``"protopnet"``, cfchen-duke's, or ``"cabrnet"``), strictly: every key of this model
        must be filled, except the class identity, which cfchen-duke does not save (its rule
        is this model's: prototype ``m`` belongs to class ``m // prototypes_per_class``).
        ``prefixes`` renames the backbone's keys where they differ."""
        ported = port_state_dict(state_dict, layout, layer="prototype_layer", prefixes=prefixes)
        ported.setdefault("prototype_class_identity", self.prototype_class_identity)
        self.load_state_dict(ported, strict=True)

    def similarity_maps(self, images: Tensor) -> Tensor:
        """``(B, M, H', W')`` similarity of every prototype at every position (explanations)."""
        distances = self.prototype_layer.distance_map(self.conv_features(images))
        return distance_to_similarity(distances, self.metric)


def build_protopnet(num_classes: int, image_size: int, backbone: str = "small_cnn",
                    weights: str | None = None, **options: Any) -> ProtoPNet:
    """A ProtoPNet from its recipe (the ``model_config`` stored in a checkpoint).

    ``options`` go to `ProtoPNet`: prototypes_per_class, prototype_dim, prototype_patch,
    metric.
    """
    return ProtoPNet(build_backbone(backbone, weights), num_classes, image_size, **options)
