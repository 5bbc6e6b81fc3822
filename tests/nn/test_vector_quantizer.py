"""VectorQuantizer against VQ-VAE written from the paper in plain PyTorch (a dense distance
matrix, argmin, the two losses, the straight-through estimator and the EMA update of the
appendix): equal indices, losses, gradients and codebooks; bad input raises before any state
changes."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import protokern as pk

NUM_CODES, DIM = 13, 6


def paper_vq(x: torch.Tensor, codebook: torch.Tensor, beta: float, ema: bool, cosine: bool):
    """VQ-VAE on ``x`` ``(..., D)`` tokens-last: ``(quantized, indices, loss)``."""
    if cosine:
        x, codebook = F.normalize(x, dim=-1), F.normalize(codebook, dim=-1)
    distances = ((x[..., None, :] - codebook) ** 2).sum(-1)  # (..., M): the matrix protokern avoids
    indices = distances.argmin(-1)
    codes = codebook[indices]
    loss = beta * F.mse_loss(x, codes.detach())
    if not ema:
        loss = loss + F.mse_loss(codes, x.detach())
    return x + (codes - x).detach(), indices, loss


def paper_ema_step(codebook, cluster_size, embed_sum, x, indices, decay, eps):
    """The appendix's EMA update with sonnet's Laplace smoothing: new codebook, counts, sums."""
    onehot = F.one_hot(indices, codebook.shape[0]).to(x.dtype)  # (N, M)
    cluster_size = decay * cluster_size + (1 - decay) * onehot.sum(0)
    embed_sum = decay * embed_sum + (1 - decay) * onehot.T @ x
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + codebook.shape[0] * eps) * total
    return embed_sum / smoothed[:, None], cluster_size, embed_sum


def _inputs(layout: str) -> torch.Tensor:
    shape = (3, DIM, 4, 5) if layout == "map" else (3, 7, DIM)
    return torch.randn(shape, dtype=torch.float64)


def _tokens_last(t: torch.Tensor) -> torch.Tensor:
    return t.movedim(1, -1) if t.dim() == 4 else t


@pytest.mark.parametrize("layout", ["map", "tokens"])
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("ema", [False, True])
def test_matches_the_paper(layout, cosine, ema):
    torch.manual_seed(0)
    vq = pk.nn.VectorQuantizer(NUM_CODES, DIM, ema=ema, cosine=cosine, dtype=torch.float64)
    vq.eval()  # state changes are tested below
    codebook = vq.codebook.detach().clone().requires_grad_(not ema)
    x = _inputs(layout).requires_grad_()
    x_ref = _tokens_last(x.detach()).clone().requires_grad_()
    quantized, indices, loss = vq(x)
    ref_quantized, ref_indices, ref_loss = paper_vq(x_ref, codebook, 0.25, ema, cosine)

    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(_tokens_last(quantized), ref_quantized, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    weights = torch.randn(ref_quantized.shape, dtype=torch.float64)
    (loss + (_tokens_last(quantized) * weights).sum()).backward()
    (ref_loss + (ref_quantized * weights).sum()).backward()
    torch.testing.assert_close(_tokens_last(x.grad), x_ref.grad, rtol=1e-12, atol=1e-12)
    if not ema:
        torch.testing.assert_close(vq.codebook.grad, codebook.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cosine", [False, True])
def test_ema_steps_match_the_appendix(cosine):
    decay, eps = 0.8, 1e-5
    vq = pk.nn.VectorQuantizer(NUM_CODES, DIM, ema=True, decay=decay, eps=eps, cosine=cosine,
                               dtype=torch.float64)
    codebook = vq.codebook.clone()
    cluster_size, embed_sum = vq.cluster_size.clone(), vq.embed_sum.clone()
    for step in range(3):
        x = _inputs("tokens")
        _, indices, _ = vq(x)
        used = F.normalize(x, dim=-1) if cosine else x
        _, ref_indices, _ = paper_vq(used, codebook, 0.25, True, False)
        assert torch.equal(indices, ref_indices), step
        codebook, cluster_size, embed_sum = paper_ema_step(
            codebook, cluster_size, embed_sum, used.reshape(-1, DIM), indices.reshape(-1),
            decay, eps)
        if cosine:
            codebook = F.normalize(codebook, dim=-1)
        torch.testing.assert_close(vq.codebook, codebook, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(vq.cluster_size, cluster_size, rtol=1e-12, atol=1e-12)
    assert int(vq.steps) == 3


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_restart_on_batch_vectors(ema):
    threshold = 0.3
    vq = pk.nn.VectorQuantizer(NUM_CODES, DIM, ema=ema, decay=0.5,
                               dead_code_threshold=threshold, dtype=torch.float64)
    x = _inputs("tokens")
    with torch.no_grad():
        vq.codebook[1:] += 100.0  # every vector picks code 0: the others die
        if ema:
            vq.embed_sum[1:] += 100.0
    before = vq.codebook.detach().clone()
    vq(x)  # usage 1 -> 0.5: alive
    if ema:  # an unused code's sum and count decay alike: it stays where it was, to rounding
        torch.testing.assert_close(vq.codebook[1:], before[1:], rtol=1e-3, atol=0)
    else:
        assert torch.equal(vq.codebook.detach()[1:], before[1:])
    vq(x)  # 0.5 -> 0.25 < 0.3: codes 1.. restart on vectors of x
    vectors = x.reshape(-1, DIM)
    for row in vq.codebook.detach()[1:]:
        assert (vectors == row).all(1).any(), "a restarted code is not a vector of the batch"
    assert torch.equal(vq.cluster_size[1:], torch.full((NUM_CODES - 1,), threshold,
                                                       dtype=torch.float64))
    assert vq.cluster_size[0] > threshold


def test_state_dict_round_trip_and_repr():
    vq = pk.nn.VectorQuantizer(NUM_CODES, DIM, ema=True, dead_code_threshold=0.1)
    vq(torch.randn(2, 5, DIM))
    other = pk.nn.VectorQuantizer(NUM_CODES, DIM, ema=True, dead_code_threshold=0.1, seed=7)
    assert not torch.equal(other.codebook, vq.codebook)
    other.load_state_dict(vq.state_dict())
    assert set(vq.state_dict()) == {"codebook", "embed_sum", "cluster_size", "steps"}
    x = torch.randn(2, DIM, 3, 3)
    vq.eval(), other.eval()
    assert all(torch.equal(a, b) for a, b in zip(vq(x), other(x), strict=True))
    assert "num_codes=13, dim=6" in repr(vq) and "ema=True" in repr(vq)


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    vq = pk.nn.VectorQuantizer(NUM_CODES, DIM).eval()
    compiled = torch.compile(vq, backend="aot_eager", fullgraph=True)
    results = []
    for module in (vq, compiled):
        x = torch.randn(2, DIM, 3, 4, generator=torch.Generator().manual_seed(1),
                        requires_grad=True)
        quantized, indices, loss = module(x)
        (quantized.square().sum() + loss).backward()
        results.append((quantized.detach(), indices, loss.detach(), x.grad,
                        vq.codebook.grad.clone()))
        vq.zero_grad()
    for eager, compiled_result in zip(*results, strict=True):
        torch.testing.assert_close(compiled_result, eager)


def _state(vq):
    return {name: t.clone() for name, t in vq.state_dict().items()}


@pytest.mark.parametrize("x, error, message", [
    (torch.randn(2, DIM), ValueError, r"\(B, D, H, W\) map or \(B, L, D\) tokens.*\(2, 6\)"),
    (torch.randn(2, DIM + 1, 3, 3), ValueError, r"\(2, 7, 3, 3\).*D=7.*\(13, 6\) has D=6"),
    (torch.randn(2, 4, DIM + 2), ValueError, r"\(2, 4, 8\).*D=8"),
    (torch.randn(2, 4, DIM, dtype=torch.float64), TypeError, r"float64.*float32"),
    (torch.full((2, 4, DIM), float("nan")), ValueError, r"\(2, 4, 6\) contains NaN"),
    ("tokens", TypeError, r"x must be a torch.Tensor"),
])
def test_bad_input_raises_and_changes_nothing(x, error, message):
    vq = pk.nn.VectorQuantizer(NUM_CODES, DIM, ema=True, dead_code_threshold=0.5)
    before = _state(vq)
    with pytest.raises(error, match=message):
        vq(x)
    assert all(torch.equal(before[name], t) for name, t in vq.state_dict().items())


@pytest.mark.parametrize("kwargs, message", [
    ({"num_codes": 0}, "num_codes"), ({"decay": 1.0}, "decay"),
    ({"commitment_weight": -1.0}, "commitment_weight"),
    ({"dead_code_threshold": -0.1}, "dead_code_threshold"),
])
def test_bad_arguments(kwargs, message):
    arguments = {"num_codes": NUM_CODES, "dim": DIM, **kwargs}
    with pytest.raises(ValueError, match=message):
        pk.nn.VectorQuantizer(arguments.pop("num_codes"), arguments.pop("dim"), **arguments)


def test_readme_example_runs():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Vector quantisation and anomaly detection", 1)[1]
    exec(compile(re.search(r"```python\n(.*?)```", section, re.S).group(1), "README.md", "exec"),
         {})
