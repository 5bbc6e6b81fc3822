"""PatchMemoryBank against PatchCore written from the paper in plain PyTorch (the full
patch-to-bank distance matrix, min, max, equation 7's reweighting as anomalib computes it):
equal scores; its bank is the brute-force k-center coreset; the state dict round-trips it; bad
input raises and leaves the bank as it was."""

import pytest
import torch
from test_coreset import brute_force_k_center

import protokern as pk

DIM = 5


def paper_patchcore(bank: torch.Tensor, features: torch.Tensor, neighbors: int):
    """``(patch scores (B, H*W or L), image scores (B,))`` of ``features`` against ``bank``."""
    patches = features.movedim(1, -1).flatten(1, 2) if features.dim() == 4 else features
    distances = ((patches[:, :, None] - bank) ** 2).sum(-1).sqrt()  # (B, HW, M)
    scores, locations = distances.min(-1)
    image = scores.max(1).values
    if neighbors > 1:
        batch = torch.arange(len(patches))
        worst = scores.argmax(1)
        nearest_row = bank[locations[batch, worst]]  # m*
        support = ((nearest_row[:, None] - bank) ** 2).sum(-1).argsort(dim=1, stable=True)
        support = support[:, :neighbors]  # N_b(m*)
        to_support = (patches[batch, worst][:, None] - bank[support]).norm(dim=-1)
        image = (1 - to_support.softmax(1)[:, 0]) * image
    return scores, image


def _features(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("neighbors", [1, 4])
@pytest.mark.parametrize("layout", ["map", "tokens"])
def test_scores_match_the_paper(neighbors, layout):
    normal = _features(6, DIM, 4, 4)
    memory = pk.nn.PatchMemoryBank(DIM, coreset_ratio=1.0, num_neighbors=neighbors).fit(normal)
    bank = normal.movedim(1, -1).reshape(-1, DIM)
    assert torch.equal(memory.bank, bank)
    test = _features(3, DIM, 5, 3, seed=1) * 1.5
    if layout == "tokens":
        test = test.flatten(2).transpose(1, 2)
    patch_scores, image_scores = memory.score(test)
    ref_patches, ref_images = paper_patchcore(bank, test, neighbors)
    assert patch_scores.shape == ((3, 5, 3) if layout == "map" else (3, 15))
    torch.testing.assert_close(patch_scores.flatten(1), ref_patches, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(image_scores, ref_images, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("projection", [None, 3])
def test_bank_is_the_brute_force_coreset(projection):
    normal = _features(10, DIM, 4, 5)
    memory = pk.nn.PatchMemoryBank(DIM, coreset_ratio=0.1, projection=projection, seed=2)
    memory.fit(normal)
    points = normal.movedim(1, -1).reshape(-1, DIM)
    start = int(torch.randint(200, (), generator=torch.Generator().manual_seed(2)))
    chosen_on = points if projection is None else (
        pk.nn.coreset.sparse_random_projection(points, projection, seed=2))
    assert torch.equal(memory.bank, points[brute_force_k_center(chosen_on, 20, start)])
    assert int(memory.bank_size) == 20


def test_state_dict_round_trip():
    memory = pk.nn.PatchMemoryBank(DIM, coreset_ratio=0.25, num_neighbors=3)
    memory.fit(torch.randn(4, 9, DIM))
    fresh = pk.nn.PatchMemoryBank(DIM, num_neighbors=3)
    fresh.load_state_dict(memory.state_dict())
    test = torch.randn(2, 6, DIM)
    assert all(torch.equal(a, b) for a, b in zip(fresh.score(test), memory.score(test),
                                                 strict=True))
    assert repr(fresh) == ("PatchMemoryBank(dim=5, bank_size=9, coreset_ratio=0.1, "
                           "num_neighbors=3, projection=None)")


def test_bad_input_raises_and_leaves_the_bank():
    memory = pk.nn.PatchMemoryBank(DIM, coreset_ratio=0.5, num_neighbors=2)
    with pytest.raises(ValueError, match="empty; call fit"):
        memory.score(torch.randn(1, 3, DIM))
    memory.fit(torch.randn(2, 4, DIM))
    before = memory.bank.clone()
    nan = torch.randn(2, DIM, 3, 3)
    nan[1, 2, 0, 1] = float("nan")
    cases = [
        (memory.fit, nan, ValueError, r"\(2, 5, 3, 3\) contain NaN"),
        (memory.fit, torch.randn(2, 3, DIM + 1), ValueError, r"\(2, 3, 6\) have D=6.*D=5"),
        (memory.fit, torch.randn(1, 2, DIM), ValueError, "keep 1 patches, fewer than "
                                                         "num_neighbors=2"),
        (memory.fit, torch.randn(2, 2, 2, 2, DIM), ValueError, r"5-d tensor of shape"),
        (memory.score, torch.randn(4, DIM), ValueError, r"\(B, D, H, W\) maps or \(B, L, D\) "
                                                        r"tokens.*\(4, 5\)"),
        (memory.score, torch.randn(1, DIM + 2, 2, 2), ValueError, r"D=7 but the bank \(4, 5\)"),
        (memory.score, torch.randn(1, 2, DIM, dtype=torch.float64), TypeError, "float64"),
        (memory.fit, torch.ones(3, DIM, dtype=torch.int64), TypeError, "int64"),
    ]
    for call, features, error, message in cases:
        with pytest.raises(error, match=message):
            call(features)
        assert torch.equal(memory.bank, before) and int(memory.bank_size) == 4
    greedy = pk.nn.PatchMemoryBank(DIM, coreset_ratio=1.0, num_neighbors=5)
    greedy.load_state_dict(memory.state_dict())  # 4 rows < 5 neighbours
    with pytest.raises(ValueError, match="num_neighbors=5 exceeds the bank's 4 rows"):
        greedy.score(torch.randn(1, 2, DIM))


@pytest.mark.parametrize("neighbors", [1, 3])
def test_scoring_compiles_without_graph_breaks(neighbors):
    torch._dynamo.reset()
    memory = pk.nn.PatchMemoryBank(DIM, coreset_ratio=0.5, num_neighbors=neighbors)
    memory.fit(torch.randn(3, DIM, 4, 4))
    test = torch.randn(2, DIM, 3, 5)
    compiled = torch.compile(memory, backend="aot_eager", fullgraph=True)
    for got, expected in zip(compiled(test), memory.score(test), strict=True):
        torch.testing.assert_close(got, expected)
