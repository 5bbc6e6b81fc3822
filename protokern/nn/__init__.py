"""`torch.nn` modules built on protokern's ops.

- `prototype_layers`: `PrototypeLayer` (ProtoPNet's prototype layer) and
  `ShardedPrototypeLayer` (a bank split over a process group); `port_state_dict` loads
  original ProtoPNet and CaBRNet checkpoints into models built on them.
- `vector_quantizer`: `VectorQuantizer`, a VQ-VAE codebook on `protokern.nearest_prototypes`.
- `memory_bank`: `PatchMemoryBank`, a PatchCore anomaly scorer, with its coreset
  (`coreset`: greedy k-center, sparse random projection).
- `sharded_rows`: the bank split over a process group that both use.
"""

from protokern.nn.memory_bank import AnomalyScores, PatchMemoryBank
from protokern.nn.prototype_layers import (
    ORIGINAL_LAYOUTS,
    PrototypeLayer,
    ShardedPrototypeLayer,
    port_state_dict,
)
from protokern.nn.vector_quantizer import Quantized, VectorQuantizer

__all__ = ["ORIGINAL_LAYOUTS", "AnomalyScores", "PatchMemoryBank", "PrototypeLayer", "Quantized",
           "ShardedPrototypeLayer", "VectorQuantizer", "port_state_dict"]
