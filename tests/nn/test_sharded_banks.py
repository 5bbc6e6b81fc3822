"""VectorQuantizer and PatchMemoryBank with their bank split over 2 gloo ranks equal the
unsharded modules: indices, quantized vectors, losses and scores; gradients (each shard its
rows of the codebook's); the training steps' codebook updates and restarts; the fitted bank."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "distributed"))
from gloo import run_on_gloo  # noqa: E402

import protokern as pk  # noqa: E402

DIM, NUM_CODES = 6, 11  # shards of 6 and 5 codes


def _vq_run(vq: pk.nn.VectorQuantizer) -> dict:
    """Two training steps (codebook updates, a restart) then a forward and backward."""
    results = {}
    for step in range(2):
        x = torch.randn(2, DIM, 3, 4, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(step))
        x.requires_grad_()
        quantized, indices, loss = vq(x)
        weights = torch.linspace(-1, 1, quantized.numel(), dtype=torch.float64)
        (loss + (quantized.flatten() * weights).sum()).backward()
        results[step] = {"quantized": quantized.detach(), "indices": indices,
                         "loss": loss.detach(), "x_grad": x.grad}
    results["codebook"] = vq.codebook.detach().clone()
    results["cluster_size"] = vq.cluster_size.clone()
    if not vq.ema:
        results["codebook_grad"] = vq.codebook.grad.clone()
    return results


def _vq_modules(process_group=None) -> list[pk.nn.VectorQuantizer]:
    # decay 0.2 and threshold 0.5: unused codes die after one step and restart
    return [pk.nn.VectorQuantizer(NUM_CODES, DIM, ema=ema, cosine=cosine, decay=0.2,
                                  dead_code_threshold=0.5, seed=3, dtype=torch.float64,
                                  process_group=process_group)
            for ema in (False, True) for cosine in (False, True)]


def _bank_run(memory: pk.nn.PatchMemoryBank) -> dict:
    normal = torch.randn(5, DIM, 4, 4, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0))
    test = 1.3 * torch.randn(3, DIM, 4, 3, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(1))
    memory.fit(normal)
    patch_scores, image_scores = memory.score(test)
    return {"bank": memory.bank.clone(), "patch_scores": patch_scores,
            "image_scores": image_scores, "state": memory.state_dict()}


def _bank_module(process_group=None) -> pk.nn.PatchMemoryBank:
    return pk.nn.PatchMemoryBank(DIM, coreset_ratio=0.2, num_neighbors=3, seed=1,
                                 process_group=process_group)


def _sharded(rank: int, world_size: int) -> dict:
    vqs = _vq_modules()
    assert all(vq.sharding.group is not None for vq in vqs)
    return {"vq": [_vq_run(vq) for vq in vqs], "vq_rows": vqs[0].sharding.rows,
            "bank": _bank_run(_bank_module())}


def test_sharded_modules_equal_the_unsharded():
    ranks = run_on_gloo(_sharded, 2)
    expected_vq = [_vq_run(vq) for vq in _vq_modules()]
    expected_bank = _bank_run(_bank_module())
    for rank, result in enumerate(ranks):
        rows = result["vq_rows"]
        assert (rows.start, rows.stop) == ((0, 6), (6, 11))[rank]
        for got, expected in zip(result["vq"], expected_vq, strict=True):
            for step in (0, 1):
                assert torch.equal(got[step]["indices"], expected[step]["indices"])
                for name in ("quantized", "loss", "x_grad"):
                    torch.testing.assert_close(got[step][name], expected[step][name],
                                               rtol=1e-12, atol=1e-12)
            for name in ("codebook", "cluster_size", "codebook_grad"):
                if name in expected:
                    torch.testing.assert_close(got[name], expected[name][rows], rtol=1e-12,
                                               atol=1e-12)
        bank_rows = result["bank"]["bank"].shape[0]
        assert bank_rows == (8, 8)[rank]  # 16 of 80 patches, 8 per rank
        start = 8 * rank
        assert torch.equal(result["bank"]["bank"],
                           expected_bank["bank"][start:start + bank_rows])
        for name in ("patch_scores", "image_scores"):
            torch.testing.assert_close(result["bank"][name], expected_bank[name], rtol=1e-12,
                                       atol=1e-12)
        assert int(result["bank"]["state"]["bank_size"]) == 16
