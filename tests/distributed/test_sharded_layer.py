"""pk.nn.ShardedPrototypeLayer: a bank split over 2 gloo ranks behaves like the unsharded layer.

All distributed cases run in one pair of spawned processes (`_run_cases`, started once per
module: a spawn costs seconds); each rank returns its outputs and gradients and the tests compare
them with a `PrototypeLayer` built here from the same seed. Cases run in float64, where the
sharded and unsharded layers must agree to rounding (1e-12); values and indices must be equal.
"""

import copy
from dataclasses import dataclass

import pytest
import torch
from cases import METRICS
from gloo import run_on_gloo

import protokern as pk
from protokern.distributed.collectives import shard_sizes

WORLD_SIZE = 2
DIM = 5
GRAD_TOL = {"rtol": 1e-12, "atol": 1e-12}


@dataclass(frozen=True)
class Case:
    metric: str
    num_prototypes: int  # 6: even shards; 7: 4 + 3
    patch: tuple[int, int]
    data_parallel: bool
    tokens: bool = False
    batch: tuple[int, int] = (3, 3)  # replicated: batch[0] on every rank; else rank r's batch

    @property
    def id(self) -> str:
        mode = "data_parallel" if self.data_parallel else "replicated"
        layout = "tokens" if self.tokens else f"patch{self.patch[0]}x{self.patch[1]}"
        batches = f"B{self.batch[0]}_{self.batch[1]}"
        return f"{mode}-{self.metric}-M{self.num_prototypes}-{layout}-{batches}"

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole batch ``x``, and weights of the loss on the values and the distance map."""
        total = self.batch[0] if not self.data_parallel else sum(self.batch)
        shape = (total, 4, DIM) if self.tokens else (total, DIM, 4, 5)
        x = torch.randn(shape, dtype=torch.float64)
        positions = 4 if self.tokens else (4 - self.patch[0] + 1) * (5 - self.patch[1] + 1)
        values_weight = torch.randn(total, self.num_prototypes, dtype=torch.float64)
        map_weight = torch.randn(total, self.num_prototypes, positions, dtype=torch.float64)
        return x, values_weight, map_weight

    def rows(self, rank: int) -> slice:
        """The rows of the whole batch that ``rank`` passes."""
        if not self.data_parallel:
            return slice(None)
        start = sum(self.batch[:rank])
        return slice(start, start + self.batch[rank])


CASES = [
    Case(metric, num_prototypes, patch, data_parallel)
    for data_parallel in (False, True)
    for metric in METRICS
    for num_prototypes in (6, 7)
    for patch in ((1, 1), (2, 2))
] + [
    Case("sqeuclidean", 7, (1, 1), True, batch=(3, 1)),
    Case("cosine", 7, (1, 1), True, tokens=True, batch=(2, 3)),
    Case("sqeuclidean", 6, (1, 1), False, tokens=True),
]
BACKENDS = [name for name in pk.available_backends("cpu") if name in ("cpu", "reference")]


def _forward_backward(layer: torch.nn.Module, case: Case, rows: slice) -> dict:
    """Outputs and gradients of ``layer`` on rows ``rows`` of ``case``'s inputs (drawn from the
    current seed after the layer), for the loss on the values and for that on the distance map."""
    x, values_weight, map_weight = case.inputs()
    x = x[rows].requires_grad_()
    values, indices = layer(x)
    (values * values_weight[rows]).sum().backward()
    result = {"values": values.detach(), "indices": indices, "x_grad": x.grad.clone(),
              "bank_grad": layer.prototype_vectors.grad.clone()}
    x.grad, layer.prototype_vectors.grad = None, None
    dmap = layer.distance_map(x)
    (dmap.flatten(2) * map_weight[rows]).sum().backward()
    result.update(map=dmap.detach(), map_x_grad=x.grad, map_bank_grad=layer.prototype_vectors.grad)
    return result


def _run_cases(rank: int, world_size: int) -> dict:
    results = {}
    for backend in BACKENDS:
        with pk.use_backend(backend):
            for seed, case in enumerate(CASES):
                torch.manual_seed(seed)
                layer = pk.nn.ShardedPrototypeLayer(
                    case.num_prototypes, DIM, case.patch, case.metric,
                    data_parallel=case.data_parallel, dtype=torch.float64)
                result = _forward_backward(layer, case, case.rows(rank))
                result.update(shard=layer.shard, full=layer.full_prototypes())
                results[backend, case] = result

    bank = torch.rand(7, DIM, 2, 2)
    from_full = pk.nn.ShardedPrototypeLayer.from_full(bank, "cosine")
    results["from_full"] = (bank, from_full.prototype_vectors.detach(),
                            from_full.full_prototypes(), repr(from_full))
    x = torch.randn(2, DIM, 3, 3)
    results["deepcopy"] = (from_full(x), copy.deepcopy(from_full)(x))

    errors = {}
    try:
        pk.nn.ShardedPrototypeLayer(1, DIM)
    except ValueError as error:
        errors["too_few"] = str(error)
    layer = pk.nn.ShardedPrototypeLayer(4, DIM, data_parallel=True)
    try:  # the ranks' maps differ in height: every rank must raise, none may hang
        layer(torch.randn(2, DIM, 4 + rank, 4))
    except ValueError as error:
        errors["mismatch"] = str(error)
    results["errors"] = errors
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_on_gloo(_run_cases, WORLD_SIZE)


def _unsharded(backend: str, case: Case) -> tuple[pk.nn.PrototypeLayer, dict]:
    torch.manual_seed(CASES.index(case))
    layer = pk.nn.PrototypeLayer(case.num_prototypes, DIM, case.patch, case.metric,
                                 dtype=torch.float64)
    with pk.use_backend(backend):
        return layer, _forward_backward(layer, case, slice(None))


def test_shard_sizes_differ_by_at_most_one_first_ranks_larger():
    assert shard_sizes(6, 2) == [3, 3]
    assert shard_sizes(7, 2) == [4, 3]
    assert shard_sizes(11, 4) == [3, 3, 3, 2]
    assert shard_sizes(2, 2) == [1, 1]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_outputs_and_gradients_equal_the_unsharded_layer(ranks, backend_name, case):
    layer, expected = _unsharded(backend_name, case)
    bank = layer.prototype_vectors.detach()
    assert sum(r[backend_name, case]["shard"].stop - r[backend_name, case]["shard"].start
               for r in ranks) == case.num_prototypes
    for rank, results in enumerate(ranks):
        got, rows = results[backend_name, case], case.rows(rank)
        shard = got["shard"]
        assert shard.start == sum(shard_sizes(case.num_prototypes, WORLD_SIZE)[:rank])
        assert torch.equal(got["full"], bank)  # the same seed gives the same global bank
        assert torch.equal(got["values"], expected["values"][rows])
        assert torch.equal(got["indices"], expected["indices"][rows])
        torch.testing.assert_close(got["x_grad"], expected["x_grad"][rows], **GRAD_TOL)
        torch.testing.assert_close(got["bank_grad"], expected["bank_grad"][shard], **GRAD_TOL)
        torch.testing.assert_close(got["map"], expected["map"][rows], **GRAD_TOL)
        torch.testing.assert_close(got["map_x_grad"], expected["map_x_grad"][rows], **GRAD_TOL)
        torch.testing.assert_close(got["map_bank_grad"], expected["map_bank_grad"][shard],
                                   **GRAD_TOL)


def test_from_full_shards_a_bank_and_full_prototypes_gathers_it(ranks):
    for rank, results in enumerate(ranks):
        bank, shard, full, text = results["from_full"]
        rows = slice(0, 4) if rank == 0 else slice(4, 7)
        assert torch.equal(shard, bank[rows]) and torch.equal(full, bank)
        assert f"shard=[{rows.start}:{rows.stop}] of 2 ranks" in text
        assert "metric='cosine'" in text


def test_a_deep_copy_shares_the_process_group(ranks):
    for results in ranks:
        original, copied = results["deepcopy"]
        assert torch.equal(original.values, copied.values)
        assert torch.equal(original.indices, copied.indices)


def test_errors_are_raised_on_every_rank(ranks):
    for results in ranks:
        assert "num_prototypes (1) must be at least the number of ranks (2)" in (
            results["errors"]["too_few"])
        assert "agree in all but the batch dimension" in results["errors"]["mismatch"]
        assert "[[2, 5, 4, 4], [2, 5, 5, 4]]" in results["errors"]["mismatch"]


@pytest.mark.parametrize("metric", METRICS)
def test_without_a_process_group_it_is_a_prototype_layer(cpu_backend, metric):
    torch.manual_seed(1)
    sharded = pk.nn.ShardedPrototypeLayer(7, DIM, (2, 2), metric, data_parallel=True)
    torch.manual_seed(1)
    plain = pk.nn.PrototypeLayer(7, DIM, (2, 2), metric)
    assert torch.equal(sharded.prototype_vectors, plain.prototype_vectors)
    assert sharded.shard == slice(0, 7) and sharded.shard_sizes == [7]
    assert torch.equal(sharded.full_prototypes(), plain.prototype_vectors)
    x = torch.randn(3, DIM, 4, 5)
    got, expected = sharded(x), plain(x)
    assert torch.equal(got.values, expected.values)
    assert torch.equal(got.indices, expected.indices)
    assert torch.equal(sharded.distance_map(x), plain.distance_map(x))
    got.values.sum().backward()
    expected.values.sum().backward()
    assert torch.equal(sharded.prototype_vectors.grad, plain.prototype_vectors.grad)
    rebuilt = pk.nn.ShardedPrototypeLayer.from_full(plain.prototype_vectors, metric)
    assert torch.equal(rebuilt.prototype_vectors, plain.prototype_vectors)
    assert rebuilt.prototype_vectors.requires_grad


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="ShardedPrototypeLayer: patch"):
        pk.nn.ShardedPrototypeLayer(4, DIM, patch=(1, 2, 3))
    with pytest.raises(ValueError, match="ShardedPrototypeLayer: unknown metric"):
        pk.nn.ShardedPrototypeLayer(4, DIM, metric="l1")
    with pytest.raises(ValueError, match=r"from_full: bank must be \(M, D\)"):
        pk.nn.ShardedPrototypeLayer.from_full(torch.rand(4, DIM, 1))
