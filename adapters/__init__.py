"""Task adapters (installed as ``taskal.adapters``; importing registers them)."""

from taskal.adapters.classification import ClassificationAdapter
from taskal.adapters.ensemble import EnsembleAdapter

__all__ = ["ClassificationAdapter", "EnsembleAdapter"]
