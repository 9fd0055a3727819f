"""Metrics of a trained model on a labeled pool (the quantity an AL curve plots)."""

from taskal.evaluation.coco_map import coco_map, default_background, detections_to_coco

__all__ = ["coco_map", "default_background", "detections_to_coco"]
