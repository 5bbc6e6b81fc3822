"""The ops trace under torch.compile(fullgraph=True): no graph break, same numbers as eager."""

import pytest
import torch

import protokern as pk


class TinyProtoNet(torch.nn.Module):
    """A conv backbone, a prototype layer and a linear head: the shape of a ProtoPNet."""

    def __init__(self, metric: str, patch: int):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Sigmoid())
        self.prototypes = pk.nn.PrototypeLayer(12, 8, patch=patch, metric=metric)
        self.head = torch.nn.Linear(12, 4)

    def forward(self, images):
        features = self.features(images)
        values, indices = self.prototypes(features)
        return self.head(torch.log((values + 1) / (values + 1e-4))), indices, \
            self.prototypes.distance_map(features)


def _run(model, images):
    logits, indices, dmap = model(images)
    (logits.square().sum() + dmap.mean()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return logits, indices, dmap, grads


@pytest.mark.parametrize("compiler, metric, patch", [
    ("inductor", "sqeuclidean", 2),
    ("aot_eager", "cosine", 1),
])
def test_compiled_module_matches_eager(backend, compiler, metric, patch):
    torch._dynamo.reset()
    model = TinyProtoNet(metric, patch)
    images = torch.randn(5, 3, 9, 9)
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    eager_out = _run(model, images)
    compiled_out = _run(compiled, images)
    torch.testing.assert_close(compiled_out[0], eager_out[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(compiled_out[1], eager_out[1])
    torch.testing.assert_close(compiled_out[2], eager_out[2], rtol=1e-5, atol=1e-5)
    for compiled_grad, eager_grad in zip(compiled_out[3], eager_out[3], strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)


def test_tokens_compile_with_dynamic_batch(backend):
    torch._dynamo.reset()
    prototypes = torch.randn(7, 16)

    def head(tokens):
        return pk.min_distance(tokens, prototypes, "cosine")

    compiled = torch.compile(head, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in (3, 5):
        tokens = torch.randn(batch, 4, 16)
        got, want = compiled(tokens), head(tokens)
        torch.testing.assert_close(got.values, want.values)
        assert torch.equal(got.indices, want.indices)
