"""Original ProtoPNet (cfchen-duke) and CaBRNet checkpoints load into models built on
`pk.nn.PrototypeLayer` through `pk.nn.port_state_dict`, and give the original's outputs."""

import pytest
import torch
from originals import ProtoPNetHead
from torch import nn

import protokern as pk
from protokern.models.backbones import build_backbone
from protokern.models.protopnet import ProtoPNet


class PortedHead(nn.Module):
    """The recipe of docs/porting.md: ProtoPNetHead with its prototype layer on protokern."""

    def __init__(self, num_prototypes: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.prototype_layer = pk.nn.PrototypeLayer(num_prototypes, dim)
        self.last_layer = nn.Linear(num_prototypes, num_classes, bias=False)

    def forward(self, x):
        min_distances = self.prototype_layer(x).values
        return self.last_layer(torch.log((min_distances + 1) / (min_distances + 1e-4))), \
            min_distances


def test_a_cfchen_duke_state_dict_loads_and_gives_its_outputs():
    original = ProtoPNetHead(20, 16, 4).double()
    ported = PortedHead(20, 16, 4).double()
    with pytest.raises(RuntimeError, match="prototype_vectors"):  # the friction: keys differ
        ported.load_state_dict(original.state_dict())
    ported.load_state_dict(pk.nn.port_state_dict(original.state_dict()))
    x = torch.rand(3, 16, 7, 7, dtype=torch.float64)
    for got, want in zip(ported(x), original(x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_protopnet_loads_an_original_checkpoint():
    model = ProtoPNet(build_backbone("small_cnn"), num_classes=3, image_size=32,
                      prototypes_per_class=2, prototype_dim=8)
    original = {key: value for key, value in model.state_dict().items()
                if key != "prototype_class_identity"}  # cfchen-duke does not save it
    original["prototype_vectors"] = original.pop("prototype_layer.prototype_vectors") + 1
    original["ones"] = torch.ones(6, 8, 1, 1)
    fresh = ProtoPNet(build_backbone("small_cnn"), num_classes=3, image_size=32,
                      prototypes_per_class=2, prototype_dim=8)
    fresh.load_original_state_dict(original)
    assert torch.equal(fresh.prototype_layer.prototype_vectors, original["prototype_vectors"])
    assert torch.equal(fresh.prototype_class_identity, model.prototype_class_identity)


def test_port_state_dict_names_what_is_missing_and_renames_prefixes():
    with pytest.raises(KeyError, match="prototype_vectors"):
        pk.nn.port_state_dict({"last_layer.weight": torch.zeros(2, 3)})
    state = {"classifier.prototypes": torch.zeros(5, 4), "classifier.last_layer.weight":
             torch.zeros(2, 5), "classifier.proto_class_map": torch.zeros(5, 2),
             "extractor.convnet.conv.weight": torch.zeros(1)}
    ported = pk.nn.port_state_dict(state, "cabrnet", prefixes={"extractor.convnet.": "features."})
    assert ported["prototype_layer.prototype_vectors"].shape == (5, 4, 1, 1)
    assert set(ported) == {"prototype_layer.prototype_vectors", "last_layer.weight",
                           "prototype_class_identity", "features.conv.weight"}
