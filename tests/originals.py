"""The published models' own formulas, in plain PyTorch, as their public code writes them: the
"original" side of the porting recipes' tests (docs/porting.md). Each takes the add-on features
``x`` ``(B, D, H, W)`` and prototypes ``(M, D, 1, 1)`` and materialises the ``(B, M, H, W)``
map, as the originals do."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def l2_convolution(x: Tensor, prototypes: Tensor, ones: Tensor) -> Tensor:
    """cfchen-duke ProtoPNet's ``_l2_convolution`` (also ProtoPool's, ICICLE's): the expansion
    ``|x|^2 - 2 x.p + |p|^2`` by convolutions, relu'd. ``(B, M, H, W)``."""
    x2_patch_sum = F.conv2d(input=x ** 2, weight=ones)
    p2 = torch.sum(prototypes ** 2, dim=(1, 2, 3)).view(-1, 1, 1)
    xp = F.conv2d(input=x, weight=prototypes)
    return F.relu(x2_patch_sum - 2 * xp + p2)


def log_similarity(distances: Tensor, epsilon: float = 1e-4) -> Tensor:
    """ProtoPNet's ``distance_2_similarity`` (log activation)."""
    return torch.log((distances + 1) / (distances + epsilon))


def global_min_pool(distances: Tensor) -> Tensor:
    """ProtoPNet's ``-max_pool2d(-d, (H, W))``, ``(B, M)``."""
    return -F.max_pool2d(-distances, kernel_size=distances.shape[2:]).flatten(1)


class ProtoPNetHead(nn.Module):
    """cfchen-duke ProtoPNet after the add-on layers: the prototype layer, the log activation
    and the last layer; its state dict has that code's keys (``prototype_vectors``, ``ones``,
    ``last_layer.weight``)."""

    def __init__(self, num_prototypes: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.prototype_vectors = nn.Parameter(torch.rand(num_prototypes, dim, 1, 1))
        self.ones = nn.Parameter(torch.ones(num_prototypes, dim, 1, 1), requires_grad=False)
        self.last_layer = nn.Linear(num_prototypes, num_classes, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        min_distances = global_min_pool(l2_convolution(x, self.prototype_vectors, self.ones))
        return self.last_layer(log_similarity(min_distances)), min_distances


def tesnet_activations(x: Tensor, prototypes: Tensor) -> Tensor:
    """TesNet's ``_project2basis`` then ``max_pool2d``: the largest projection onto the
    normalised prototypes (its basis concepts), ``(B, M)``."""
    basis = prototypes / prototypes.norm(dim=1, keepdim=True)
    return F.max_pool2d(F.conv2d(x, basis), kernel_size=x.shape[2:]).flatten(1)


def cosine_max_similarity(x: Tensor, prototypes: Tensor) -> Tensor:
    """ST-ProtoPNet's (and Deformable ProtoPNet's, without offsets) cosine similarity map
    ``conv2d(normalize(x), normalize(p))``, ``(B, M, H, W)``."""
    return F.conv2d(F.normalize(x, dim=1), F.normalize(prototypes, dim=1))


def st_protopnet_activations(x: Tensor, trivial: Tensor, support: Tensor) -> tuple[Tensor, Tensor]:
    """ST-ProtoPNet: two prototype sets (trivial, support), each max-pooled cosine."""
    return tuple(F.max_pool2d(cosine_max_similarity(x, p), x.shape[2:]).flatten(1)
                 for p in (trivial, support))


def focal_similarity(x: Tensor, prototypes: Tensor, ones: Tensor) -> Tensor:
    """ProtoPool's focal similarity ``sim(min) - sim(mean)`` over the L2 map, with ProtoPNet's
    log activation, ``(B, M)``. (ICICLE's head computes it only under its ``--focal`` flag,
    which the paper's runs leave off: see `icicle_activations`.)"""
    distances = l2_convolution(x, prototypes, ones)
    min_distances = global_min_pool(distances)
    avg_distances = F.avg_pool2d(distances, kernel_size=distances.shape[2:]).flatten(1)
    return log_similarity(min_distances) - log_similarity(avg_distances)


def icicle_activations(x: Tensor, task_prototypes: list[Tensor], epsilon: float = 1e-4,
                       focal: bool = False) -> Tensor:
    """ICICLE's prototype activations: one ProtoPNet head per task, each head's activations
    concatenated over the tasks, ``(B, sum_t M_t)``.

    Checked against ICICLE's public code, github.com/gmum/ICICLE at commit 48b2242 (2023-08-01;
    the model files date from e5267f3): ``src/networks/protopartnet.py``,
    ``PPNet_head.l2_convolution``, ``PPNet_head.forward``, ``PPNet_head.distance_2_similarity``
    and ``PPNet_head.focal_similarity``; ``src/networks/network.py``, ``LLL_Net_PPNet.add_head``
    (one ``PPNet_head`` with its own ``prototype_vectors`` ``(10 * classes_t, D, 1, 1)`` per
    task) and ``LLL_Net_PPNet.forward`` (every head on the same add-on features). Each head
    takes cfchen-duke ProtoPNet's relu'd expansion ``relu(|x|^2 + (-2 x.p + |p|^2))`` (written
    here as `l2_convolution`), turns the whole map into similarities with the log activation
    and epsilon ``1e-4`` (``--ppnet_sim log`` in the README's ICICLE command), and max-pools
    the similarity map over positions, which is the log activation of the min distance. It does
    not subtract the mean term: ``focal_similarity`` runs only with ``--focal``, a flag that
    defaults off and that the README's ICICLE command does not pass; ``focal=True`` here is
    that branch (``sim(min) - sim(mean)``, as ProtoPool). No prototype is masked per task in
    the head: every head always runs, and each feeds its own last layer (the logits of the task
    heads are concatenated; ``--incorrect_weight_btw_tasks`` adds a last layer on the log
    activation of all tasks' min distances, the same activations). What else in
    ``src/approach/icicle.py`` touches the distances needs the full map, not its pooling: the
    interpretability regularisation (``Appr.criterion`` with ``--similarity_reg``) takes the
    log-similarity maps ``(B, M_old, H, W)`` of the old tasks' prototypes from the current and
    the frozen old model and penalises their difference where the old map is at or above its
    ``--perc`` percentile; the proximity-based initialisation (``Appr.settlement``) k-means the
    patches whose mean distance to the old prototypes, from ``push_forward``, is below a
    quantile."""
    activations = []
    for prototypes in task_prototypes:
        distances = l2_convolution(x, prototypes, torch.ones_like(prototypes))
        similarities = torch.log((distances + 1) / (distances + epsilon))
        # PPNet_head.forward: min_similarities = F.max_pool2d(similarities, kernel_size=...)
        act = F.max_pool2d(similarities, kernel_size=distances.shape[2:]).flatten(1)
        if focal:
            avg = F.avg_pool2d(distances, kernel_size=distances.shape[2:]).flatten(1)
            act = act - torch.log((avg + 1) / (avg + epsilon))
        activations.append(act)
    return torch.cat(activations, 1)


def deformable_topk_similarity(x: Tensor, prototypes: Tensor, k: int) -> Tensor:
    """Deformable ProtoPNet's pooling without its learned offsets: the mean of the ``k``
    largest cosine similarities over positions, ``(B, M)``."""
    return cosine_max_similarity(x, prototypes).flatten(2).topk(k, dim=-1).values.mean(-1)


def prototree_distances(x: Tensor, prototypes: Tensor, eps: float = 1e-14) -> Tensor:
    """ProtoTree's ``L2Conv2D`` then a min over positions: ``sqrt(|d| + 1e-14)`` of the
    expansion, ``(B, M)``; its similarity is ``exp(-distance)``."""
    ones = torch.ones_like(prototypes)
    x2 = F.conv2d(x ** 2, weight=ones)
    p2 = (prototypes ** 2).sum(dim=(1, 2, 3)).view(-1, 1, 1)
    xp = F.conv2d(x, weight=prototypes)
    distances = torch.sqrt(torch.abs(x2 - 2 * xp + p2) + eps)
    return global_min_pool(distances)
