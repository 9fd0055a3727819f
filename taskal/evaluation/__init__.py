"""Metrics of a trained model on a labeled pool (the quantity an AL curve plots)."""

from taskal.evaluation.class_quality import class_quality
from taskal.evaluation.coco_map import coco_map, default_background, detections_to_coco
from taskal.evaluation.segmentation import segmentation_metrics

__all__ = [
    "class_quality",
    "coco_map",
    "default_background",
    "detections_to_coco",
    "segmentation_metrics",
]
