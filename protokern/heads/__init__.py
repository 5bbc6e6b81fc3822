"""Class-incremental heads on protokern's ops, their metrics and a scenario runner.

    from protokern.heads import PrototypeHead
    head = PrototypeHead(dim=768, metric="cosine")
    head.add_classes(10); head.update(features, labels); logits = head(features)
"""

from protokern.heads.fecam_head import FeCAMHead, shrink_covariance
from protokern.heads.kmeans import KMeansResult, kmeans
from protokern.heads.metrics import CILMetrics, cil_metrics
from protokern.heads.part_prototype_head import PartPrototypeHead, PartPrototypeOutput
from protokern.heads.prototype_head import PrototypeHead
from protokern.heads.scenario import HEADS, run_scenario, split_into_tasks

__all__ = [
    "CILMetrics",
    "FeCAMHead",
    "HEADS",
    "KMeansResult",
    "PartPrototypeHead",
    "PartPrototypeOutput",
    "PrototypeHead",
    "cil_metrics",
    "kmeans",
    "run_scenario",
    "shrink_covariance",
    "split_into_tasks",
]
