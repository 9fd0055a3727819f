"""Multi-round active learning for detection against a ground-truth oracle (a simulation).

As for classification (:mod:`taskal.simulation.loop`): every (strategy, seed) run starts
from the same seed-dependent initial images and model initialisation each round, random
always runs, and the curve records the metric (COCO box mAP on a held-out split, from
pycocotools) against the number of labeled images. Queries are whole images; box queries
need training on partially annotated images, which is not built yet.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from taskal.adapters.torchvision_detection import TorchvisionDetectionAdapter
from taskal.data.coco import CocoDetectionPool
from taskal.evaluation import coco_map
from taskal.selector import Selector
from taskal.simulation.loop import _dataclass_from, _mix, resolve_strategies
from taskal.strategies.base import QueryStrategy
from taskal.training_det import DetTrainConfig, train_detector
from taskal.types import ItemId


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
        for label, strategy in resolve_strategies(self.strategies):
            if strategy.sampling == "ensemble" or "loss_pred" in strategy.needs:
                raise ValueError(
                    f"strategy {label!r} needs an ensemble or a loss-prediction module, which "
                    "the detection simulation does not train yet; use uncertainty, MC-dropout, "
                    "core-set, two-stage or random strategies"
                )


class DetectionSimulation:
    """Run the rounds of every (strategy, seed) on a detection pool and a test split."""

    def __init__(
        self, cfg: DetSimulationConfig, pool: CocoDetectionPool, test: CocoDetectionPool
    ) -> None:
        needed = cfg.initial + cfg.rounds * cfg.budget
        if needed > len(pool):
            raise ValueError(
                f"initial {cfg.initial} + rounds {cfg.rounds} x budget {cfg.budget} = {needed} "
                f"images, but the pool holds only {len(pool)}; lower rounds or budget"
            )
        self.cfg = cfg
        self.pool = pool
        self.test = test
        self.strategies = resolve_strategies(cfg.strategies)

    def run(self) -> list[dict[str, Any]]:
        """All runs as ``{"strategy", "seed", "curve"}`` dicts."""
        total = len(self.strategies) * len(self.cfg.seeds) * (self.cfg.rounds + 1)
        runs = []
        with tqdm(total=total, desc="simulate det", disable=not self.cfg.progress) as bar:
            for seed in self.cfg.seeds:
                for label, strategy in self.strategies:
                    bar.set_postfix_str(f"{label} seed={seed}")
                    curve = self.run_one(strategy, seed, bar)
                    runs.append({"strategy": label, "seed": seed, "curve": curve})
        return runs

    def initial_labeled(self, seed: int) -> list[ItemId]:
        g = torch.Generator().manual_seed(seed)
        rows = torch.randperm(len(self.pool), generator=g)[: self.cfg.initial]
        return [self.pool.ids[int(r)] for r in rows]

    def run_one(self, strategy: QueryStrategy, seed: int, bar: Any = None) -> list[dict[str, Any]]:
        cfg = self.cfg
        labeled = self.initial_labeled(seed)
        selector = Selector(strategy, batch_size=cfg.batch_size, progress=False)
        curve = []
        for r in range(cfg.rounds + 1):
            t0 = time.perf_counter()
            adapter = self.train(labeled, seed, r)
            train_seconds = time.perf_counter() - t0
            metric = coco_map(adapter, self.test, batch_size=cfg.batch_size)["mAP"]
            select_seconds, n_labeled = 0.0, len(labeled)
            if r < cfg.rounds:
                t1 = time.perf_counter()
                g = torch.Generator().manual_seed(_mix(seed, r, 1))
                queries = selector.select(adapter, self.pool, labeled, cfg.budget, g)
                select_seconds = time.perf_counter() - t1
                labeled = labeled + [q.item for q in queries]
            curve.append(
                {
                    "labeled": n_labeled,
                    "metric": metric,
                    "select_seconds": select_seconds,
                    "train_seconds": train_seconds,
                }
            )
            if bar is not None:
                bar.update(1)
        return curve

    def train(self, labeled: list[ItemId], seed: int, r: int) -> TorchvisionDetectionAdapter:
        """A fresh detector trained on ``labeled`` for round ``r``."""
        torch.manual_seed(_mix(seed, r, 0))
        model_cfg = copy.deepcopy(self.cfg.model)
        adapter = TorchvisionDetectionAdapter(self._num_classes(model_cfg), device=self.cfg.device)
        g = torch.Generator().manual_seed(_mix(seed, r, 2))
        train_detector(adapter, self.pool, labeled, self.cfg.train_cfg, g)
        return adapter

    def _num_classes(self, model_cfg: dict[str, Any]) -> dict[str, Any]:
        name = str(model_cfg.get("name", ""))
        background = 1 if name.startswith(("fasterrcnn", "faster_rcnn")) else 0
        model_cfg.setdefault("num_classes", len(self.pool.classes) + background)
        return model_cfg
