"""PatchCore's memory bank (Roth et al., 2022) on the fused `protokern.nearest_prototypes` op:
anomalib's `PatchcoreModel` scores with the full ``(n, bank)`` ``cdist`` matrix and selects its
coreset with an ``(N, D)`` temporary per step; this module holds neither.
"""

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from protokern.nn.coreset import all_finite, coreset_indices
from protokern.nn.prototype_layers import _SharedHandle
from protokern.nn.sharded_rows import Sharding


class AnomalyScores(NamedTuple):
    """Result of `PatchMemoryBank.score`."""

    patch_scores: Tensor
    """Euclidean distance of each patch to its nearest bank row: ``(B, H, W)`` for a map,
    ``(B, L)`` for tokens."""
    image_scores: Tensor
    """``(B,)``: the largest patch score of each image, reweighted as PatchCore's equation 7
    when ``num_neighbors > 1``."""


class PatchMemoryBank(nn.Module):
    """A PatchCore anomaly scorer: a coreset of the patch features of normal images, and each
    test patch's distance to it.

    ``fit(features)`` keeps the greedy k-center coreset (`protokern.nn.coreset`) of the normal
    patches; ``score(features)`` (or calling the module) returns `AnomalyScores`.

    Args:
        dim: D, the features' channels.
        coreset_ratio: the share of the normal patches kept (PatchCore: 0.1 or 0.01); 1 keeps
            them all, without selection.
        num_neighbors: PatchCore's ``b``: with more than 1, the image score is reweighted by how
            isolated the nearest bank row of the worst patch is among its ``b`` nearest bank
            rows (anomalib's ``num_neighbors``, default 9); 1 leaves the maximum as it is.
        projection: select the coreset on a sparse random projection of the features (an int
            dimension, or ``"auto"``: anomalib's Johnson-Lindenstrauss dimension at ``eps``);
            the bank keeps the full features.
        eps: the Johnson-Lindenstrauss distortion of ``projection="auto"`` (anomalib: 0.9).
        seed: draws the coreset's first center and the projection.
        process_group: split the bank over these ranks (every rank fits on, and scores, the
            same features); the default group when None and one is initialised. Scores equal
            the unsharded module's.
        progress: a tqdm bar over the coreset's steps.

    Buffers: ``bank`` ``(M_r, D)``, this rank's rows of the ``bank_size`` selected patches
    (``(0, D)`` before ``fit``); the state dict round-trips them, whatever their size.
    """

    def __init__(self, dim: int, *, coreset_ratio: float = 0.1, num_neighbors: int = 1,
                 projection: int | str | None = None, eps: float = 0.9, seed: int = 0,
                 process_group: ProcessGroup | None = None, progress: bool = False,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        where = "PatchMemoryBank"
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{where}: dim must be a positive int, got {dim!r}")
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"{where}: coreset_ratio must be in (0, 1], got {coreset_ratio!r}")
        if isinstance(num_neighbors, bool) or not isinstance(num_neighbors, int) or (
                num_neighbors < 1):
            raise ValueError(f"{where}: num_neighbors must be a positive int, got "
                             f"{num_neighbors!r}")
        self.coreset_ratio, self.num_neighbors = coreset_ratio, num_neighbors
        self.projection, self.eps, self.seed, self.progress = projection, eps, seed, progress
        self._process_group = _SharedHandle(process_group)
        self.register_buffer("bank", torch.empty(0, dim, device=device, dtype=dtype))
        self.register_buffer("bank_size", torch.zeros((), dtype=torch.int64, device=device))
        self.sharding: Sharding | None = None

    @property
    def dim(self) -> int:
        return self.bank.shape[1]

    def _vectors(self, features: Tensor, where: str, *, allow_vectors: bool) -> Tensor:
        """Check ``features``; returns them as ``(N, D)`` rows (a copy only for a map)."""
        if not isinstance(features, Tensor):
            raise TypeError(f"{where}: features must be a torch.Tensor, got "
                            f"{type(features).__name__}")
        ranks = (2, 3, 4) if allow_vectors else (3, 4)
        if features.dim() not in ranks:
            accepted = ("(B, D, H, W) maps, (B, L, D) tokens or (N, D) vectors" if allow_vectors
                        else "(B, D, H, W) maps or (B, L, D) tokens")
            raise ValueError(f"{where}: features must be {accepted}, got a {features.dim()}-d "
                             f"tensor of shape {tuple(features.shape)}")
        if not features.is_floating_point():
            raise TypeError(f"{where}: features must be floating point, got {features.dtype} "
                            f"(shape {tuple(features.shape)})")
        channel = 1 if features.dim() == 4 else features.dim() - 1
        if features.shape[channel] != self.dim:
            raise ValueError(f"{where}: features {tuple(features.shape)} have D="
                             f"{features.shape[channel]} but the bank "
                             f"{(int(self.bank_size), self.dim)} has D={self.dim}")
        return features.detach().movedim(channel, -1).reshape(-1, self.dim)

    @torch.no_grad()
    def fit(self, features: Tensor) -> "PatchMemoryBank":
        """Replace the bank by the coreset of ``features``: the patches of normal images,
        ``(B, D, H, W)``, ``(B, L, D)`` or ``(N, D)``. Returns ``self``. Raises (leaving the bank
        as it was) on a bad shape, NaN, or a coreset smaller than ``num_neighbors``."""
        where = "PatchMemoryBank.fit"
        vectors = self._vectors(features, where, allow_vectors=True)
        if vectors.shape[0] == 0:
            raise ValueError(f"{where}: features {tuple(features.shape)} have no patches")
        if not all_finite(vectors):
            raise ValueError(f"{where}: features {tuple(features.shape)} contain NaN or "
                             f"infinity; the bank is left unchanged")
        size = vectors.shape[0] if self.coreset_ratio == 1 else max(
            1, int(vectors.shape[0] * self.coreset_ratio))
        if size < self.num_neighbors:
            raise ValueError(f"{where}: the coreset of features {tuple(features.shape)} would "
                             f"keep {size} patches, fewer than num_neighbors="
                             f"{self.num_neighbors}")
        sharding = Sharding.of(size, self._process_group.value, where)
        if self.coreset_ratio == 1:
            selected = vectors
        else:
            selected = vectors[coreset_indices(vectors, self.coreset_ratio,
                                               projection=self.projection, eps=self.eps,
                                               seed=self.seed, progress=self.progress)]
        self.bank = selected[sharding.rows].clone()  # the features' dtype and device
        self.bank_size.fill_(size)
        self.sharding = sharding
        return self

    @torch.no_grad()
    def score(self, features: Tensor) -> AnomalyScores:
        """`AnomalyScores` of test ``features`` ``(B, D, H, W)`` or ``(B, L, D)``: each patch's
        Euclidean distance to the bank, ``(B, H, W)`` or ``(B, L)``, and each image's score
        ``(B,)``."""
        where = "PatchMemoryBank.score"
        if self.sharding is None:
            raise ValueError(f"{where}: the bank is empty; call fit (or load_state_dict) first")
        self._vectors(features, where, allow_vectors=False)  # the checks; no copy is kept
        if features.dtype != self.bank.dtype:
            raise TypeError(f"{where}: features {tuple(features.shape)} are {features.dtype} "
                            f"but the bank is {self.bank.dtype}")
        nearest = self.sharding.nearest(features, self.bank, 1, "sqeuclidean")
        patch_scores = nearest.values[..., 0].clamp_min(0).sqrt()
        flat = patch_scores.flatten(1)
        image_scores = flat.amax(1)
        if self.num_neighbors > 1:
            image_scores = image_scores * self._reweighting(features, flat,
                                                            nearest.indices.flatten(1))
        return AnomalyScores(patch_scores, image_scores)

    def forward(self, features: Tensor) -> AnomalyScores:
        """`score`: the module called on test features."""
        return self.score(features)

    def _reweighting(self, features: Tensor, flat_scores: Tensor, flat_indices: Tensor
                     ) -> Tensor:
        """PatchCore's equation 7 weight ``(B,)``: ``1 - softmax`` (over the ``b`` nearest bank
        rows of ``m*``, the worst patch's nearest row) of the worst patch's distances to them,
        taken at ``m*``; anomalib's `compute_anomaly_score`."""
        if self.num_neighbors > self.sharding.total:  # a Python int: no sync, and compiles
            raise ValueError(f"PatchMemoryBank.score: num_neighbors={self.num_neighbors} "
                             f"exceeds the bank's {self.sharding.total} rows")
        batch = torch.arange(features.shape[0], device=features.device)
        worst = flat_scores.argmax(1)
        if features.dim() == 4:
            queries = features.flatten(2)[batch, :, worst]  # (B, D), no (B, HW, D) copy
        else:
            queries = features[batch, worst]
        nearest_rows = self.sharding.lookup(self.bank, flat_indices[batch, worst])  # m*
        support = self.sharding.nearest(nearest_rows, self.bank, self.num_neighbors,
                                        "sqeuclidean").indices  # N_b(m*), m* first
        distances = (queries[:, None] - self.sharding.lookup(self.bank, support)).norm(dim=-1)
        return 1 - distances.softmax(1)[:, 0]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        # the bank's size is the checkpoint's, not the constructor's (0 rows before fit)
        bank, size = state_dict.get(prefix + "bank"), state_dict.get(prefix + "bank_size")
        if isinstance(bank, Tensor) and isinstance(size, Tensor) and int(size) > 0:
            sharding = Sharding.of(int(size), self._process_group.value, "PatchMemoryBank")
            if bank.shape != (sharding.sizes[sharding.rank], self.dim):
                raise ValueError(f"PatchMemoryBank.load_state_dict: bank {tuple(bank.shape)} is "
                                 f"not this rank's shard of {int(size)} rows of D={self.dim}")
            self.bank = torch.empty_like(bank, device=self.bank.device)
            super()._load_from_state_dict(state_dict, prefix, *args)
            self.sharding = sharding
        else:
            super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        shard = ""
        if self.sharding is not None and self.sharding.group is not None:
            shard = (f", shard=[{self.sharding.rows.start}:{self.sharding.rows.stop}] of "
                     f"{len(self.sharding.sizes)} ranks")
        return (f"dim={self.dim}, bank_size={int(self.bank_size)}, coreset_ratio="
                f"{self.coreset_ratio}, num_neighbors={self.num_neighbors}, projection="
                f"{self.projection!r}{shard}")
