"""Task adapters (installed as ``taskal.adapters``; importing registers them)."""

from taskal.adapters.classification import ClassificationAdapter
from taskal.adapters.ensemble import EnsembleAdapter
from taskal.adapters.mmdet_detection import MMDetAdapter
from taskal.adapters.mmseg_segmentation import MMSegAdapter
from taskal.adapters.torchvision_detection import TorchvisionDetectionAdapter
from taskal.adapters.torchvision_segmentation import TorchvisionSegmentationAdapter

__all__ = [
    "ClassificationAdapter",
    "EnsembleAdapter",
    "MMDetAdapter",
    "MMSegAdapter",
    "TorchvisionDetectionAdapter",
    "TorchvisionSegmentationAdapter",
]
