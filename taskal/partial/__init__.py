"""Training from partial labels: the answered region queries of partially labeled items.

* Detection (:mod:`taskal.partial.detection`): each queried box becomes a crop whose
  unlabeled pixels are filled, so nothing unlabeled is trained as background.
* Segmentation (:mod:`taskal.partial.segmentation`): the labeled regions (patches,
  superpixels) keep their labels and every other pixel gets the ignore index 255.
"""

from taskal.partial.detection import Crop, PartialDetectionPool, box_mask, crop_id, crop_window
from taskal.partial.segmentation import PartialSegmentationPool

__all__ = [
    "Crop",
    "PartialDetectionPool",
    "PartialSegmentationPool",
    "box_mask",
    "crop_id",
    "crop_window",
]
