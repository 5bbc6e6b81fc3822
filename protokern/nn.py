"""`torch.nn` modules built on protokern's ops."""

import torch
from torch import Tensor, nn

from protokern.ops import MinDistance, check_metric, distance_map, min_distance


class PrototypeLayer(nn.Module):
    """A ProtoPNet prototype layer: min distance from every prototype to the patches of a map.

    Holds ``prototype_vectors`` ``(M, D, ph, pw)``, initialised uniform in [0, 1) as ProtoPNet
    does. ``forward(x)`` takes a ``(B, D, H, W)`` feature map (or ``(B, L, D)`` tokens when the
    patch is 1x1) and returns `MinDistance` ``(values, indices)``, both ``(B, M)``.

    Args:
        num_prototypes: M.
        dim: D, the channels of the feature map.
        patch: ``(ph, pw)`` or one int for a square window.
        metric: ``"sqeuclidean"`` or ``"cosine"``.
    """

    def __init__(
        self,
        num_prototypes: int,
        dim: int,
        patch: int | tuple[int, int] = (1, 1),
        metric: str = "sqeuclidean",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(patch, int):
            patch = (patch, patch)
        if not isinstance(patch, (tuple, list)) or len(patch) != 2:
            raise ValueError(f"PrototypeLayer: patch must be an int or a pair (ph, pw), "
                             f"got {patch!r}")
        ph, pw = patch
        for name, value in (("num_prototypes", num_prototypes), ("dim", dim), ("patch", ph),
                            ("patch", pw)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PrototypeLayer: {name} must be a positive int, got {value!r}")
        check_metric(metric, "PrototypeLayer")
        self.metric = metric
        self.prototype_vectors = nn.Parameter(
            torch.rand(num_prototypes, dim, ph, pw, device=device, dtype=dtype)
        )

    @property
    def num_prototypes(self) -> int:
        return self.prototype_vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.prototype_vectors.shape[1]

    @property
    def patch(self) -> tuple[int, int]:
        return tuple(self.prototype_vectors.shape[2:])

    def forward(self, x: Tensor) -> MinDistance:
        return min_distance(x, self.prototype_vectors, self.metric)

    def distance_map(self, x: Tensor) -> Tensor:
        """All distances ``(B, M, H', W')`` (tokens: ``(B, M, L)``), for explanations."""
        return distance_map(x, self.prototype_vectors, self.metric)

    def extra_repr(self) -> str:
        ph, pw = self.patch
        return (f"num_prototypes={self.num_prototypes}, dim={self.dim}, patch=({ph}, {pw}), "
                f"metric={self.metric!r}")
