"""nearest_prototypes over a bank sharded across 2 gloo ranks equals the unsharded op: values
and indices bit for bit in float64, ties going to the lowest global index; gradients reach each
shard's rows (bit for bit) and x (bit for bit where each entry of x gets one pair's gradient:
k = 1 and 1x1 windows; else to rounding, the ranks' parts being summed in another order)."""

from dataclasses import dataclass

import pytest
import torch
from gloo import run_on_gloo

import protokern as pk

WORLD_SIZE = 2
DIM = 5


@dataclass(frozen=True)
class Case:
    metric: str
    num_prototypes: int  # 7: shards 4 + 3; 3 with k = 2: a shard (1 row) smaller than k
    k: int
    layout: str  # "map2x2", "tokens" or "vectors"
    duplicates: bool = False  # the last prototype copies the first: a tie across the shards

    @property
    def id(self) -> str:
        tie = "-tie" if self.duplicates else ""
        return f"{self.metric}-M{self.num_prototypes}-k{self.k}-{self.layout}{tie}"

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = {"map2x2": lambda: torch.randn(3, DIM, 4, 5),
             "tokens": lambda: torch.randn(3, 6, DIM),
             "vectors": lambda: torch.randn(20, DIM)}[self.layout]().double()
        patch = (2, 2) if self.layout == "map2x2" else (1, 1)
        bank = torch.randn(self.num_prototypes, DIM, *patch, dtype=torch.float64)
        if self.duplicates:
            bank[-1] = bank[0]
        return x, bank


CASES = [Case(metric, m, k, layout)
         for metric in ("sqeuclidean", "cosine")
         for m, k in ((7, 1), (7, 3), (3, 2), (7, 7))
         for layout in ("map2x2", "tokens", "vectors")] + [
    Case("sqeuclidean", 7, 2, "vectors", duplicates=True),
    Case("cosine", 6, 1, "tokens", duplicates=True),
]
BACKENDS = [name for name in pk.available_backends("cpu") if name in ("cpu", "reference")]


def _loss_and_grads(layer, x, case):
    x = x.clone().requires_grad_()
    values, indices = layer.nearest_prototypes(x, case.k)
    weights = torch.arange(values.numel(), dtype=values.dtype).reshape(values.shape).cos()
    (values * weights).sum().backward()
    return {"values": values.detach(), "indices": indices, "x_grad": x.grad,
            "bank_grad": layer.prototype_vectors.grad}


def _run_cases(rank: int, world_size: int) -> dict:
    results = {}
    for backend in BACKENDS:
        with pk.use_backend(backend):
            for seed, case in enumerate(CASES):
                torch.manual_seed(seed)
                x, bank = case.inputs()
                layer = pk.nn.ShardedPrototypeLayer.from_full(bank, case.metric)
                results[backend, case] = dict(_loss_and_grads(layer, x, case), shard=layer.shard)
    layer = pk.nn.ShardedPrototypeLayer(4, DIM, data_parallel=True)
    try:
        layer.nearest_prototypes(torch.randn(2, DIM))
    except ValueError as error:
        results["data_parallel"] = str(error)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_on_gloo(_run_cases, WORLD_SIZE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_equals_the_unsharded_op(ranks, backend, case):
    torch.manual_seed(CASES.index(case))
    x, bank = case.inputs()
    with pk.use_backend(backend):
        layer = pk.nn.PrototypeLayer(case.num_prototypes, DIM, tuple(bank.shape[2:]),
                                     case.metric, dtype=torch.float64)
        with torch.no_grad():
            layer.prototype_vectors.copy_(bank)
        want = _loss_and_grads(layer, x, case)
    bank_grad = torch.zeros_like(bank)
    for rank in ranks:
        got = rank[backend, case]
        assert torch.equal(got["values"], want["values"])
        assert torch.equal(got["indices"], want["indices"])
        if case.k == 1 and case.layout != "map2x2":  # one pair per pixel: nothing to reorder
            assert torch.equal(got["x_grad"], want["x_grad"])
        else:
            torch.testing.assert_close(got["x_grad"], want["x_grad"], rtol=1e-12, atol=1e-12)
        bank_grad[got["shard"]] = got["bank_grad"]
    assert torch.equal(bank_grad, want["bank_grad"])


def test_ties_across_shards_go_to_the_lowest_global_index(ranks):
    case = CASES[-2]  # the last prototype (on rank 1) copies the first (on rank 0)
    for rank in ranks:
        indices = rank[BACKENDS[0], case]["indices"]
        assert (indices == 0).any() and not (indices == case.num_prototypes - 1)[:, 0].any()


def test_data_parallel_layers_refuse(ranks):
    for rank in ranks:
        assert "every rank must pass the same x" in rank["data_parallel"]
