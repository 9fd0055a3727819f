"""taskal: deep active learning for classification, detection and segmentation."""

__version__ = "0.1.0"
