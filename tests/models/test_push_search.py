"""`pk.push_search`, the streaming push of a ported model: per prototype, the nearest patch of
its class over batches of features, against a float64 brute force over all of them at once."""

import pytest
import torch
from brute_force import distances

import protokern as pk
from protokern import ops


def brute_force(features: list[torch.Tensor], labels: list[torch.Tensor], prototypes, classes,
                metric):
    """(distance, image, position) per prototype from every distance of every image: the
    first image, then the first position, on ties."""
    d = distances(torch.cat(features), prototypes, metric)  # (N, M, L')
    if classes is not None:
        d = d.masked_fill(torch.cat(labels)[:, None, None] != classes[None, :, None],
                          float("inf"))
    n, m, length = d.shape
    best = d.permute(1, 0, 2).reshape(m, -1).min(1)
    none = best.values.isinf()  # a class without images: no image, position 0
    return (best.values, torch.where(none, -1, best.indices // length),
            torch.where(none, 0, best.indices % length))


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine", "dot", "euclidean"])
@pytest.mark.parametrize("window", [(1, 1), (2, 3)])
def test_push_search_matches_brute_force(cpu_backend, metric, window, monkeypatch):
    sizes = [3, 1, 4]  # batches of varying size
    features = [torch.rand(b, 6, 4, 5, dtype=torch.float64) for b in sizes]
    labels = [torch.tensor([2, 0, 2]), torch.tensor([1]), torch.tensor([0, 1, 1, 2])]
    prototypes = torch.rand(7, 6, *window, dtype=torch.float64)
    classes = torch.tensor([0, 0, 1, 1, 2, 2, 3])  # class 3 has no image
    # which kernels run (not pk.recording: nested in the fixture's, its exit removes the
    # fixture's list, which compares equal)
    kernels = []
    record = ops.record_call
    monkeypatch.setattr(ops, "record_call", lambda op, name: (kernels.append(op),
                                                              record(op, name)))
    found = pk.push_search(iter(features), prototypes, iter(labels), classes, metric)
    assert set(kernels) == {"min_distance"}  # no map, ever
    monkeypatch.undo()
    want_distance, want_image, want_position = brute_force(features, labels, prototypes,
                                                           classes, metric)
    assert torch.equal(found.image_index, want_image)
    assert torch.equal(found.position, want_position)
    torch.testing.assert_close(found.distance, want_distance, rtol=1e-10, atol=1e-10)
    all_features = torch.cat(features)
    width = 5 - window[1] + 1
    assert torch.equal(found.patch[6], prototypes[6])  # no image of class 3: unchanged
    for m in range(6):
        r, c = divmod(found.position[m].item(), width)
        patch = all_features[found.image_index[m], :, r:r + window[0], c:c + window[1]]
        assert torch.equal(found.patch[m], patch)
    # the pushed prototypes are at distance 0 (cosine: 0 up to rounding) of their patches
    pushed = pk.min_distance(all_features, found.patch, metric).values
    if metric == "sqeuclidean":
        assert (pushed.amin(0)[:6] == 0).all()


def test_ties_go_to_the_earliest_image_across_batches(cpu_backend):
    image = torch.rand(1, 4, 3, 3)
    features = [torch.rand(2, 4, 3, 3), image, image.clone(), torch.cat([image, image])]
    labels = [torch.tensor([1, 1]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0, 0])]
    prototypes = image[0, :, 1, 2][None].clone()  # a patch of the repeated image
    found = pk.push_search(features, prototypes, labels, torch.tensor([0]))
    assert found.image_index.tolist() == [2] and found.position.tolist() == [5]
    assert found.distance.tolist() == [0.0]


def test_a_class_without_images_keeps_its_prototype_and_tokens_work(cpu_backend):
    features = [torch.rand(2, 5, 4)]  # (B, L, D) tokens
    prototypes = torch.rand(3, 4)
    found = pk.push_search(features, prototypes, [torch.tensor([0, 0])], torch.tensor([0, 1, 0]))
    assert found.image_index.tolist()[1] == -1 and found.distance[1] == float("inf")
    assert torch.equal(found.patch[1], prototypes[1]) and found.patch.shape == (3, 4)
    everywhere = pk.push_search(features, prototypes, [torch.tensor([0, 0])], None)
    assert (everywhere.image_index >= 0).all()
    pairs = pk.push_search(zip(features, [torch.tensor([0, 0])], strict=True), prototypes, None,
                           torch.tensor([0, 1, 0]))
    assert torch.equal(pairs.image_index, found.image_index)


def test_batches_and_labels_must_pair_up():
    with pytest.raises(ValueError, match="zip"):
        pk.push_search([torch.rand(1, 4, 2, 2)] * 2, torch.rand(2, 4), [torch.tensor([0])],
                       None)
