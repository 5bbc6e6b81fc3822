"""The oracle is exact in float32 too: its choice is the brute force's first exact minimum.

(The contract tests in test_ops.py allow fast backends near-ties within the tolerance.)
"""

import pytest
import torch
from brute_force import distances, first_min
from cases import METRICS
from helpers import pushed_prototypes

import protokern as pk
from protokern.backends import reference


@pytest.fixture(autouse=True)
def _reference():
    with pk.use_backend("reference"):
        yield


@pytest.mark.parametrize("metric", METRICS)
def test_pushed_prototype_is_found_despite_a_near_duplicate(metric):
    x, p = pushed_prototypes()
    values, indices = pk.min_distance(x, p, metric)
    assert indices[0, 0] == 4 * 7 + 2  # not the near-duplicate at flat index 5
    if metric == "sqeuclidean":
        assert values[0, 0] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_indices_are_the_brute_force_first_minimum(metric, dtype, offset):
    """Positive offsets make |x|^2 large against the distances (cancellation in float32)."""
    x = (offset + 1e-2 * torch.randn(6, 64, 6, 6)).to(dtype)
    p = (offset + 1e-2 * torch.randn(40, 64, 2, 2)).to(dtype)
    values, indices = pk.min_distance(x, p, metric)
    true_values, true_indices = first_min(distances(x, p, metric))
    assert torch.equal(indices, true_indices)
    torch.testing.assert_close(values, true_values.to(dtype), rtol=1e-6, atol=0)


def test_exact_sums_do_not_depend_on_batching_or_threads():
    """torch.sum reduces one long row in another order than a batch of rows (K > 32768), which
    once broke exact ties; the oracle's exact sums depend on the values alone."""
    rows = torch.randn(5, 70001, dtype=torch.float64)
    batched = reference.fixed_order_sum(rows)
    alone = torch.stack([reference.fixed_order_sum(rows[i:i + 1])[0] for i in range(5)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_thread = reference.fixed_order_sum(rows)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batched, alone) and torch.equal(batched, single_thread)
    torch.testing.assert_close(batched, rows.sum(-1))


@pytest.mark.parametrize("metric", METRICS)
def test_ties_at_very_large_width(metric, monkeypatch):
    x = torch.randn(40000).expand(1, 9, 40000).contiguous()
    p = torch.randn(3, 40000)
    for chunk in (8 * 40000, 8 * 40000 * 4, reference.CHUNK_ELEMENTS):  # 1-, 4-row and whole
        monkeypatch.setattr(reference, "CHUNK_ELEMENTS", chunk)
        assert (pk.min_distance(x, p, metric).indices == 0).all()


def test_subnormal_inputs():
    """The rounding bound has an absolute term: relative bounds underflow with subnormals."""
    x = torch.stack([torch.full((64,), 3e-23), torch.zeros(64)])[None]  # (1, 2, 64) tokens
    p = torch.full((1, 64), 2e-23)
    values, indices = pk.min_distance(x, p)
    true_values, true_indices = first_min(distances(x, p, "sqeuclidean"))
    assert torch.equal(indices, true_indices)
    assert values.item() == true_values.float().item()


@pytest.fixture
def matmul_precision():
    """Set PyTorch's float32 matmul precision (new per-device API) and restore it after."""
    saved = (torch.backends.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)

    def set_precision(scope: str, value: str):
        if scope == "global":
            torch.backends.fp32_precision = value
        else:
            torch.backends.mkldnn.matmul.fp32_precision = value

    yield set_precision
    torch.backends.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = saved


@pytest.mark.parametrize("scope, value", [("mkldnn", "bf16"), ("mkldnn", "tf32"),
                                          ("global", "bf16")])
def test_new_matmul_precision_settings_keep_the_exact_minimum(matmul_precision, scope, value):
    """The per-device fp32_precision settings (PyTorch >= 2.9) once made every float32 call
    raise. Where they really lower the GEMM's precision the shortlist widens to match; on CPUs
    whose oneDNN ignores them (as in CI) this checks the reading of the setting only."""
    matmul_precision(scope, value)
    x = 3.0 + 1e-2 * torch.randn(4, 64, 6, 6)
    p = 3.0 + 1e-2 * torch.randn(30, 64)
    for metric in METRICS:
        values, indices = pk.min_distance(x, p, metric)
        true_values, true_indices = first_min(distances(x, p, metric))
        assert torch.equal(indices, true_indices)
        torch.testing.assert_close(values, true_values.float(), rtol=1e-6, atol=0)
