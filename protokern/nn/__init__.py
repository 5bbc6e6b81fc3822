"""`torch.nn` modules built on protokern's ops.

- `prototype_layers`: `PrototypeLayer` (ProtoPNet's prototype layer) and
  `ShardedPrototypeLayer` (a bank split over a process group).
- `vector_quantizer`: `VectorQuantizer`, a VQ-VAE codebook on `protokern.nearest_prototypes`.
- `memory_bank`: `PatchMemoryBank`, a PatchCore anomaly scorer, with its coreset
  (`coreset`: greedy k-center, sparse random projection).
- `sharded_rows`: the bank split over a process group that both use.
"""

from protokern.nn.memory_bank import AnomalyScores, PatchMemoryBank
from protokern.nn.prototype_layers import PrototypeLayer, ShardedPrototypeLayer
from protokern.nn.vector_quantizer import Quantized, VectorQuantizer

__all__ = ["AnomalyScores", "PatchMemoryBank", "PrototypeLayer", "Quantized",
           "ShardedPrototypeLayer", "VectorQuantizer"]
