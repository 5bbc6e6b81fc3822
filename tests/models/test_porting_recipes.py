"""The porting recipes of docs/porting.md, run from the document itself: each recipe's values
and gradients equal, in float64, those of the model's original formula written as plain
PyTorch (tests/originals.py)."""

from types import SimpleNamespace

import originals
import pytest
import torch
from porting_doc import recipes
from torch import nn

RECIPES = recipes()  # name -> the function its block defines


def test_every_model_has_a_recipe():
    assert set(RECIPES) == {"protopnet", "protopnet-push", "tesnet", "st-protopnet",
                            "protopool", "deformable-protopnet", "prototree", "icicle"}


def parameter(*shape, scale=1.0):
    return nn.Parameter(scale * torch.rand(*shape, dtype=torch.float64))


def features(batch=3, dim=16, size=5):
    return torch.rand(batch, dim, size, size, dtype=torch.float64, requires_grad=True)


def assert_same(recipe_out, original_out, inputs):
    """Equal values, and equal gradients of a random weighting of them w.r.t. ``inputs``."""
    recipe_out = recipe_out if isinstance(recipe_out, tuple) else (recipe_out,)
    original_out = original_out if isinstance(original_out, tuple) else (original_out,)
    weights = [torch.randn_like(o) for o in original_out]
    for got, want in zip(recipe_out, original_out, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    grads = [torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, out, strict=True)),
                                 inputs) for out in (recipe_out, original_out)]
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_protopnet():
    head = originals.ProtoPNetHead(12, 16, 3).double()
    model = SimpleNamespace(prototype_vectors=head.prototype_vectors, epsilon=1e-4,
                            last_layer=head.last_layer)
    x = features()
    assert_same(RECIPES["protopnet"](model, x), head(x), (x, head.prototype_vectors,
                                                          head.last_layer.weight))


def test_protopnet_push():
    torch.manual_seed(0)
    images = [torch.rand(4, 16, 5, 5, dtype=torch.float64) for _ in range(3)]
    labels = [torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2]), torch.tensor([2, 2, 0, 1])]
    prototypes = parameter(6, 16, 1, 1)
    model = SimpleNamespace(features=nn.Identity(), add_on_layers=nn.Identity(),
                            prototype_vectors=prototypes,
                            prototype_class_identity=torch.eye(3).repeat_interleave(2, 0))
    before = prototypes.detach().clone()
    found = RECIPES["protopnet-push"](model, list(zip(images, labels, strict=True)))
    # the original's search: every image's full map, min over images of the prototype's class
    all_images, all_labels = torch.cat(images), torch.cat(labels)
    d = originals.l2_convolution(all_images, before, torch.ones_like(before)).flatten(2)
    d = d.masked_fill(all_labels[:, None, None] != model.prototype_class_identity.argmax(1)[
        None, :, None], float("inf"))
    best = d.permute(1, 0, 2).reshape(6, -1).min(1)
    assert torch.equal(found.image_index, best.indices // 25)
    assert torch.equal(found.position, best.indices % 25)
    rows = all_images.flatten(2)[found.image_index, :, found.position]
    assert torch.equal(prototypes.detach()[:, :, 0, 0], rows)


def test_tesnet():
    prototypes = parameter(10, 16, 1, 1)
    x = features()
    out = RECIPES["tesnet"](SimpleNamespace(prototype_vectors=prototypes), x)
    assert_same(out, originals.tesnet_activations(x, prototypes), (x, prototypes))


def test_st_protopnet():
    trivial, support = parameter(8, 16, 1, 1), parameter(8, 16, 1, 1)
    model = SimpleNamespace(prototype_vectors_trivial=trivial, prototype_vectors_support=support)
    x = features()
    assert_same(RECIPES["st-protopnet"](model, x),
                originals.st_protopnet_activations(x, trivial, support), (x, trivial, support))


def test_protopool():
    prototypes = parameter(10, 16, 1, 1)
    x = features()
    out = RECIPES["protopool"](SimpleNamespace(prototype_vectors=prototypes, epsilon=1e-4), x)
    want = originals.focal_similarity(x, prototypes, torch.ones_like(prototypes))
    assert_same(out, want, (x, prototypes))


def test_deformable_protopnet_topk_mean():
    prototypes = parameter(10, 16, 1, 1)
    x = features()
    out = RECIPES["deformable-protopnet"](SimpleNamespace(prototype_vectors=prototypes, k=4), x)
    assert_same(out, originals.deformable_topk_similarity(x, prototypes, 4), (x, prototypes))


def test_prototree():
    prototypes = parameter(10, 16, 1, 1)
    x = features()
    out = RECIPES["prototree"](SimpleNamespace(prototype_vectors=prototypes), x)
    assert_same(out, originals.prototree_distances(x, prototypes), (x, prototypes))


def test_icicle():
    tasks = [parameter(6, 16, 1, 1), parameter(4, 16, 1, 1)]
    x = features()
    out = RECIPES["icicle"](SimpleNamespace(task_prototypes=tasks, epsilon=1e-4), x)
    assert_same(out, originals.icicle_activations(x, tasks), (x, *tasks))


def test_icicle_focal_flag_is_protopool_focal_similarity_per_task():
    """ICICLE's off-by-default ``--focal`` head is ProtoPool's focal similarity, per task (the
    recipe's prose sends it to the ProtoPool recipe)."""
    tasks = [parameter(6, 16, 1, 1), parameter(4, 16, 1, 1)]
    x = features()
    want = torch.cat([originals.focal_similarity(x, p, torch.ones_like(p)) for p in tasks], 1)
    assert_same(originals.icicle_activations(x, tasks, focal=True), want, (x, *tasks))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_after_a_push_the_original_float32_is_the_one_that_is_wrong():
    """docs/porting.md's explanation: after a push (prototypes copied from patches), the
    original's float32 logits are off by far more than protokern's, both against float64."""
    torch.manual_seed(0)
    x = torch.sigmoid(4 * torch.randn(8, 128, 7, 7))
    head = originals.ProtoPNetHead(200, 128, 20)
    with torch.no_grad():
        head.prototype_vectors.copy_(x[torch.arange(200) % 8, :, 3, torch.arange(200) % 7]
                                     [:, :, None, None])
        classes = torch.arange(200) // 10
        head.last_layer.weight.copy_(torch.where(classes[None] == torch.arange(20)[:, None],
                                                 1.0, -0.5))
    model = SimpleNamespace(prototype_vectors=head.prototype_vectors, epsilon=1e-4,
                            last_layer=head.last_layer)
    with torch.no_grad():
        truth = head.double()(x.double())[0]
        original = head.float()(x)[0]
        ported = RECIPES["protopnet"](model, x)[0]
    original_error = (original.double() - truth).abs().max()
    ported_error = (ported.double() - truth).abs().max()
    print(f"logit error vs float64: original {original_error:.3g}, protokern {ported_error:.3g}, "
          f"logits up to {truth.abs().max():.3g}")
    assert original_error > 0.05 and ported_error < 1e-3, (original_error, ported_error)
