"""A VQ-VAE vector quantiser (van den Oord et al., 2017) whose codebook lookup is the fused
`protokern.nearest_prototypes` op: no ``(N, num_codes)`` distance matrix, where
vector-quantize-pytorch's `EuclideanCodebook` and diffusers' VQ layers build one with ``cdist``.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from protokern.nn.sharded_rows import Sharding


class Quantized(NamedTuple):
    """Result of `VectorQuantizer`."""

    quantized: Tensor
    """The input's shape: each vector replaced by its code, with the straight-through
    gradient (the gradient of ``quantized`` reaches the input unchanged)."""
    indices: Tensor
    """int64 code of each vector: ``(B, H, W)`` for a map, ``(B, L)`` for tokens."""
    loss: Tensor
    """Scalar: ``commitment_weight * |x - sg[e]|^2`` (mean), plus the codebook loss
    ``|sg[x] - e|^2`` unless the codebook learns by EMA."""


def _check_positive(where: str, **values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{where}: {name} must be a positive number, got {value!r}")


class VectorQuantizer(nn.Module):
    """A VQ-VAE codebook with the straight-through estimator.

    ``forward(x)`` takes a ``(B, D, H, W)`` map or ``(B, L, D)`` tokens and returns `Quantized`
    ``(quantized, indices, loss)``: ``quantized`` in ``x``'s shape, ``indices`` ``(B, H, W)`` or
    ``(B, L)``, ``loss`` a scalar. Each vector's code is its nearest codebook row
    (`protokern.nearest_prototypes`, ties to the lowest index).

    Args:
        num_codes: M, the codebook's rows.
        dim: D.
        commitment_weight: beta, the commitment loss's weight (VQ-VAE: 0.25).
        ema: learn the codebook by exponential moving averages of the vectors assigned to each
            code (VQ-VAE's appendix, vector-quantize-pytorch's default) instead of by the
            codebook loss; ``codebook`` is then a buffer, updated by each forward in training
            mode.
        decay: the moving averages' decay (EMA codebook and the usage counts).
        eps: Laplace smoothing of the EMA cluster sizes.
        dead_code_threshold: in training mode, a code whose moving-average usage
            ``cluster_size`` falls below it is restarted on a vector of the batch (drawn from
            ``seed`` and the step count); 0 disables restarts.
        cosine: l2-normalise the vectors and the codes and match them by cosine distance
            (vector-quantize-pytorch's ``use_cosine_sim``); ``quantized`` is then the
            normalised code.
        seed: draws the initial codebook (standard normal) and the restarts.
        process_group: split the codebook over these ranks (each holds a contiguous shard
            ``codebook`` ``(M_r, D)``; every rank passes the same ``x``); the default group when
            None and one is initialised. The results and gradients equal the unsharded
            module's (see `protokern.nn.sharded_rows`).

    Buffers: ``cluster_size`` ``(M_r,)``, the moving-average usage of each code;
    ``embed_sum`` ``(M_r, D)`` (EMA only); ``steps``, the training forwards so far. A call
    that raises changes none of them.
    """

    def __init__(self, num_codes: int, dim: int, *, commitment_weight: float = 0.25,
                 ema: bool = False, decay: float = 0.99, eps: float = 1e-5,
                 dead_code_threshold: float = 0.0, cosine: bool = False, seed: int = 0,
                 process_group: ProcessGroup | None = None,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        where = "VectorQuantizer"
        for name, value in (("num_codes", num_codes), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
        _check_positive(where, commitment_weight=commitment_weight, eps=eps)
        if not 0 <= decay < 1:
            raise ValueError(f"{where}: decay must be in [0, 1), got {decay!r}")
        if dead_code_threshold < 0:
            raise ValueError(f"{where}: dead_code_threshold must be >= 0, got "
                             f"{dead_code_threshold!r}")
        self.commitment_weight, self.ema, self.decay, self.eps = (commitment_weight, ema, decay,
                                                                  eps)
        self.dead_code_threshold, self.cosine, self.seed = dead_code_threshold, cosine, seed
        self.sharding = Sharding.of(num_codes, process_group, where)
        full = torch.randn(num_codes, dim, generator=torch.Generator().manual_seed(seed))
        if cosine:
            full = F.normalize(full, dim=1)
        codebook = full[self.sharding.rows].to(device=device, dtype=dtype)
        if ema:
            self.register_buffer("codebook", codebook.clone())
            self.register_buffer("embed_sum", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook.clone())
        self.register_buffer("cluster_size", codebook.new_ones(codebook.shape[0]))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=device))

    @property
    def num_codes(self) -> int:
        """M, the size of the (global) codebook."""
        return self.sharding.total

    @property
    def dim(self) -> int:
        return self.codebook.shape[1]

    @property
    def metric(self) -> str:
        return "cosine" if self.cosine else "sqeuclidean"

    def forward(self, x: Tensor) -> Quantized:
        """``x`` ``(B, D, H, W)`` or ``(B, L, D)`` -> `Quantized`; in training mode, then
        updates the EMA codebook, the usage counts and restarts dead codes."""
        channel = self._check(x)
        # only a training step changes state; the check would cost eval a pass and a sync
        if self.training and not torch.compiler.is_compiling() and bool(x.isnan().any()):
            raise ValueError(f"VectorQuantizer: x {tuple(x.shape)} contains NaN; the codebook "
                             f"is left unchanged")
        used = F.normalize(x, dim=channel) if self.cosine else x
        with torch.no_grad():
            nearest = self.sharding.nearest(used.detach(), self.codebook.detach(), 1, self.metric)
        indices = nearest.indices[..., 0]
        codes = self.sharding.lookup(self.codebook, indices)  # (B, H, W, D) or (B, L, D)
        if self.cosine:
            codes = F.normalize(codes, dim=-1)
        if channel == 1:
            codes = codes.movedim(-1, 1)
        loss = self.commitment_weight * F.mse_loss(used, codes.detach())
        if not self.ema:
            loss = loss + F.mse_loss(codes, used.detach())
        quantized = used + (codes - used).detach()
        if self.training:
            vectors = used.detach().movedim(channel, -1).reshape(-1, self.dim)
            self._update(vectors, indices.reshape(-1))
        return Quantized(quantized, indices, loss)

    def _check(self, x: Tensor) -> int:
        """Raise TypeError/ValueError on a bad ``x``; returns its channel dimension."""
        where = "VectorQuantizer"
        if not isinstance(x, Tensor):
            raise TypeError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4):
            raise ValueError(f"{where}: x must be a (B, D, H, W) map or (B, L, D) tokens, got a "
                             f"{x.dim()}-d tensor of shape {tuple(x.shape)}")
        channel = 1 if x.dim() == 4 else 2
        layout = "(B, D, H, W)" if channel == 1 else "(B, L, D)"
        if x.shape[channel] != self.dim:
            raise ValueError(f"{where}: x {tuple(x.shape)} as {layout} has D={x.shape[channel]} "
                             f"but the codebook {tuple(self.codebook.shape)} has D={self.dim}")
        if x.dtype != self.codebook.dtype:
            raise TypeError(f"{where}: x {tuple(x.shape)} is {x.dtype} but the codebook is "
                            f"{self.codebook.dtype}")
        return channel

    @torch.no_grad()
    def _update(self, vectors: Tensor, indices: Tensor) -> None:
        """The training step's state changes, from ``vectors`` ``(N, D)`` (normalised when
        cosine) and their global ``indices`` ``(N,)``: every new value is computed first and
        then stored, so that nothing is left half-updated."""
        rows = self.sharding.rows
        local = indices - rows.start
        owned = ((local >= 0) & (local < self.codebook.shape[0])).to(vectors.dtype)
        local = local.clamp(0, self.codebook.shape[0] - 1)
        # index_add_ keeps every shape static (a boolean selection would not, under compile)
        counts = vectors.new_zeros(self.codebook.shape[0]).index_add_(0, local, owned)
        cluster_size = self.cluster_size.lerp(counts, 1 - self.decay)
        codebook = self.codebook
        if self.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, local, vectors * owned[:, None])
            embed_sum = self.embed_sum.lerp(sums, 1 - self.decay)
            total = self.sharding.sum(cluster_size.sum())
            smoothed = (cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
            codebook = embed_sum / smoothed[:, None]
            if self.cosine:
                codebook = F.normalize(codebook, dim=1)
        if self.dead_code_threshold > 0:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.steps))
            picks = torch.randint(vectors.shape[0], (self.num_codes,), generator=generator)
            replacement = vectors[picks[rows].to(vectors.device)]
            dead = cluster_size < self.dead_code_threshold
            codebook = torch.where(dead[:, None], replacement, codebook)
            cluster_size = torch.where(dead, self.dead_code_threshold, cluster_size)
            if self.ema:
                embed_sum = torch.where(dead[:, None], replacement * self.dead_code_threshold,
                                        embed_sum)
        if codebook is not self.codebook:
            self.codebook.copy_(codebook)
        if self.ema:
            self.embed_sum.copy_(embed_sum)
        self.cluster_size.copy_(cluster_size)
        self.steps += 1

    def extra_repr(self) -> str:
        shard = ""
        if self.sharding.group is not None:
            shard = (f", shard=[{self.sharding.rows.start}:{self.sharding.rows.stop}] of "
                     f"{len(self.sharding.sizes)} ranks")
        return (f"num_codes={self.num_codes}, dim={self.dim}, commitment_weight="
                f"{self.commitment_weight}, ema={self.ema}, decay={self.decay}, "
                f"dead_code_threshold={self.dead_code_threshold}, cosine={self.cosine}{shard}")
