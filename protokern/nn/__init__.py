"""`torch.nn` modules built on protokern's ops.

- `prototype_layers`: `PrototypeLayer` (ProtoPNet's prototype layer) and
  `ShardedPrototypeLayer` (a bank split over a process group).
"""

from protokern.nn.prototype_layers import PrototypeLayer, ShardedPrototypeLayer

__all__ = ["PrototypeLayer", "ShardedPrototypeLayer"]
