"""Simulated active learning with a ground-truth oracle, and its reports."""

from taskal.simulation.detection import DetectionSimulation, DetSimulationConfig
from taskal.simulation.loop import Simulation, SimulationConfig, resolve_strategies
from taskal.simulation.report import (
    aulc,
    format_reference_table,
    format_table,
    plot_curves,
    summarize,
)
from taskal.simulation.segmentation import SegmentationSimulation, SegSimulationConfig

__all__ = [
    "DetSimulationConfig",
    "DetectionSimulation",
    "SegSimulationConfig",
    "SegmentationSimulation",
    "Simulation",
    "SimulationConfig",
    "aulc",
    "format_reference_table",
    "format_table",
    "plot_curves",
    "resolve_strategies",
    "summarize",
]
