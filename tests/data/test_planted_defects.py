"""PlantedDefects: deterministic for a seed, normal-only training split, masks that cover
exactly the pixels each defect changed, and clear errors on bad arguments."""

import pytest
import torch

from protokern.data import PlantedDefects
from protokern.data.planted_defects import DEFECTS


def test_splits_labels_and_masks():
    train = PlantedDefects(6, 32, seed=1, split="train", motif_size=8)
    test = PlantedDefects(12, 32, seed=1, split="test", motif_size=8)
    assert train.labels.sum() == 0 and not train.masks.any() and (train.defects == -1).all()
    assert test.labels.tolist() == [1] * 6 + [0] * 6
    assert test.images.shape == (12, 3, 32, 32) and test.masks.shape == (12, 32, 32)
    assert 0 <= test.images.min() and test.images.max() <= 1
    for i in range(6):
        mask = test.masks[i]
        assert mask.any() and 0 <= int(test.defects[i]) < len(DEFECTS)
        # a defect is one saturated colour: some channel at 0 and some at 1 inside the mask
        colours = test.images[i][:, mask].T.unique(dim=0)
        assert len(colours) == 1 and colours.min() == 0 and colours.max() == 1
    assert not test.masks[6:].any()


def test_deterministic_for_a_seed():
    a, b = (PlantedDefects(8, 32, seed=3, split="test", motif_size=8) for _ in range(2))
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    other = PlantedDefects(8, 32, seed=4, split="test", motif_size=8)
    assert not torch.equal(a.images, other.images)


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "val"}, "split"), ({"num_images": 0}, "num_images"),
    ({"image_size": 20}, "image_size"), ({"defect_fraction": 1.5}, "defect_fraction"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PlantedDefects(**{"num_images": 4, "image_size": 32, **kwargs})
