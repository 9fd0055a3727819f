"""Pools of items with stable ids, and the data sets simulations run on."""

from taskal.data.datasets import load_digits, load_image_folder, split_pool
from taskal.data.pool import TensorPool

__all__ = ["TensorPool", "load_digits", "load_image_folder", "split_pool"]
