"""`protokern.integrations.cabrnet.use_protokern` against the real CaBRNet package (the test
extra: ``pip install --no-deps cabrnet loguru``): a patched classifier gives CaBRNet's own
logits, min distances and gradients on random features, with no (N, P, H, W) map."""

import copy

import pytest
import torch

pytest.importorskip("loguru", reason="CaBRNet needs loguru: pip install --no-deps cabrnet loguru")
pytest.importorskip("cabrnet", reason="CaBRNet is not installed: pip install --no-deps cabrnet "
                    "loguru (the `test` extra)")

from cabrnet.archs.protopnet.decision import ProtoPNetClassifier  # noqa: E402
from cabrnet.archs.protopool.decision import ProtoPoolClassifier  # noqa: E402
from cabrnet.archs.prototree.decision import ProtoTreeClassifier  # noqa: E402

from protokern import ops  # noqa: E402
from protokern.integrations.cabrnet import use_protokern  # noqa: E402


def classifiers():
    return {
        "protopnet": lambda: ProtoPNetClassifier({"name": "ProtoPNetSimilarity"}, 3, 16, 4),
        "protopnet-legacy": lambda: ProtoPNetClassifier(
            {"name": "LegacyProtoPNetSimilarity"}, 3, 16, 4, compatibility_mode=True),
        "protopnet-cosine": lambda: ProtoPNetClassifier({"name": "CosineSimilarity"}, 3, 16, 4),
        "protopool": lambda: ProtoPoolClassifier({"name": "ProtoPNetSimilarity"}, 3, 16, 10, 2),
        "protopool-legacy": lambda: ProtoPoolClassifier(
            {"name": "LegacyProtoPNetSimilarity"}, 3, 16, 10, 2, compatibility_mode=True),
        "prototree": lambda: ProtoTreeClassifier({"name": "ProtoTreeSimilarity"}, 3, 3, 16),
    }


def outputs_and_grads(classifier, features):
    features = features.clone().requires_grad_()
    out = classifier(features)
    logits, min_distances = out[0], out[1]
    weights = torch.randn(logits.shape, dtype=logits.dtype, generator=torch.Generator()
                          .manual_seed(1))
    parameters = [p for p in classifier.parameters() if p.requires_grad]
    grads = torch.autograd.grad((logits * weights).sum(), [features, *parameters],
                                allow_unused=True)
    if not isinstance(min_distances, torch.Tensor):  # ProtoTree: its tree's information
        min_distances = None
    return logits.detach(), (None if min_distances is None else min_distances.detach()), grads


@pytest.mark.parametrize("name", list(classifiers()))
def test_patched_classifier_matches_cabrnet(name, monkeypatch):
    torch.manual_seed(0)
    original = classifiers()[name]().double()
    patched = use_protokern(copy.deepcopy(original))
    features = torch.rand(3, 16, 7, 7, dtype=torch.float64)
    # which protokern kernels ran: the fused reductions only, never the map
    kernels = []
    record = ops.record_call
    monkeypatch.setattr(ops, "record_call", lambda op, backend: (kernels.append(op),
                                                                  record(op, backend)))
    got_logits, got_min, got_grads = outputs_and_grads(patched, features)
    assert kernels and not any(k.startswith("distance_map") for k in kernels)
    monkeypatch.undo()
    want_logits, want_min, want_grads = outputs_and_grads(original, features)
    tol = {"rtol": 1e-6, "atol": 1e-9} if "cosine" in name else {"rtol": 1e-9, "atol": 1e-9}
    torch.testing.assert_close(got_logits, want_logits, **tol)
    if want_min is not None:
        torch.testing.assert_close(got_min, want_min, **tol)
    assert len(got_grads) == len(want_grads)
    for got, want in zip(got_grads, want_grads, strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, **tol)


def test_outside_forward_the_full_map_comes_back():
    torch.manual_seed(0)
    original = ProtoPNetClassifier({"name": "ProtoPNetSimilarity"}, 3, 16, 4).double()
    patched = use_protokern(copy.deepcopy(original))
    assert use_protokern(patched) is patched  # idempotent
    features = torch.rand(2, 16, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(patched.distances(features), original.distances(features))
    assert type(patched) is ProtoPNetClassifier  # the class itself is untouched
    assert ProtoPNetClassifier.forward is not patched.forward


def test_a_checkpoint_loads_into_a_patched_classifier():
    original = ProtoPNetClassifier({"name": "ProtoPNetSimilarity"}, 3, 16, 4)
    patched = use_protokern(ProtoPNetClassifier({"name": "ProtoPNetSimilarity"}, 3, 16, 4))
    patched.load_state_dict(original.state_dict())
    assert torch.equal(patched.prototypes, original.prototypes)
