"""protokern: fused prototype-distance ops for PyTorch.

    import protokern as pk
    values, indices = pk.min_distance(x, prototypes, metric="sqeuclidean")
    dmap = pk.distance_map(x, prototypes)
"""

# Importing a backend module registers it (available only where it can run).
from protokern import cpu_backend as _cpu_backend  # noqa: F401
from protokern import cuda_backend as _cuda_backend  # noqa: F401
from protokern import triton as _triton_backend  # noqa: F401  (imports no triton until used)
from protokern import nn
from protokern.backends import (
    available_backends,
    get_backend,
    register_backend,
    set_backend,
    use_backend,
)
from protokern.ops import METRICS, MinDistance, distance_map, min_distance

__version__ = "0.1.0"

__all__ = [
    "METRICS",
    "MinDistance",
    "available_backends",
    "distance_map",
    "get_backend",
    "min_distance",
    "nn",
    "register_backend",
    "set_backend",
    "use_backend",
]
