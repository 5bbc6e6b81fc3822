"""Casting or moving a model that holds a head (`.float()`, `.half()`, `.to(dtype)`) keeps the
heads' float64 statistics exact and their caches fresh: the head then behaves exactly like one
that was never cast."""

import pytest
import torch
from torch import nn

from protokern.heads import FeCAMHead, PrototypeHead

CASTS = {
    "float": lambda m: m.float(),
    "half": lambda m: m.half(),
    "to-float64": lambda m: m.to(torch.float64),
    "float-then-float64": lambda m: m.float().to(torch.float64),
    "to-float32-cpu": lambda m: m.to("cpu", torch.float32),
}


def batches(num_classes, dim, seed):
    """Two batches of float32 features with an offset, so that their float64 sums need more
    than float32's 24 bits (a float32 round trip of the statistics would change them)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in (40, 25):
        x = 100 + torch.randn(n, dim, generator=gen) * 3
        out.append((x, torch.arange(n) % num_classes))
    return out, torch.randn(7, dim, generator=gen) * 3 + 100


def assert_float32_round_trip_would_lose(sums):
    # the test can only catch a down-cast of the statistics if the cast changes them
    assert not torch.equal(sums.float().double(), sums)


@pytest.mark.parametrize("cast", CASTS)
@pytest.mark.parametrize("metric,protos_per_class", [("cosine", 1), ("sqeuclidean", 1),
                                                     ("sqeuclidean", 3)])
def test_prototype_head_cast_equals_never_cast(cast, metric, protos_per_class):
    (first, second), queries = batches(3, 5, seed=1)
    reference = PrototypeHead(5, 3, metric=metric, protos_per_class=protos_per_class)
    head = PrototypeHead(5, 3, metric=metric, protos_per_class=protos_per_class)
    for h in (reference, head):
        h.update(*first)
        h(queries)  # fills the caches (forward bank; k-means centers for K > 1)
    model = CASTS[cast](nn.Sequential(head))
    assert model[0] is head
    assert head.class_sums.dtype == torch.float64 and head.teen_prototypes.dtype == torch.float64
    assert head.memory_features.dtype == torch.float32
    assert torch.equal(head.class_sums, reference.class_sums)
    assert_float32_round_trip_would_lose(reference.class_sums)
    assert not head._forward_prototypes and not head._centers
    for h in (reference, head):
        h.update(*second)  # crashed after .float(): index_add_ of float64 into float32
    assert torch.equal(head.class_sums, reference.class_sums)
    assert torch.equal(head.memory_features, reference.memory_features)
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(head(queries.to(dtype)), reference(queries.to(dtype)))
    assert torch.equal(head.prototypes()[0], reference.prototypes()[0])


def test_prototype_head_teen_prototypes_survive_a_cast():
    (first, second), queries = batches(4, 6, seed=2)
    reference, head = PrototypeHead(6, 2), PrototypeHead(6, 2)
    for h in (reference, head):
        h.update(first[0][first[1] < 2], first[1][first[1] < 2])
        h.add_classes(2)
        h.update(second[0], second[1])
        h.calibrate_teen(0.5, 0.1)
    head.half()
    assert head.teen_calibrated[2:].all()
    assert torch.equal(head.teen_prototypes, reference.teen_prototypes)
    assert torch.equal(head(queries), reference(queries))


@pytest.mark.parametrize("cast", CASTS)
@pytest.mark.parametrize("covariance", ["shared", "per_class"])
def test_fecam_head_cast_equals_never_cast(cast, covariance):
    (first, second), queries = batches(3, 4, seed=3)
    reference, head = FeCAMHead(4, 3, covariance), FeCAMHead(4, 3, covariance)
    for h in (reference, head):
        h.update(*first)
        h(queries)  # caches the whiteners
    model = CASTS[cast](nn.ModuleDict({"head": head}))
    assert model["head"] is head
    assert head._whiteners is None
    assert head.class_sums.dtype == torch.float64 and head.outer_sums.dtype == torch.float64
    assert torch.equal(head.outer_sums, reference.outer_sums)
    assert_float32_round_trip_would_lose(reference.outer_sums)
    # forward right after the cast crashed (float32 means against float64 whiteners)
    assert torch.equal(head(queries), reference(queries))
    for h in (reference, head):
        h.update(*second)
    assert torch.equal(head.class_sums, reference.class_sums)
    assert torch.equal(head.outer_sums, reference.outer_sums)
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(head(queries.to(dtype)), reference(queries.to(dtype)))


def test_other_modules_still_follow_the_cast():
    head = PrototypeHead(4, 2)
    model = nn.Sequential(nn.Linear(4, 4), head).to(torch.float64)
    assert model[0].weight.dtype == torch.float64  # the cast itself still happens
    assert head.class_counts.dtype == torch.int64 and head.memory_features.dtype == torch.float32
    model.float()
    assert model[0].weight.dtype == torch.float32 and head.class_sums.dtype == torch.float64
