"""protokern: fused prototype-distance ops for PyTorch.

    import protokern as pk
    values, indices = pk.min_distance(x, prototypes, metric="sqeuclidean")
    dmap = pk.distance_map(x, prototypes)
    values, indices = pk.nearest_prototypes(x, prototypes, k=1)
    values, indices = pk.topk_distance(x, prototypes, k=3)  # (B, M, 3), over positions
    means = pk.mean_distance(x, prototypes)  # (B, M), closed form
"""

from protokern import nn
from protokern.backends import (
    Backend,
    available_backends,
    get_backend,
    recording,
    register_backend,
    set_backend,
    use_backend,
)
from protokern.models.push import PushSearch, push_search
from protokern.ops import (
    METRICS,
    MinDistance,
    NearestPrototypes,
    TopkDistance,
    distance_map,
    mean_distance,
    min_distance,
    nearest_prototypes,
    topk_distance,
)

__version__ = "0.1.0"

__all__ = [
    "METRICS",
    "Backend",
    "MinDistance",
    "available_backends",
    "distance_map",
    "get_backend",
    "mean_distance",
    "min_distance",
    "nearest_prototypes",
    "NearestPrototypes",
    "nn",
    "push_search",
    "PushSearch",
    "recording",
    "register_backend",
    "set_backend",
    "topk_distance",
    "TopkDistance",
    "use_backend",
]
