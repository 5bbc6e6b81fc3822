"""pk.nn.PrototypeLayer: a ProtoPNet-style drop-in layer over the ops."""

import pytest
import torch
from cases import METRICS

import protokern as pk


def test_prototypes_are_initialised_like_protopnet():
    layer = pk.nn.PrototypeLayer(2000, 128, patch=(1, 1))
    vectors = layer.prototype_vectors
    assert isinstance(vectors, torch.nn.Parameter) and vectors.shape == (2000, 128, 1, 1)
    assert vectors.min() >= 0 and vectors.max() < 1
    assert abs(vectors.mean().item() - 0.5) < 0.01  # uniform [0, 1), not constant
    assert vectors.std() > 0.28


def test_shape_properties_and_repr():
    layer = pk.nn.PrototypeLayer(12, 7, patch=3, metric="cosine", dtype=torch.float64)
    assert layer.prototype_vectors.shape == (12, 7, 3, 3)
    assert layer.prototype_vectors.dtype == torch.float64
    assert (layer.num_prototypes, layer.dim, layer.patch) == (12, 7, (3, 3))
    assert "num_prototypes=12, dim=7, patch=(3, 3), metric='cosine'" in repr(layer)


@pytest.mark.parametrize("metric", METRICS)
def test_forward_and_distance_map_are_the_ops(backend, metric):
    layer = pk.nn.PrototypeLayer(9, 5, patch=(2, 3), metric=metric)
    x = torch.randn(4, 5, 6, 7, requires_grad=True)
    values, indices = layer(x)
    expected = pk.min_distance(x, layer.prototype_vectors, metric)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
    dmap = layer.distance_map(x)
    assert dmap.shape == (4, 9, 5, 5)
    torch.testing.assert_close(dmap.flatten(2).gather(-1, indices[..., None])[..., 0], values,
                               rtol=1e-5, atol=1e-5)
    values.sum().backward()
    assert layer.prototype_vectors.grad is not None and x.grad is not None


def test_tokens_input_with_a_1x1_layer(backend):
    layer = pk.nn.PrototypeLayer(6, 8)
    tokens = torch.randn(3, 10, 8)
    values, indices = layer(tokens)
    assert values.shape == (3, 6) and int(indices.max()) < 10
    assert layer.distance_map(tokens).shape == (3, 6, 10)


def test_state_dict_round_trip():
    layer = pk.nn.PrototypeLayer(5, 4, patch=2)
    other = pk.nn.PrototypeLayer(5, 4, patch=2)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.prototype_vectors, layer.prototype_vectors)
    assert list(layer.state_dict()) == ["prototype_vectors"]
