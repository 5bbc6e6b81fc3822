"""The oracle is exact in float32 too: its choice is the brute force's first exact minimum.

(The contract tests in test_ops.py allow fast backends near-ties within the tolerance.)
"""

import pytest
import torch
from brute_force import distances, first_min
from helpers import pushed_prototypes

import protokern as pk


@pytest.fixture(autouse=True)
def _reference():
    with pk.use_backend("reference"):
        yield


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_pushed_prototype_is_found_despite_a_near_duplicate(metric):
    x, p = pushed_prototypes()
    values, indices = pk.min_distance(x, p, metric)
    assert indices[0, 0] == 4 * 7 + 2  # not the near-duplicate at flat index 5
    if metric == "sqeuclidean":
        assert values[0, 0] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_indices_are_the_brute_force_first_minimum(metric, dtype, offset):
    """Positive offsets make |x|^2 large against the distances (cancellation in float32)."""
    x = (offset + 1e-2 * torch.randn(6, 64, 6, 6)).to(dtype)
    p = (offset + 1e-2 * torch.randn(40, 64, 2, 2)).to(dtype)
    values, indices = pk.min_distance(x, p, metric)
    true_values, true_indices = first_min(distances(x, p, metric))
    assert torch.equal(indices, true_indices)
    torch.testing.assert_close(values, true_values.to(dtype), rtol=1e-6, atol=0)
