"""The reference ProtoPNet ("This Looks Like That", Chen et al. 2019) on protokern's ops.

- `protopnet`: the model (backbone, add-on layers, `protokern.nn.PrototypeLayer`, last layer)
  and `build_protopnet`, which builds one from a checkpoint's recipe;
- `backbones`: the built-in small CNN, torchvision and timm backbones, receptive fields;
- `losses`: cross-entropy, cluster, separation and L1 terms;
- `push`: prototypes projected onto their nearest training patches, streamed batch by batch;
- `training`: the paper's schedule (warm-up, joint, push, last layer), data parallel;
- `checkpoint`: atomic checkpoints, read with ``weights_only``;
- `explain`: the evidence behind a decision, as printed lines and PNGs.
"""

from protokern.models.protopnet import ProtoPNet, ProtoPNetOutput, build_protopnet

__all__ = ["ProtoPNet", "ProtoPNetOutput", "build_protopnet"]
