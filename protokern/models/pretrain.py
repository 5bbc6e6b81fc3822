"""Pretraining a backbone as a plain classifier, standing in for ImageNet weights.

ProtoPNet starts from a pretrained backbone: its warm-up trains only the add-on layers and
prototypes on top of features that already mean something. The demo's small CNN has no such
weights, so it first learns them on the training images, as a classifier whose class scores
are 1x1 convolutions max-pooled over positions: each class's score is its best-matching
position, the same "somewhere in the image" evidence ProtoPNet's prototypes look for.
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm


def pretrain_backbone(features: nn.Module, channels: int, num_classes: int, dataset: Dataset,
                      epochs: int, lr: float = 3e-3, batch_size: int = 50, seed: int = 0,
                      progress: bool = True) -> list[float]:
    """Train ``features`` (``(B, 3, S, S) -> (B, channels, H, W)``) in place for ``epochs``
    passes of cross-entropy through a max-pooled 1x1-conv head, discarded afterwards.
    Returns the training accuracy of each epoch."""
    device = next(features.parameters()).device
    head = nn.Conv2d(channels, num_classes, 1).to(device)
    parameters = list(features.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(parameters, lr=lr)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    features.train()
    accuracies = []
    for epoch in range(epochs):
        correct = seen = 0
        for images, labels in tqdm(loader, desc=f"pretrain {epoch}", disable=not progress,
                                   leave=False):
            images, labels = images.to(device), labels.to(device)
            logits = head(features(images)).amax((2, 3))
            loss = nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
        accuracies.append(correct / seen)
    return accuracies
