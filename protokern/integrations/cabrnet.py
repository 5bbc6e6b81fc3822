"""CaBRNet (``pip install cabrnet``) decisions on protokern's ops, without editing CaBRNet.

CaBRNet's classifiers compute the full ``(N, P, H, W)`` distance (or similarity) map with
``self.distances(features)`` / ``self.similarities(features)`` and pool it in ``forward``.
`use_protokern` patches a classifier instance so that, inside its own ``forward``, those
methods return a pooled stand-in that CaBRNet's unchanged pooling code reduces to the exact
values, computed by protokern's fused ops without the map:

- ``ProtoPNetClassifier`` (`cabrnet.archs.protopnet.decision`): ``distances`` is
  ``min_distance`` as an ``(N, P, 1, 1)`` map: its min (or compatibility-mode max-pool) over the
  single position is the min.
- ``ProtoPoolClassifier`` (`cabrnet.archs.protopool.decision`): ``distances`` is the
  ``(N, P, 1, 2)`` map ``[min, 2 mean - min]``, whose min is ``min_distance`` and whose mean is
  ``mean_distance`` (``mean >= min``, so the min stays the first entry): CaBRNet's focal
  similarity ``sim(min) - sim(mean)``, slots and Gumbel softmax run unchanged.
- ``ProtoTreeClassifier`` (`cabrnet.archs.prototree.decision`): ``similarities`` is
  ``sim(min_distance)`` as an ``(N, P, 1, 1)`` map: CaBRNet's similarities decrease with the
  distance (``exp(-sqrt(|d| + eps))``, ``-sqrt(...)``, ``log((d + 1) / (d + eps))``, ``1 - d``),
  so the max similarity over positions is the similarity of the min distance.

Outside ``forward`` (explanations, push), ``distances`` and ``similarities`` return the full
map again, from `protokern.distance_map` (exact at each minimum).

The metric comes from the classifier's similarity layer: the squared Euclidean ones
(``SquaredEuclideanDistance``'s cdist, ``ProtoPNetDistance``'s and ``ProtoTreeDistance``'s
expansions) are ``"sqeuclidean"``, computed exactly where CaBRNet's float32 expansion is off by
~eps |x|^2 (and relu'd); ``CosineSimilarity``, ``1 - <f, p> / (|f| |p| + 1e-8)``, becomes
protokern's ``1 - <f, p> / (max(|f|, 1e-8) max(|p|, 1e-8))``, which differs by about
``1e-8 / (|f| |p|)`` relative. Any other similarity layer is a TypeError.

Loading a CaBRNet checkpoint needs nothing: the patched instance keeps its parameters
(``classifier.prototypes``); load the checkpoint, then patch. For protokern's own `ProtoPNet`,
`protokern.nn.port_state_dict(state, "cabrnet")` renames the keys.
"""

import types
from contextvars import ContextVar

import torch
from torch import Tensor, nn

from protokern.ops import distance_map, mean_distance, min_distance

_POOLING: ContextVar[frozenset[int]] = ContextVar("protokern_cabrnet_pooling",
                                                  default=frozenset())
"""The ids of the patched classifiers whose ``forward`` is running in this thread/task."""


def _metric(classifier: nn.Module) -> str:
    """protokern's metric for the classifier's similarity layer (TypeError if none fits)."""
    from cabrnet.core.utils import similarities as cabrnet_similarities

    layer = classifier.similarity_layer
    squared = (cabrnet_similarities.SquaredEuclideanDistance,
               cabrnet_similarities.ProtoPNetDistance, cabrnet_similarities.ProtoTreeDistance)
    if isinstance(layer, squared):
        return "sqeuclidean"
    if isinstance(layer, cabrnet_similarities.CosineSimilarity):
        return "cosine"
    raise TypeError(f"use_protokern: the similarity layer {type(layer).__name__} of "
                    f"{type(classifier).__name__} computes a distance protokern does not have; "
                    f"expected a squared Euclidean or a cosine one")


def _kind(classifier: nn.Module) -> str:
    from cabrnet.archs.protopnet.decision import ProtoPNetClassifier
    from cabrnet.archs.protopool.decision import ProtoPoolClassifier
    from cabrnet.archs.prototree.decision import ProtoTreeClassifier

    for kind, cls in (("protopnet", ProtoPNetClassifier), ("protopool", ProtoPoolClassifier),
                      ("prototree", ProtoTreeClassifier)):
        if isinstance(classifier, cls):
            return kind
    raise TypeError(f"use_protokern: expected a CaBRNet ProtoPNetClassifier, "
                    f"ProtoPoolClassifier or ProtoTreeClassifier, got {type(classifier).__name__}")


def use_protokern(classifier: nn.Module) -> nn.Module:
    """Patch a CaBRNet classifier instance (ProtoPNet, ProtoPool, ProtoTree) to run on
    protokern's ops; returns it. Idempotent; its class and every other instance are untouched.

    Its ``forward`` returns what CaBRNet's returns (logits, min distances, ...), with the
    exact distances and their gradients, without the ``(N, P, H, W)`` map.
    """
    if getattr(classifier, "_protokern_patched", False):
        return classifier
    kind, metric = _kind(classifier), _metric(classifier)
    cls = type(classifier)

    def distances(self, features: Tensor, **kwargs) -> Tensor:
        if id(self) not in _POOLING.get():  # self, not a captured id: deep copies work too
            return distance_map(features, self.prototypes, metric)
        minimum = min_distance(features, self.prototypes, metric).values  # (N, P)
        if kind == "protopool":
            mean = mean_distance(features, self.prototypes, metric)
            return torch.stack([minimum, 2 * mean - minimum], -1)[:, :, None, :]
        return minimum[:, :, None, None]

    def similarities(self, features: Tensor, **kwargs) -> Tensor:
        return self.similarity_layer.distances_to_similarities(self.distances(features))

    def forward(self, *args, **kwargs):
        token = _POOLING.set(_POOLING.get() | {id(self)})
        try:
            return cls.forward(self, *args, **kwargs)
        finally:
            _POOLING.reset(token)

    for name, function in (("distances", distances), ("similarities", similarities),
                           ("forward", forward)):
        object.__setattr__(classifier, name, types.MethodType(function, classifier))
    classifier._protokern_patched = True
    return classifier
