"""`torch.nn` modules built on protokern's ops.

- `prototype_layers`: `PrototypeLayer` (ProtoPNet's prototype layer) and
  `ShardedPrototypeLayer` (a bank split over a process group); `port_state_dict` loads
  original ProtoPNet and CaBRNet checkpoints into models built on them.
"""

from protokern.nn.prototype_layers import (
    ORIGINAL_LAYOUTS,
    PrototypeLayer,
    ShardedPrototypeLayer,
    port_state_dict,
)

__all__ = ["ORIGINAL_LAYOUTS", "PrototypeLayer", "ShardedPrototypeLayer", "port_state_dict"]
