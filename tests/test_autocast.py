"""Mixed precision: under `torch.autocast` every op casts both inputs to the autocast dtype, as
``torch.matmul`` does, so features in bf16/fp16 meet a float32 prototype parameter (DESIGN §2:
the inputs must otherwise share a dtype). Kernels run with autocast off: their own float32
GEMMs are not lowered a second time."""

import pytest
import torch

import protokern as pk


def _as_tuple(out):
    return tuple(out) if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("op", ["min_distance", "distance_map"])
@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_cpu_bfloat16_autocast_equals_casting_by_hand(backend, op, metric):
    function = getattr(pk, op)
    x = torch.rand(2, 8, 5, 5)  # float32 features, as a conv backbone gives outside autocast
    prototypes = torch.rand(7, 8, 2, 2, requires_grad=True)  # the float32 parameter
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _as_tuple(function(x, prototypes, metric))
    assert out[0].dtype == torch.bfloat16
    out[0].float().sum().backward()
    assert prototypes.grad.dtype == torch.float32  # the cast is differentiable
    grad_under_autocast = prototypes.grad.clone()

    prototypes.grad = None
    by_hand = _as_tuple(function(x.bfloat16(), prototypes.bfloat16(), metric))
    by_hand[0].float().sum().backward()
    for got, want in zip(out, by_hand, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(grad_under_autocast, prototypes.grad)


def test_bfloat16_features_meet_a_float32_parameter_only_under_autocast(backend):
    features = torch.rand(2, 8, 4, 4, dtype=torch.bfloat16)
    layer = pk.nn.PrototypeLayer(num_prototypes=6, dim=8)
    with pytest.raises(TypeError, match="x and prototypes must share a dtype"):
        layer(features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, indices = layer(features)
    assert values.dtype == torch.bfloat16 and indices.shape == (2, 6)


def test_float64_is_left_alone_under_autocast(backend):
    """As matmul: autocast lowers float32, not float64."""
    x = torch.rand(2, 8, 4, 4, dtype=torch.float64)
    prototypes = torch.rand(6, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, indices = pk.min_distance(x, prototypes)
    plain = pk.min_distance(x, prototypes)
    assert values.dtype == torch.float64
    assert torch.equal(values, plain.values) and torch.equal(indices, plain.indices)


def test_autocast_for_another_device_changes_nothing():
    x, prototypes = torch.rand(2, 8, 4, 4), torch.rand(6, 8)
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        values, _ = pk.min_distance(x, prototypes)  # CPU tensors: CUDA autocast does not apply
    assert values.dtype == torch.float32


def test_compiled_under_autocast_matches_eager():
    torch._dynamo.reset()
    prototypes = torch.rand(6, 8, requires_grad=True)

    def head(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return pk.min_distance(x, prototypes).values

    x = torch.rand(2, 8, 4, 4)
    compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), head(x))
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.parametrize("name", pk.available_backends("cuda") if torch.cuda.is_available()
                         else ["cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_equals_casting_by_hand(name, dtype):
    x = torch.rand(4, 16, 7, 7, device="cuda")
    prototypes = torch.rand(50, 16, device="cuda", requires_grad=True)
    with pk.use_backend(name):
        with torch.autocast("cuda", dtype=dtype):
            values, indices = pk.min_distance(x, prototypes)
        by_hand = pk.min_distance(x.to(dtype), prototypes.to(dtype))
    assert values.dtype == dtype
    assert torch.equal(values, by_hand.values) and torch.equal(indices, by_hand.indices)
