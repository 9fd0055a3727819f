"""Pools of items with stable ids, and the data sets simulations run on."""

from taskal.data.coco import CocoDetectionPool, category_counts, load_coco_detection
from taskal.data.datasets import load_digits, load_image_folder, split_pool
from taskal.data.pool import TensorPool
from taskal.data.synthetic_det import (
    SHAPES,
    SyntheticDetectionFiles,
    ensure_synthetic_detection,
    make_synthetic_detection,
)

__all__ = [
    "SHAPES",
    "CocoDetectionPool",
    "SyntheticDetectionFiles",
    "TensorPool",
    "category_counts",
    "ensure_synthetic_detection",
    "load_coco_detection",
    "load_digits",
    "load_image_folder",
    "make_synthetic_detection",
    "split_pool",
]
