"""Exported models: every op's ATen formulation (`protokern.decompositions`) against the float64
brute force, and the shipped modules (PrototypeLayer, ProtoPNet, VectorQuantizer,
PatchMemoryBank) exported with a dynamic batch, run after a ``torch.export`` save/load round
trip and, with the ``onnx`` extra, in onnxruntime, at another batch size than the export's."""

import re
from pathlib import Path

import pytest
import torch
from brute_force import distances
from cases import FULL_PRECISION, SHAPES, TOLERANCE, make, map_layout, random_inputs
from helpers import assert_matches_brute_force, assert_nearest, first_k, pushed_prototypes
from torch import Tensor, nn

import protokern as pk
from protokern import decompositions
from protokern.deploy import ONNX_PACKAGES, export_onnx, export_program, run_onnx
from protokern.models.backbones import small_cnn
from protokern.models.protopnet import ProtoPNet
from protokern.testing import relative_error

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("sqeuclidean", "cosine", "dot")
"""The kernel metrics (``euclidean`` is computed from sqeuclidean's, as in eager)."""


# ----------------------------------------------------------------------------------------------
# The formulations, called as an export would (without the cost of one)


@pytest.fixture
def exporting(monkeypatch):
    """The public functions as `torch.export` traces them: each op is its decomposition. No
    fused kernel may run meanwhile."""
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    with pk.recording() as calls:
        yield
    assert calls == [], f"kernels ran while exporting: {calls}"


def test_every_op_has_a_decomposition():
    ops = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
           if name.startswith("protokern::")}
    forward = {name for name in ops if not name.endswith("_backward")}
    assert forward == set(decompositions.DECOMPOSITIONS)
    assert len(forward) == 5


def brute_topk(x: Tensor, p: Tensor, metric: str, k: int) -> tuple[Tensor, Tensor]:
    d = distances(x, p, metric)
    values, indices = first_k(d.flatten(0, 1), k)
    return values.view(*d.shape[:2], k), indices.view(*d.shape[:2], k)


@pytest.mark.parametrize("dtype", FULL_PRECISION)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case", ["map-MD", "patch2x2", "tokens", "L1-map"])
def test_each_op_matches_the_brute_force(exporting, case, metric, dtype):
    x, p = make(case, dtype) if case in SHAPES else random_inputs((2, 3, 4, 5), (9, 3, 2, 2), dtype)
    values, indices = pk.min_distance(x, p, metric)
    assert_matches_brute_force(x, p, metric, values, indices)
    k = min(3, distances(x[:1], p[:1], metric).shape[-1])
    values, indices = pk.topk_distance(x, p, k, metric)
    want_values, want_indices = brute_topk(x, p, metric, k)
    assert values.dtype == dtype and indices.dtype == torch.int64
    assert relative_error(values, want_values) <= TOLERANCE[dtype]
    assert torch.equal(indices, want_indices)  # random data: no near-ties
    values, indices = pk.nearest_prototypes(x, p, 3, metric)
    assert_nearest(x, p, metric, 3, values, indices)
    dmap = pk.distance_map(x, p, metric)
    assert dmap.shape[:2] == (x.shape[0], p.shape[0])
    assert relative_error(dmap.flatten(2), distances(x, p, metric)) <= TOLERANCE[dtype]
    assert relative_error(pk.mean_distance(x, p, metric),
                          distances(x, p, metric).mean(-1)) <= TOLERANCE[dtype]


def test_euclidean_and_half_precision(exporting):
    x, p = make("patch2x3-M37")
    values, indices = pk.min_distance(x, p, "euclidean")
    assert_matches_brute_force(x, p, "euclidean", values, indices)
    half_x, half_p = x.bfloat16(), p.bfloat16()
    values, indices = pk.min_distance(half_x, half_p)
    assert values.dtype == torch.bfloat16
    assert relative_error(values, distances(half_x, half_p, "sqeuclidean").amin(-1)) <= \
        TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "expanded"])
def test_any_strides(exporting, layout):
    data, p = make("patch2x3-M37")
    x = map_layout(data, layout)
    values, indices = pk.min_distance(x, p)
    assert_matches_brute_force(x, p, "sqeuclidean", values, indices)
    values, indices = pk.nearest_prototypes(x, p, 2)
    assert_nearest(x, p, "sqeuclidean", 2, values, indices)


@pytest.mark.parametrize("metric", METRICS)
def test_ties_go_to_the_lowest_index(exporting, metric):
    x, p = make("map-MD")
    x[0, :, 3, 5] = x[0, :, 1, 2] = x[0, :, 2, 0] = p[4]  # three copies: distance 0 (cosine)
    values, indices = pk.topk_distance(x, p, 3, metric)
    if metric != "dot":  # a dot product has no minimum at a copy
        assert indices[0, 4].tolist() == [8, 12, 23]  # (1, 2), (2, 0), (3, 5) of 4x6
        assert values[0, 4].tolist() == [0.0, 0.0, 0.0]
    assert pk.min_distance(x, p, metric).indices[0, 4] == indices[0, 4, 0]
    twins = torch.cat([p, p[2:3], p[2:3]])  # prototypes 7 and 8 tie with 2
    values, indices = pk.nearest_prototypes(x, twins, twins.shape[0], metric)
    order = indices.flatten(0, 2).tolist()
    assert all(row.index(2) < row.index(7) < row.index(8) for row in order)
    assert (values.diff(dim=-1) >= 0).all()


def test_nan_comes_first_and_stays_in_its_image(exporting):
    x, p = make("map-MD")
    x[1, 2, 2, 3] = float("nan")  # position 15
    values, indices = pk.min_distance(x, p)
    assert values[1].isnan().all() and (indices[1] == 15).all()
    assert_matches_brute_force(x[:1], p, "sqeuclidean", values[:1], indices[:1])
    values, indices = pk.nearest_prototypes(x, p, 2)
    assert values[1, 2, 3].isnan().all() and not values[0].isnan().any()
    assert indices[1, 2, 3].tolist() == [0, 1]
    dmap = pk.distance_map(x, p)
    assert dmap[1, :, 2, 3].isnan().all() and not dmap[0].isnan().any()


def test_far_from_the_origin_and_at_a_pushed_patch(exporting):
    x, p = make("patch2x3-M37")
    far = x + 1000.0
    near_patches = far[0, :, 1:3, 2:5].flatten() + 0.1 * torch.randn(37, 24)
    values, indices = pk.min_distance(far, near_patches.view(37, 4, 2, 3))
    assert_matches_brute_force(far, near_patches.view(37, 4, 2, 3), "sqeuclidean", values,
                               indices)
    x, p = pushed_prototypes()
    values, indices = pk.min_distance(x, p)
    assert values[0, 0] == 0 and indices[0, 0] == 30  # the copy, not its near-duplicate
    assert pk.distance_map(x, p)[0, 0].flatten()[30] == 0


def test_blocks_of_prototypes_merge_in_order(exporting, monkeypatch):
    x, p = make("M37-D3")
    x[:, :, 4, 4] = x[:, :, 0, 0]  # a tie between positions
    p = torch.cat([p, p[:5]])  # ties between prototypes across blocks

    def results():
        return [*pk.min_distance(x, p), *pk.topk_distance(x, p, 4),
                *pk.nearest_prototypes(x, p, 3)], pk.distance_map(x, p)

    whole, whole_map = results()
    assert len(decompositions.blocks(42, 25)) == 1
    monkeypatch.setattr(decompositions, "BLOCK_ELEMENTS", 64)  # blocks of 1 or 2 prototypes
    assert len(decompositions.blocks(42, 25)) == 21
    blocked, blocked_map = results()
    for got, want in zip(blocked, whole, strict=True):
        assert torch.equal(got, want)  # values are recomputed: bit for bit
    # the map off its minima is the expansion, whose GEMM rounds by its block's shape
    assert relative_error(blocked_map, whole_map) <= TOLERANCE[torch.float32]
    assert torch.equal(blocked_map.flatten(2).amin(-1), whole[0])
    monkeypatch.setattr(decompositions, "MAX_BLOCKS", 4)  # then the blocks grow
    assert [b.stop - b.start for b in decompositions.blocks(42, 25)] == [11, 11, 11, 9]


# ----------------------------------------------------------------------------------------------
# The shipped modules, exported once (an export takes seconds) and run two ways

EXAMPLE_BATCH, RUN_BATCH = 2, 3
LAYERS = [(2, "sqeuclidean"), (1, "cosine")]
"""The prototype layers beside the ProtoPNet's own (1x1, sqeuclidean): both patches, both
metrics (the window and the metric are independent steps of a formulation; every pairing is
checked in eager above)."""


class Shipped(nn.Module):
    """Every module the export issue ships, in one graph (an export takes seconds, mostly per
    node, some per export): prototype layers (`LAYERS`) on ``features``, a ProtoPNet on
    ``images``, a VectorQuantizer on ``tokens``, a PatchMemoryBank reweighting its image
    scores with 3 neighbours (nearest_prototypes with k = 3) on ``features``, and on ``probe``
    topk_distance and distance_map, with ties and NaN (mean_distance, a closed form of plain
    ops, is left to the tests above). Returns every output by name."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(pk.nn.PrototypeLayer(6, 4, patch, metric)
                                    for patch, metric in LAYERS)
        # the reference ProtoPNet on a two-stage small_cnn (`protokern export`'s test exports
        # the full one): 16x16 images, 4x4 feature maps
        self.protopnet = ProtoPNet(small_cnn((8, 8)), num_classes=2, image_size=16,
                                   prototypes_per_class=2, prototype_dim=8)
        self.quantizer = pk.nn.VectorQuantizer(16, 4)
        self.bank = pk.nn.PatchMemoryBank(4, coreset_ratio=0.5, num_neighbors=3).fit(
            torch.randn(4, 4, 5, 5))
        self.register_buffer("probe_prototypes", torch.randn(7, 4))

    def forward(self, features: Tensor, images: Tensor, tokens: Tensor, probe: Tensor
                ) -> dict[str, Tensor]:
        out = {}
        for n, layer in enumerate(self.layers):
            out[f"layer{n}.values"], out[f"layer{n}.indices"] = layer(features)
        out["protopnet.logits"], out["protopnet.min_distances"], out["protopnet.indices"] = (
            self.protopnet(images))
        out["vq.quantized"], out["vq.indices"], _ = self.quantizer(tokens)
        out["bank.patch_scores"], out["bank.image_scores"] = self.bank.score(features)
        p = self.probe_prototypes
        out["topk.values"], out["topk.indices"] = pk.topk_distance(probe, p, 3)
        out["probe.distance_map"] = pk.distance_map(probe, p)
        return out

    def inputs(self, batch: int, seed: int) -> tuple[Tensor, ...]:
        """``(features, images, tokens, probe)`` of ``batch`` images: tokens within 0.05 of a
        code each (the nearest code is clear), probe image 0 holding prototype 1 at positions
        6 and 17 (a tie) and, from image 1 on, image 1 a NaN at position 12."""
        generator = torch.Generator().manual_seed(seed)
        codes = torch.randint(16, (batch, 6), generator=generator)
        tokens = self.quantizer.codebook.detach()[codes]
        tokens = tokens + 0.05 * torch.randn(tokens.shape, generator=generator)
        probe = torch.randn(batch, 4, 5, 5, generator=generator)
        probe[0, :, 1, 1] = probe[0, :, 3, 2] = self.probe_prototypes[1]
        if batch > 1:
            probe[1, 0, 2, 2] = float("nan")
        return (torch.randn(batch, 4, 5, 5, generator=generator),
                torch.rand(batch, 3, 16, 16, generator=generator), tokens, probe)


@pytest.fixture(scope="module")
def shipped() -> tuple[Shipped, torch.export.ExportedProgram]:
    torch.manual_seed(0)
    module = Shipped().eval()
    return module, export_program(module, module.inputs(EXAMPLE_BATCH, seed=1))


def _outputs_by(how: str, shipped, tmp_path_factory) -> dict[str, Tensor]:
    module, program = shipped
    inputs = module.inputs(RUN_BATCH, seed=2)
    folder = tmp_path_factory.mktemp(how)
    if how == "torch.export.load":
        torch.export.save(program, folder / "shipped.pt2")
        loaded = torch.export.load(folder / "shipped.pt2")
        with pk.recording() as calls:
            outputs = loaded.module()(*inputs)
        assert calls == []
        return outputs
    for name in ONNX_PACKAGES:
        pytest.importorskip(name, reason=f"{name} (protokern's onnx extra) is not installed")
    names = list(module(*inputs))
    # unoptimised: onnxscript's pass takes a third of the export's time, and `protokern
    # export`'s test runs it (tests/commands/test_export_command.py)
    path = export_onnx(program, folder / "shipped.onnx", ["features", "images", "tokens",
                                                          "probe"], names, optimize=False)
    return dict(zip(names, run_onnx(path, inputs), strict=True))


@pytest.fixture(scope="module", params=["torch.export.load", "onnxruntime"])
def run(request, shipped, tmp_path_factory):
    """``(module, inputs, eager outputs, the exported program's outputs)`` at `RUN_BATCH`
    images, the program run after a save/load round trip or as an ONNX file in onnxruntime."""
    module, _ = shipped
    inputs = module.inputs(RUN_BATCH, seed=2)
    with torch.no_grad(), pk.recording() as calls:
        eager = module(*inputs)
    assert calls and all(ran != "" for _, ran in calls)  # eager ran the fused kernels
    return module, inputs, eager, _outputs_by(request.param, shipped, tmp_path_factory)


def test_the_program_holds_no_protokern_op(shipped):
    _, program = shipped
    namespaces = {str(node.target).split(".")[0] for node in program.graph.nodes
                  if node.op == "call_function"}
    assert "protokern" not in " ".join(namespaces) and "aten" in namespaces


def _close(got: Tensor, want: Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert relative_error(got, want) <= TOLERANCE[torch.float32]


def test_prototype_layers(run):
    module, (features, *_), eager, got = run
    for n, (layer, (_, metric)) in enumerate(zip(module.layers, LAYERS, strict=True)):
        values, indices = got[f"layer{n}.values"], got[f"layer{n}.indices"]
        assert values.shape == (RUN_BATCH, 6) and indices.dtype == torch.int64
        _close(values, eager[f"layer{n}.values"])
        assert_matches_brute_force(features, layer.prototype_vectors.detach(), metric, values,
                                   indices)


def test_protopnet(run):
    module, (_, images, *_), eager, got = run
    model = module.protopnet
    _close(got["protopnet.logits"], eager["protopnet.logits"])
    _close(got["protopnet.min_distances"], eager["protopnet.min_distances"])
    with torch.no_grad():
        features = model.conv_features(images)
    assert_matches_brute_force(features, model.prototype_layer.prototype_vectors.detach(),
                               "sqeuclidean", got["protopnet.min_distances"],
                               got["protopnet.indices"])


def test_vector_quantizer(run):
    _, _, eager, got = run
    assert torch.equal(got["vq.indices"], eager["vq.indices"])  # clear by construction
    _close(got["vq.quantized"], eager["vq.quantized"])


def test_memory_banks(run):
    _, _, eager, got = run
    for name in ("bank.patch_scores", "bank.image_scores"):
        _close(got[name], eager[name])


def test_the_other_ops_ties_and_nan(run):
    _, _, eager, got = run
    clean = [0, 2]  # image 1 holds a NaN
    for name in ("topk.values", "probe.distance_map"):
        _close(got[name][clean], eager[name][clean])
        assert torch.equal(got[name].isnan(), eager[name].isnan())
    assert torch.equal(got["topk.indices"], eager["topk.indices"])  # NaN first, at position 12
    assert (got["topk.indices"][1, :, 0] == 12).all()
    assert got["topk.indices"][0, 1, :2].tolist() == [6, 17]  # the tie: lowest first
    assert got["topk.values"][0, 1, :2].tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------------------------
# Packaging


def test_ci_installs_the_onnx_extra():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["onnx"]
    assert sorted(re.split(r"[<>=]", r)[0] for r in extra) == sorted(ONNX_PACKAGES)
    ci = (ROOT / ".ci" / "run").read_text()
    assert all(f'"{requirement}"' in ci for requirement in extra)
