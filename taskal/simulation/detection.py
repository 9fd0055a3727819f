"""Multi-round active learning for detection against a ground-truth oracle (a simulation).

As for classification (:mod:`taskal.simulation.loop`): every (strategy, seed) run starts
from the same seed-dependent initial images and model initialisation each round, random
always runs, and the curve records the metric (COCO box mAP on a held-out split, from
pycocotools) against the number of labeled images. Queries are whole images; box queries
need training on partially annotated images, which is not built yet.

Per strategy, the round's detector gets what the strategy reads: a jointly trained
loss-prediction module for ``llal`` (on the FPN levels), and the per-class quality on the
labeled images (:func:`~taskal.evaluation.class_quality`) for difficulty-calibrated scores.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from taskal.adapters.torchvision_detection import TorchvisionDetectionAdapter
from taskal.data.coco import CocoDetectionPool
from taskal.evaluation import class_quality, coco_map
from taskal.llal.module import LossPredictionModule
from taskal.simulation.loop import _dataclass_from, resolve_strategies
from taskal.simulation.rounds import RoundLoop, mix_seed
from taskal.strategies.base import QueryStrategy
from taskal.training import LLALConfig
from taskal.training_det import DetTrainConfig, train_detector
from taskal.types import Adapter, ItemId


@dataclass
class DetSimulationConfig:
    """The ``al`` block of a detection config, resolved.

    Attributes:
        strategies: registered names or config dicts (``name`` labels results); random is
            added first when missing.
        initial: images labeled at random before the first round.
        budget: images bought per round.
        rounds: selection rounds.
        seeds: one run per seed and strategy.
        model: a :data:`~taskal.registry.MODELS` config of a torchvision detector, e.g.
            ``dict(type="torchvision_detection", name="retinanet_resnet50_fpn")``;
            ``num_classes`` is filled from the data (plus one for Faster R-CNN's background).
        train: :class:`~taskal.training_det.DetTrainConfig` fields.
        llal: :class:`~taskal.training.LLALConfig` fields for ``llal`` strategies.
        batch_size: images per forward while scoring and evaluating.
        device: where models run.
        progress: show progress bars.
    """

    strategies: list[Any] = field(default_factory=lambda: ["random", "entropy"])
    initial: int = 8
    budget: int = 8
    rounds: int = 4
    seeds: list[int] = field(default_factory=lambda: [0])
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    llal: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("initial", "budget", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"rounds must be a non-negative integer, got {self.rounds!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct ints, got {self.seeds}")
        if "type" not in self.model:
            raise ValueError(
                "model must be a MODELS config of a torchvision detector, e.g. "
                "dict(type='torchvision_detection', name='retinanet_resnet50_fpn')"
            )
        self.train_cfg = _dataclass_from(DetTrainConfig, self.train, "train")
        self.llal_cfg = _dataclass_from(LLALConfig, self.llal, "al.llal")
        for label, strategy in resolve_strategies(self.strategies):
            if strategy.sampling == "ensemble":
                raise ValueError(
                    f"strategy {label!r} scores a deep ensemble, which the detection "
                    "simulation does not train yet; use uncertainty, MC-dropout, LLAL, "
                    "core-set, BADGE, two-stage, difficulty-calibrated or random strategies"
                )


class DetectionSimulation(RoundLoop):
    """Run the rounds of every (strategy, seed) on a detection pool and a test split."""

    desc = "simulate det"

    def __init__(
        self, cfg: DetSimulationConfig, pool: CocoDetectionPool, test: CocoDetectionPool
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.test = test
        self.check_pool_size()
        self.strategies = resolve_strategies(cfg.strategies)
        self.select_batch_size = cfg.batch_size

    def annotation_cost(self, labeled: list[ItemId]) -> float:
        """Boxes drawn to label ``labeled`` whole (their ground-truth annotations)."""
        return float(sum(len(self.pool.coco.getAnnIds(imgIds=[i])) for i in labeled))

    def evaluate(self, adapter: Adapter) -> float:
        """COCO box mAP (pycocotools) on the test split."""
        return coco_map(adapter, self.test, batch_size=self.cfg.batch_size)["mAP"]

    def train(
        self, strategy: QueryStrategy, labeled: list[ItemId], seed: int, r: int
    ) -> TorchvisionDetectionAdapter:
        """A fresh detector trained on ``labeled`` for round ``r`` (the same initialisation
        for every strategy), with a loss predictor or class quality where the strategy
        reads one."""
        torch.manual_seed(mix_seed(seed, r, 0))
        model_cfg = copy.deepcopy(self.cfg.model)
        adapter = TorchvisionDetectionAdapter(self._num_classes(model_cfg), device=self.cfg.device)
        llal = None
        if "loss_pred" in strategy.needs:
            infos = [f for f in adapter.feature_info if f.name == "fpn"] or adapter.feature_info
            llal = LossPredictionModule(infos, hidden=self.cfg.llal_cfg.hidden)
        g = torch.Generator().manual_seed(mix_seed(seed, r, 2))
        cfg = self.cfg
        train_detector(adapter, self.pool, labeled, cfg.train_cfg, g, False, llal, cfg.llal_cfg)
        if "class_quality" in strategy.needs:
            adapter.class_quality = class_quality(
                adapter, self.pool, labeled, batch_size=self.cfg.batch_size
            )
        return adapter

    def _num_classes(self, model_cfg: dict[str, Any]) -> dict[str, Any]:
        name = str(model_cfg.get("name", model_cfg.get("arch", "")))
        background = 1 if name.startswith(("fasterrcnn", "faster_rcnn")) else 0
        model_cfg.setdefault("num_classes", len(self.pool.classes) + background)
        return model_cfg
