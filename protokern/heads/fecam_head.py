"""FeCAM: Mahalanobis distance to class means with shrunk covariances (Goswami et al. 2023)."""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from protokern.heads.growth import (
    apply_keeping_dtypes,
    check_count,
    check_features,
    check_features_labels,
    resize_buffers_for_load,
)
from protokern.ops import min_distance

COVARIANCES = ("shared", "per_class")


def shrink_covariance(cov: Tensor, gamma_diagonal: float, gamma_off_diagonal: float,
                      normalize: bool) -> Tensor:
    """FeCAM's covariance shrinkage (and optional normalisation), ``(..., D, D)`` -> same.

    ``S = cov + g1 * mean(diag cov) * I + g2 * mean(offdiag cov) * (1 - I)``, then, if
    ``normalize``, ``S_ij / sqrt(S_ii S_jj)`` (a correlation matrix), as the FeCAM code does so
    that classes with larger feature scales do not get systematically smaller distances.
    """
    dim = cov.shape[-1]
    eye = torch.eye(dim, dtype=cov.dtype, device=cov.device)
    diag_mean = cov.diagonal(dim1=-2, dim2=-1).mean(-1)
    off_mean = ((cov * (1 - eye)).sum((-2, -1)) / max(dim * (dim - 1), 1))
    shrunk = (cov + gamma_diagonal * diag_mean[..., None, None] * eye
              + gamma_off_diagonal * off_mean[..., None, None] * (1 - eye))
    if normalize:
        std = shrunk.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300).sqrt()
        shrunk = shrunk / (std[..., :, None] * std[..., None, :])
    return shrunk


class FeCAMHead(nn.Module):
    """Logits ``-(x - mu_c)^T S_c^-1 (x - mu_c)``: squared Mahalanobis distance to class means.

    The statistics (class sums, counts and sums of outer products) accumulate exactly in
    float64 with `update`, in any number of calls. The covariance is either one pooled
    within-class covariance shared by all classes (``covariance="shared"``) or one per class
    (``"per_class"``, which needs >= 2 samples per class), shrunk as in FeCAM
    (`shrink_covariance`). Casting the module (``.float()``, ``.half()``, ``.to(dtype)``)
    leaves these statistics float64, exactly; they move with ``.to(device)``.

    Evaluation never inverts a matrix: the inverse Cholesky factors ``W = L^-1`` (``S = L L^T``,
    so ``d = |W (x - mu)|^2``) are computed once by a triangular solve and cached until the
    statistics change. In the shared case every class uses the same ``W``: queries and means
    are whitened once and the distances come from protokern's fused sqeuclidean op.

    Args:
        dim: D.
        num_classes: initial classes (more with `add_classes`).
        covariance: ``"shared"`` or ``"per_class"``.
        shrink: FeCAM's ``(gamma_diagonal, gamma_off_diagonal)``.
        normalize: normalise the shrunk covariance to a correlation matrix (FeCAM does).
        class_chunk: per-class case: classes evaluated together (bounds the
            ``(chunk, N, D)`` intermediate).
    """

    def __init__(self, dim: int, num_classes: int = 0, covariance: str = "shared",
                 shrink: tuple[float, float] = (1.0, 1.0), normalize: bool = True,
                 class_chunk: int = 64, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        where = "FeCAMHead"
        self.dim = check_count(dim, "dim", where, low=1)
        check_count(num_classes, "num_classes", where)
        if covariance not in COVARIANCES:
            raise ValueError(f"{where}: covariance must be one of {COVARIANCES}, got "
                             f"{covariance!r}")
        self.covariance = covariance
        if len(shrink) != 2 or any(not isinstance(g, (int, float)) or g < 0 for g in shrink):
            raise ValueError(f"{where}: shrink must be two non-negative numbers, got {shrink!r}")
        self.shrink = (float(shrink[0]), float(shrink[1]))
        self.normalize = bool(normalize)
        self.class_chunk = check_count(class_chunk, "class_chunk", where, low=1)
        f64 = torch.float64
        self.register_buffer("class_sums", torch.zeros(num_classes, dim, dtype=f64,
                                                       device=device))
        self.register_buffer("class_counts", torch.zeros(num_classes, dtype=torch.int64,
                                                         device=device))
        # sums of x x^T: one (D, D) over all samples (shared) or one per class (per_class)
        scatter_shape = (1, dim, dim) if covariance == "shared" else (num_classes, dim, dim)
        self.register_buffer("outer_sums", torch.zeros(scatter_shape, dtype=f64, device=device))
        self._whiteners: Tensor | None = None  # cached (1 or C, D, D) inverse Cholesky factors

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "FeCAMHead":
        """`nn.Module._apply` (behind `.to`, `.float`, `.cuda`, ...), keeping the float64
        statistics float64 (they only move) and dropping the cached whiteners."""
        apply_keeping_dtypes(self, fn, recurse, ("class_sums", "outer_sums"))
        self._whiteners = None
        return self

    @property
    def num_classes(self) -> int:
        return self.class_counts.shape[0]

    def seen(self) -> Tensor:
        return self.class_counts > 0

    def add_classes(self, n: int) -> range:
        """Append ``n`` classes; returns their indices."""
        check_count(n, "n", "FeCAMHead.add_classes")
        old = self.num_classes
        self.class_sums = torch.cat([self.class_sums, self.class_sums.new_zeros(n, self.dim)])
        self.class_counts = torch.cat([self.class_counts, self.class_counts.new_zeros(n)])
        if self.covariance == "per_class":
            self.outer_sums = torch.cat([self.outer_sums,
                                         self.outer_sums.new_zeros(n, self.dim, self.dim)])
        self._whiteners = None
        return range(old, old + n)

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Accumulate ``(N, D)`` features with ``(N,)`` labels into the float64 statistics."""
        check_features_labels(features, labels, self.dim, self.num_classes, "FeCAMHead.update")
        x = features.detach().to(self.class_sums.device, torch.float64)
        labels = labels.to(self.class_counts.device, torch.int64)
        self.class_sums.index_add_(0, labels, x)
        self.class_counts += torch.bincount(labels, minlength=self.num_classes)
        if self.covariance == "shared":
            self.outer_sums[0] += x.T @ x
        else:
            for c in labels.unique().tolist():
                xc = x[labels == c]
                self.outer_sums[c] += xc.T @ xc
        self._whiteners = None

    def class_means(self) -> Tensor:
        """``(C, D)`` float64 (zeros for unseen classes)."""
        return self.class_sums / self.class_counts.clamp_min(1)[:, None]

    def covariances(self) -> Tensor:
        """Unshrunk covariances, ``(1, D, D)`` (shared: pooled within-class, denominator
        ``N - C_seen``) or ``(C, D, D)`` (per class, denominator ``n_c - 1``), float64."""
        counts, means = self.class_counts.double(), self.class_means()
        between = means.T @ (counts[:, None] * means) if self.covariance == "shared" else (
            counts[:, None, None] * means[:, :, None] * means[:, None, :])
        where = "FeCAMHead"
        if self.covariance == "shared":
            dof = int(self.class_counts.sum()) - int(self.seen().sum())
            if dof < 1:
                raise ValueError(f"{where}: the shared covariance needs more samples than "
                                 f"classes; have {int(self.class_counts.sum())} samples in "
                                 f"{int(self.seen().sum())} classes")
            return ((self.outer_sums[0] - between) / dof)[None]
        few = (self.seen() & (self.class_counts < 2)).nonzero().flatten().tolist()
        if few:
            raise ValueError(f"{where}: covariance='per_class' needs >= 2 samples per class; "
                             f"classes {few} have 1 (use covariance='shared')")
        return (self.outer_sums - between) / (counts - 1).clamp_min(1)[:, None, None]

    def whiteners(self) -> Tensor:
        """Cached inverse Cholesky factors ``W = L^-1`` of the shrunk covariances, ``(1 or C,
        D, D)`` float64, lower triangular; ``d(x, c) = |W_c (x - mu_c)|^2``."""
        if self._whiteners is None:
            self._check_finite()
            shrunk = shrink_covariance(self.covariances(), *self.shrink, self.normalize)
            if self.covariance == "per_class":  # unseen classes: identity, masked in forward
                eye = torch.eye(self.dim, dtype=shrunk.dtype, device=shrunk.device)
                shrunk = torch.where(self.seen()[:, None, None], shrunk, eye)
            factor, info = torch.linalg.cholesky_ex(shrunk)
            if (info != 0).any():
                bad = (info != 0).nonzero().flatten().tolist()
                raise ValueError(f"FeCAMHead: shrunk covariance {bad} is not positive definite "
                                 f"(shrink={self.shrink}); increase the shrinkage")
            eye = torch.eye(self.dim, dtype=factor.dtype, device=factor.device)
            self._whiteners = torch.linalg.solve_triangular(
                factor, eye.expand_as(factor), upper=False)
        return self._whiteners

    def _check_finite(self) -> None:
        """Raise ValueError naming the classes and feature dimensions whose statistics are NaN
        or inf (from non-finite `update` features): the Cholesky factorisation would otherwise
        fail with a misleading "not positive definite" message."""
        bad_sums = ~torch.isfinite(self.class_sums)
        bad_outer = ~torch.isfinite(self.outer_sums)
        if not (bad_sums.any() or bad_outer.any()):
            return
        # the diagonal of the outer sums (sums of x_i^2) is non-finite exactly in the bad
        # dimensions (NaN spreads over whole rows and columns off it), and it also catches
        # sums that stay finite while their squares overflow
        bad_diagonal = ~torch.isfinite(self.outer_sums.diagonal(dim1=-2, dim2=-1))
        bad_dims = bad_sums.any(0) | bad_diagonal.any(0)
        dims = bad_dims.nonzero().flatten().tolist()
        classes = bad_sums.any(1)
        if self.covariance == "per_class":
            classes = classes | bad_outer.flatten(1).any(1)
        named = classes.nonzero().flatten().tolist()
        which = f"classes {named}" if named else "the shared covariance"
        raise ValueError(f"FeCAMHead: the statistics of {which} are not finite (NaN or inf) "
                         f"in feature dimensions {dims}; the features given to update() had "
                         f"NaN or inf values (or overflow float64 when squared)")

    def distances(self, features: Tensor) -> Tensor:
        """``(N, C)`` squared Mahalanobis distances in the features' dtype (computed in
        float64 for the whitening; the shared case's distances by the fused op)."""
        check_features(features, self.dim, "FeCAMHead.forward")
        num = features.shape[0]
        if self.num_classes == 0 or num == 0 or not self.seen().any():
            return features.new_zeros(num, self.num_classes)
        whiteners, means = self.whiteners(), self.class_means()
        x = features.detach().to(means.device, torch.float64)
        if self.covariance == "shared":
            w = whiteners[0]
            queries, centers = (x @ w.T).to(features.dtype), (means @ w.T).to(features.dtype)
            return min_distance(queries[:, None, :], centers, "sqeuclidean").values.to(
                features.device)
        out = x.new_empty(num, self.num_classes)
        for start in range(0, self.num_classes, self.class_chunk):
            stop = min(start + self.class_chunk, self.num_classes)
            # (chunk, N, D): each class's whitening applied to the queries minus its mean
            diff = x[None] - means[start:stop, None, :]
            out[:, start:stop] = (diff @ whiteners[start:stop].transpose(1, 2)).square().sum(
                -1).T
        return out.to(features.device, features.dtype)

    def forward(self, features: Tensor) -> Tensor:
        """``(N, D)`` -> ``(N, C)`` logits ``-d`` (``-inf`` for classes without samples).

        Not differentiable: the whitening runs on detached float64 copies."""
        logits = -self.distances(features)
        return logits.masked_fill(~self.seen().to(logits.device), float("-inf"))

    @torch.no_grad()
    def predict(self, features: Tensor, topk: int = 1) -> Tensor:
        """``(N, topk)`` int64 class indices, best first."""
        seen = int(self.seen().sum())
        if not isinstance(topk, int) or seen == 0 or not 1 <= topk <= seen:
            raise ValueError(f"FeCAMHead.predict: topk must be an int in [1, {seen}] (the "
                             f"classes with samples), got {topk!r}")
        return self.forward(features).topk(topk, dim=1).indices

    def get_extra_state(self) -> dict:
        return {"dim": self.dim, "covariance": self.covariance, "shrink": self.shrink,
                "normalize": self.normalize}

    def set_extra_state(self, state: dict) -> None:
        self.shrink, self.normalize = tuple(state["shrink"]), state["normalize"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            for name in ("dim", "covariance"):
                if extra[name] != getattr(self, name):
                    raise ValueError(f"FeCAMHead.load_state_dict: the saved head has "
                                     f"{name}={extra[name]!r}, this one {getattr(self, name)!r}")
        resize_buffers_for_load(
            self, state_dict, prefix,
            {"class_sums": (self.dim,), "class_counts": (), "outer_sums": (self.dim, self.dim)},
            "FeCAMHead.load_state_dict")
        self._whiteners = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_classes={self.num_classes}, "
                f"covariance={self.covariance!r}, shrink={self.shrink}, "
                f"normalize={self.normalize}")
