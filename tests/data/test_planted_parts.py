"""The planted-parts dataset: deterministic, with each class's motif inside its box."""

import pytest
import torch

from protokern.data import PlantedParts


def test_deterministic_given_a_seed_and_splits_differ():
    a = PlantedParts(3, 5, 32, seed=7, split="train", motif_size=8)
    b = PlantedParts(3, 5, 32, seed=7, split="train", motif_size=8)
    test = PlantedParts(3, 5, 32, seed=7, split="test", motif_size=8)
    other = PlantedParts(3, 5, 32, seed=8, split="train", motif_size=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes)
    assert torch.equal(a.motifs, test.motifs)  # same classes in both splits
    assert not torch.equal(a.images, test.images)
    assert not torch.equal(a.images, other.images)


def test_shapes_labels_and_the_motif_sits_in_its_box():
    ds = PlantedParts(4, 6, 40, seed=0, motif_size=10, num_distractors=3,
                      distractors_per_image=2)
    assert ds.images.shape == (24, 3, 40, 40) and ds.images.dtype == torch.float32
    assert ds.labels.tolist() == [k for k in range(4) for _ in range(6)]
    assert ds.boxes.shape == (24, 4) and ds.boxes.dtype == torch.int64
    assert 0 <= ds.images.min() and ds.images.max() <= 1
    for i in range(len(ds)):
        x0, y0, x1, y1 = ds.boxes[i].tolist()
        assert x1 - x0 == y1 - y0 == 10 and 0 <= x0 and x1 <= 40 and 0 <= y0 and y1 <= 40
        patch = ds.images[i, :, y0:y1, x0:x1]
        motif = ds.motifs[ds.labels[i]]
        # the class motif up to the brightness jitter (read off its dark cells, never clipped)
        dark = (motif - 0.05).abs() < 1e-7
        scale = (patch[dark] / motif[dark]).mean()
        assert 0.75 < scale < 1.25
        assert torch.allclose(patch, (motif * scale).clamp(0, 1), atol=1e-5)
        image, label = ds[i]
        assert torch.equal(image, ds.images[i]) and label == int(ds.labels[i])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="split"):
        PlantedParts(split="valid")
    with pytest.raises(ValueError, match="image_size"):
        PlantedParts(image_size=8, motif_size=14)
    with pytest.raises(ValueError, match="distractors_per_image"):
        PlantedParts(num_distractors=1, distractors_per_image=2)
