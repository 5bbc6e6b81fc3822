"""Every bad input of DESIGN.md §2 raises TypeError/ValueError naming the argument and shapes,
before any backend runs."""

import numpy as np
import pytest
import torch

import protokern as pk
from protokern import backends
from protokern.backends import registry

OPS = [pk.min_distance, pk.distance_map]


def _spy_backend(calls: list):
    def record(*args):
        calls.append(args)
        raise AssertionError("a backend ran on invalid input")

    return backends.Backend("spy", {name: record for name in (
        "min_distance", "min_distance_backward", "distance_map", "distance_map_backward")})


@pytest.fixture
def spy(monkeypatch):
    """Select a backend that fails the test if any op reaches it."""
    calls: list = []
    monkeypatch.setitem(registry._registry, "spy", _spy_backend(calls))
    with pk.use_backend("spy"):
        yield calls
    assert calls == []


x4 = torch.randn(2, 4, 5, 6)
BAD_INPUTS = {
    # name: (x, prototypes, metric, error type, pattern in the message)
    "x-rank-2": (torch.randn(3, 4), torch.randn(5, 4), "sqeuclidean", ValueError,
                 r"x must be a \(B, D, H, W\) feature map or \(B, L, D\) tokens, got a 2-d "
                 r"tensor of shape \(3, 4\)"),
    "x-rank-5": (torch.randn(1, 2, 3, 4, 5), torch.randn(5, 2), "sqeuclidean", ValueError,
                 r"x must be .* shape \(1, 2, 3, 4, 5\)"),
    "prototypes-rank-3": (x4, torch.randn(5, 4, 2), "sqeuclidean", ValueError,
                          r"prototypes must be \(M, D\), \(M, D, 1, 1\) or \(M, D, ph, pw\), "
                          r"got a 3-d tensor of shape \(5, 4, 2\)"),
    "D-mismatch-map": (x4, torch.randn(5, 3), "sqeuclidean", ValueError,
                       r"x \(2, 4, 5, 6\) as \(B, D, H, W\) has D=4 but prototypes \(5, 3\) "
                       r"have D=3"),
    "D-mismatch-tokens": (torch.randn(2, 7, 4), torch.randn(5, 6, 1, 1), "cosine", ValueError,
                          r"x \(2, 7, 4\) as \(B, L, D\) has D=4 but prototypes \(5, 6, 1, 1\)"),
    "dtype-mismatch": (x4, torch.randn(5, 4, dtype=torch.float64), "sqeuclidean", TypeError,
                       r"x and prototypes must share a dtype, got x torch.float32 \(2, 4, 5, 6\)"
                       r" and prototypes torch.float64 \(5, 4\)"),
    "integer-x": (torch.ones(2, 4, 5, 6, dtype=torch.int64), torch.randn(5, 4), "sqeuclidean",
                  TypeError, r"x must be float16, bfloat16, float32 or float64, got torch.int64"),
    "complex-prototypes": (x4, torch.randn(5, 4, dtype=torch.complex64), "sqeuclidean",
                           TypeError, r"prototypes must be float16.*got torch.complex64"),
    "numpy-x": (np.ones((2, 4, 5, 6), np.float32), torch.randn(5, 4), "sqeuclidean", TypeError,
                r"x must be a torch.Tensor, got ndarray"),
    "list-prototypes": (x4, [[1.0] * 4], "sqeuclidean", TypeError,
                        r"prototypes must be a torch.Tensor, got list"),
    "mixed-devices": (x4, torch.randn(5, 4, device="meta"), "sqeuclidean", ValueError,
                      r"x and prototypes must be on one device, got x on cpu and prototypes on "
                      r"meta"),
    "empty-M": (x4, torch.randn(0, 4), "sqeuclidean", ValueError,
                r"prototypes \(0, 4\) is empty \(M = 0\) but x \(2, 4, 5, 6\) has B=2"),
    "window-too-tall": (x4, torch.randn(5, 4, 6, 2), "sqeuclidean", ValueError,
                        r"the prototype window 6x2 \(prototypes \(5, 4, 6, 2\)\) does not fit "
                        r"in the 5x6 feature map \(x \(2, 4, 5, 6\)"),
    "window-too-wide": (x4, torch.randn(5, 4, 1, 7), "cosine", ValueError,
                        r"the prototype window 1x7 .* does not fit in the 5x6 feature map"),
    "empty-window": (x4, torch.randn(5, 4, 0, 2), "cosine", ValueError,
                     r"the prototype window 0x2 .* does not fit"),
    "empty-map": (torch.randn(2, 4, 0, 6), torch.randn(5, 4), "cosine", ValueError,
                  r"the prototype window 1x1 .* does not fit in the 0x6 feature map"),
    "no-tokens": (torch.randn(2, 0, 4), torch.randn(5, 4), "cosine", ValueError,
                  r"the prototype window 1x1 .* does not fit in L=0 tokens "
                  r"\(x \(2, 0, 4\) as \(B, L, D\)\)"),
    "tokens-with-window": (torch.randn(2, 9, 4), torch.randn(5, 4, 2, 2), "sqeuclidean",
                           ValueError, r"tokens x \(2, 9, 4\) as \(B, L, D\) take prototypes "
                           r"\(M, D\) or \(M, D, 1, 1\), got prototypes \(5, 4, 2, 2\) with a "
                           r"2x2 window"),
    "unknown-metric": (x4, torch.randn(5, 4), "manhattan", ValueError,
                       r"unknown metric 'manhattan'; expected one of \('sqeuclidean', 'cosine', "
                       r"'euclidean', 'dot'\)"),
    "metric-not-a-string": (x4, torch.randn(5, 4), None, ValueError, r"unknown metric None"),
}


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.__name__)
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_before_any_backend_runs(spy, op, case):
    x, prototypes, metric, error, pattern = BAD_INPUTS[case]
    with pytest.raises(error, match=rf"protokern\.{op.__name__}: {pattern}"):
        op(x, prototypes, metric)


def test_prototype_layer_rejects_bad_arguments():
    for kwargs, pattern in [
        (dict(num_prototypes=0, dim=4), "num_prototypes must be a positive int, got 0"),
        (dict(num_prototypes=3, dim=-1), "dim must be a positive int, got -1"),
        (dict(num_prototypes=3, dim=4, patch=(2, 0)), "patch must be a positive int, got 0"),
        (dict(num_prototypes=3, dim=4, patch=1.5),
         r"patch must be an int or a pair \(ph, pw\), got 1.5"),
        (dict(num_prototypes=3, dim=4, patch=(1, 2, 3)), r"patch must be .*, got \(1, 2, 3\)"),
        (dict(num_prototypes=3, dim=4, metric="l2"), "unknown metric 'l2'"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            pk.nn.PrototypeLayer(**kwargs)
