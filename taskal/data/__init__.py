"""Pools of items with stable ids, and the data sets simulations run on."""

from taskal.data.coco import CocoDetectionPool, category_counts, load_coco_detection
from taskal.data.datasets import load_digits, load_image_folder, split_pool
from taskal.data.pool import TensorPool
from taskal.data.segmentation import SegmentationPool, check_mask, load_segmentation_folder
from taskal.data.synthetic_det import (
    SHAPES,
    SyntheticDetectionFiles,
    ensure_synthetic_detection,
    make_synthetic_detection,
)
from taskal.data.synthetic_seg import (
    SYNTHETIC_SEG_CLASSES,
    SyntheticSegmentationFiles,
    SyntheticVolumeFiles,
    ensure_synthetic_segmentation,
    ensure_synthetic_volumes,
    make_synthetic_segmentation,
    make_synthetic_volumes,
)
from taskal.data.volumes import (
    VolumeSlicePool,
    load_volume_slices,
    read_label_volume,
    write_label_volume,
)

__all__ = [
    "SHAPES",
    "SYNTHETIC_SEG_CLASSES",
    "CocoDetectionPool",
    "SegmentationPool",
    "SyntheticDetectionFiles",
    "SyntheticSegmentationFiles",
    "SyntheticVolumeFiles",
    "TensorPool",
    "VolumeSlicePool",
    "category_counts",
    "check_mask",
    "ensure_synthetic_detection",
    "ensure_synthetic_segmentation",
    "ensure_synthetic_volumes",
    "load_coco_detection",
    "load_digits",
    "load_image_folder",
    "load_segmentation_folder",
    "load_volume_slices",
    "make_synthetic_detection",
    "make_synthetic_segmentation",
    "make_synthetic_volumes",
    "read_label_volume",
    "split_pool",
    "write_label_volume",
]
