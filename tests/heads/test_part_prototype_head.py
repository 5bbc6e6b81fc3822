"""PartPrototypeHead against explicit loops over positions, in float64."""

import math

import pytest
import torch
from cases import METRICS

from protokern.heads import PartPrototypeHead
from protokern.testing import TOLERANCE, relative_error

F32 = TOLERANCE[torch.float32]


def brute_force(fmap, prototypes, metric):
    """Distances of every prototype to every window, by loops: (B, M, H', W') float64."""
    x, p = fmap.double(), prototypes.double()
    batch, _, height, width = x.shape
    num, _, ph, pw = p.shape
    out = torch.empty(batch, num, height - ph + 1, width - pw + 1, dtype=torch.float64)
    for b in range(batch):
        for m in range(num):
            for i in range(height - ph + 1):
                for j in range(width - pw + 1):
                    window = x[b, :, i:i + ph, j:j + pw]
                    if metric == "sqeuclidean":
                        out[b, m, i, j] = ((window - p[m]) ** 2).sum()
                    else:
                        cos = (window * p[m]).sum() / (max(float(window.norm()), 1e-8)
                                                       * max(float(p[m].norm()), 1e-8))
                        out[b, m, i, j] = 1 - cos
    return out


def similarity(d, metric):
    return 1 - d if metric == "cosine" else torch.log((d + 1) / (d + 1e-4))


@pytest.mark.parametrize("metric", METRICS)
def test_forward_matches_brute_force(cpu_backend, metric):
    head = PartPrototypeHead(4, patch=2, metric=metric)
    head.add_task(2, protos_per_class=3, init="random", seed=1)
    head.add_task(1, protos_per_class=2, init="random", seed=2)
    head.set_task_bias(1, 0.75)
    with torch.no_grad():
        head.last_layers[0].add_(0.1 * torch.randn(2, 6))
    fmap = torch.rand(3, 4, 5, 4)
    out = head(fmap, similarity_maps=True)
    dist = brute_force(fmap, head.all_prototypes().detach(), metric)
    mins = dist.flatten(2).amin(-1)
    sims = similarity(mins, metric)
    w0, w1 = head.last_layers[0].detach().double(), head.last_layers[1].detach().double()
    expected = torch.empty(3, 3, dtype=torch.float64)
    for b in range(3):
        for c in range(2):  # task 0: prototypes 0..5
            expected[b, c] = sum(sims[b, m] * w0[c, m] for m in range(6))
        expected[b, 2] = sum(sims[b, 6 + m] * w1[0, m] for m in range(2)) + 0.75
    assert out.logits.shape == (3, 3) and out.min_distances.shape == out.indices.shape == (3, 8)
    assert relative_error(out.min_distances, mins) <= F32
    assert relative_error(out.logits, expected) <= F32
    assert relative_error(out.similarity_maps, similarity(dist, metric)) <= F32
    assert head(fmap).similarity_maps is None


def test_last_layer_init_and_class_layout():
    head = PartPrototypeHead(3)
    head.add_task(2, protos_per_class=2, init="random")
    head.add_task(3, protos_per_class=1, init="random")
    assert head.last_layers[0].tolist() == [[1, 1, -0.5, -0.5], [-0.5, -0.5, 1, 1]]
    assert head.last_layers[1].tolist() == [[1, -0.5, -0.5], [-0.5, 1, -0.5], [-0.5, -0.5, 1]]
    assert list(head.task_classes(1)) == [2, 3, 4] and list(head.task_prototypes(1)) == [4, 5, 6]
    assert head.prototype_class.tolist() == [0, 0, 1, 1, 2, 3, 4]
    assert head.num_classes == 5 and head.num_prototypes == 7


def test_growth_keeps_old_task_logits():
    head = PartPrototypeHead(6, metric="sqeuclidean")
    head.add_task(2, protos_per_class=2, init="random", seed=0)
    fmap = torch.rand(4, 6, 3, 3)
    before = head(fmap).logits
    head.add_task(3, protos_per_class=2, init="random", seed=1)
    after = head(fmap).logits
    assert after.shape == (4, 5) and torch.equal(after[:, :2], before)


def test_freeze_stops_gradients_of_one_task():
    head = PartPrototypeHead(3)
    head.add_task(1, protos_per_class=2, init="random", seed=0)
    head.add_task(1, protos_per_class=2, init="random", seed=1)
    head.freeze(0)
    head(torch.rand(2, 3, 4, 4)).logits.sum().backward()
    assert head.prototypes[0].grad is None and head.last_layers[0].grad is None
    assert head.prototypes[1].grad is not None and head.prototypes[1].grad.abs().sum() > 0
    assert head.last_layers[1].grad is not None
    head.freeze(0, frozen=False)
    assert head.prototypes[0].requires_grad


def test_kmeans_init_finds_each_class_parts():
    # class c's maps are made of two part vectors (plus small noise): its 2 prototypes
    # must land on those two vectors
    gen = torch.Generator().manual_seed(0)
    parts = torch.randn(2, 2, 5, generator=gen) * 5  # (class, part, D)
    maps, labels = [], []
    for c in range(2):
        for _ in range(6):
            choice = torch.randint(0, 2, (3, 3), generator=gen)
            fmap = parts[c][choice].permute(2, 0, 1) + 0.01 * torch.randn(5, 3, 3, generator=gen)
            fmap[:, 0, 0], fmap[:, 2, 2] = parts[c, 0], parts[c, 1]  # both parts present
            maps.append(fmap)
            labels.append(c)
    maps, labels = torch.stack(maps), torch.tensor(labels)
    head = PartPrototypeHead(5, metric="sqeuclidean")
    head.add_task(2, protos_per_class=2, init="kmeans", features=maps, labels=labels)
    protos = head.prototypes[0].detach()[:, :, 0, 0]
    for c in range(2):
        found = sorted(protos[2 * c:2 * c + 2].tolist())
        assert relative_error(torch.tensor(found), torch.tensor(sorted(parts[c].tolist()))
                              ) <= 1e-2
    assert (head(maps).logits.argmax(1) == labels).all()


def test_state_dict_round_trips_across_growth():
    head = PartPrototypeHead(4, patch=(1, 2), metric="cosine")
    head.add_task(2, protos_per_class=2, init="random", seed=0)
    head.add_task(1, protos_per_class=3, init="random", seed=1)
    head.set_task_bias(0, -0.25)
    fmap = torch.rand(2, 4, 3, 3)
    expected = head(fmap).logits
    for tasks in (0, 1, 3):
        fresh = PartPrototypeHead(4, patch=(1, 2), metric="cosine")
        for _t in range(tasks):
            fresh.add_task(1, protos_per_class=1, init="random")
        fresh.load_state_dict(head.state_dict())
        assert fresh.num_tasks == 2 and torch.equal(fresh(fmap).logits, expected)
    with pytest.raises(ValueError, match="patch"):
        PartPrototypeHead(4, patch=1, metric="cosine").load_state_dict(head.state_dict())


def test_errors():
    head = PartPrototypeHead(4, patch=2)
    with pytest.raises(ValueError, match="no task yet"):
        head(torch.rand(1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"init tensor must be \(6, 4, 2, 2\)"):
        head.add_task(3, protos_per_class=2, init=torch.rand(6, 4, 1, 1))
    with pytest.raises(ValueError, match="needs features"):
        head.add_task(1, protos_per_class=2, init="kmeans")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        head.add_task(2, 1, "kmeans", torch.rand(3, 4, 3, 3), torch.tensor([0, 1, 5]))
    head.add_task(1, 1, init="random")
    with pytest.raises(ValueError, match=r"fmap must be \(B, 4, H, W\)"):
        head(torch.rand(1, 3, 3, 3))
    with pytest.raises(ValueError, match="task must be an int"):
        head.freeze(1)
    assert math.isfinite(float(head(torch.rand(1, 4, 3, 3)).logits.detach().sum()))
