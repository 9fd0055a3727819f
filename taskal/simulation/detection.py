"""Multi-round active learning for detection against a ground-truth oracle (a simulation).

As for classification (:mod:`taskal.simulation.loop`): every (strategy, seed) run starts
from the same seed-dependent initial images and model initialisation each round, random
always runs, and the curve records the metric (COCO box mAP on a held-out split, from
pycocotools) against the number of labeled images and the annotation cost spent
(:class:`~taskal.export.AnnotationCost`; by default the boxes drawn).

A strategy queries whole images, or, with ``query="region"`` in its entry, boxes: each round
buys ``region_budget`` of the detector's boxes, the oracle labels every object overlapping a
queried box, and the detector trains on whole labeled images plus one crop per queried box
(:class:`~taskal.partial.PartialDetectionPool`: unlabeled pixels are never background). A box
query costs ``per_box_verified``, plus ``per_box_drawn`` for each labeled object that no
queried box matches (IoU >= 0.5), plus ``per_image`` once per image opened; a whole image
costs ``per_image`` plus ``per_box_drawn`` per object (:meth:`DetectionSimulation.annotation_cost`).
Box queries train torchvision detectors (``model``) only.

The detector is either a torchvision one (``model``, trained by
:func:`~taskal.training_det.train_detector`) or an mmdet 3.x config file (``mmdet_config``,
trained through mmengine's ``Runner`` by :func:`~taskal.training_mmdet.train_mmdet` and
scored by :class:`~taskal.adapters.MMDetAdapter`). Per strategy, the round's detector gets
what the strategy reads: a jointly trained loss-prediction module for ``llal`` (on the FPN
levels; :class:`~taskal.llal.openmmlab.LLALDetector` for mmdet), and the per-class quality on
the labeled images (:func:`~taskal.evaluation.class_quality`) for difficulty-calibrated
scores.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mmengine.config import Config
from torchvision.ops import box_iou

from taskal.adapters.mmdet_detection import MMDetAdapter
from taskal.adapters.torchvision_detection import TorchvisionDetectionAdapter
from taskal.data.coco import CocoDetectionPool
from taskal.evaluation import class_quality, coco_map
from taskal.export import AnnotationCost, queries_to_coco, write_coco_queries
from taskal.fitting import fit_mmdet
from taskal.llal.module import LossPredictionModule
from taskal.partial import PartialDetectionPool
from taskal.queries import LabelState, Query
from taskal.rounds import mix_seed
from taskal.simulation.loop import (
    _dataclass_from,
    check_round_settings,
    load_openmmlab_config,
    query_kinds,
    resolve_strategies,
    run_dir,
)
from taskal.simulation.rounds import Labeled, RoundLoop
from taskal.strategies.base import QueryStrategy
from taskal.strategies.impurity import RegionImpurity
from taskal.training import LLALConfig
from taskal.training_det import DetTrainConfig, train_detector
from taskal.training_mmdet import MMDetTrainConfig
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
            Give either ``model`` or ``mmdet_config``.
        mmdet_config: path of an mmdet 3.x config file (e.g.
            ``configs/det/retinanet_r18_synthetic.py``), trained each round by
            :func:`~taskal.training_mmdet.train_mmdet` with the config's own schedule. Its
            ``bbox_head.num_classes`` (``roi_head.bbox_head.num_classes`` for two-stage
            detectors) must be the pool's number of classes. For ``llal`` the detector trains
            inside :class:`~taskal.llal.openmmlab.LLALDetector` with its loss predictor.
        mmdet_cfg_options: entries merged into the mmdet config after loading it (as
            ``--cfg-options``: nested dicts or dotted keys), e.g. a warm-up as short as the
            simulation's rounds, ``dict(param_scheduler=[...])``.
        mmdet_train: :class:`~taskal.training_mmdet.MMDetTrainConfig` fields but
            ``work_dir`` (``max_epochs``, ``batch_size``, ``lr``, ``min_epoch_items``, ...).
        work_dir: where the Runner's runs go with ``mmdet_config``, one subfolder
            ``<strategy>_seed<s>_round<r>`` per training (the labeled COCO json, the
            resolved config and mmengine's logs); ``None``: a temporary folder per training,
            removed once the model is trained.
        train: :class:`~taskal.training_det.DetTrainConfig` fields (``model`` only).
        llal: :class:`~taskal.training.LLALConfig` fields for ``llal`` strategies.
        queries_dir: where every round's queries go as COCO json (``None``: nowhere).
        region_budget: boxes bought per round by strategies with ``query="region"``
            (required when there is one).
        annotation_cost: :class:`~taskal.export.AnnotationCost` fields; by default opening an
            image is free and a verified box costs a quarter of a drawn one, so the recorded
            cost of whole images is the boxes drawn.
        partial: :class:`~taskal.partial.PartialDetectionPool` options for box queries
            (``context``, ``min_visible``, ``min_size``).
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
    mmdet_config: str | None = None
    mmdet_cfg_options: dict[str, Any] = field(default_factory=dict)
    mmdet_train: dict[str, Any] = field(default_factory=dict)
    work_dir: str | None = None
    train: dict[str, Any] = field(default_factory=dict)
    llal: dict[str, Any] = field(default_factory=dict)
    queries_dir: str | None = None
    region_budget: float | None = None
    annotation_cost: dict[str, Any] = field(default_factory=dict)
    partial: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        check_round_settings(self)
        self._check_detector()
        self.train_cfg = _dataclass_from(DetTrainConfig, self.train, "train")
        self.llal_cfg = _dataclass_from(LLALConfig, self.llal, "al.llal")
        self.mmdet_cfg: Config | None = None
        self.mmdet_train_cfg: MMDetTrainConfig | None = None
        if self.mmdet_config is not None:
            self.mmdet_cfg = load_openmmlab_config(
                self.mmdet_config,
                self.mmdet_cfg_options,
                "mmdet_config",
                "configs/det/retinanet_r18_synthetic.py",
            )
            if "work_dir" in self.mmdet_train:
                raise ValueError(
                    "mmdet_train does not take work_dir: set work_dir beside it (each "
                    "training runs in its own subfolder of it)"
                )
            # work_dir is set per training (DetectionSimulation._run_dir)
            train = {"work_dir": ".", **self.mmdet_train}
            self.mmdet_train_cfg = _dataclass_from(MMDetTrainConfig, train, "mmdet_train")
        self.cost = _dataclass_from(
            AnnotationCost, {"per_image": 0.0, **self.annotation_cost}, "annotation_cost"
        )
        self.query_kinds = query_kinds(self.strategies, regions="boxes")
        self._check_box_queries()
        for label, strategy in resolve_strategies(self.strategies):
            if strategy.sampling == "ensemble":
                raise ValueError(
                    f"strategy {label!r} scores a deep ensemble, which the detection "
                    "simulation does not train yet; use uncertainty, MC-dropout, LLAL, "
                    "core-set, BADGE, two-stage, difficulty-calibrated or random strategies"
                )

    def _check_box_queries(self) -> None:
        """Box queries need a torchvision model and a positive ``region_budget``."""
        boxes = [label for label, kind in self.query_kinds.items() if kind == "region"]
        if not boxes:
            return
        for label, strategy in resolve_strategies(self.strategies):
            if label in boxes and isinstance(strategy, RegionImpurity):
                raise ValueError(
                    f"strategy {label!r} scores a region's class impurity, but a box is a "
                    "region of one unit (impurity 0): use entropy or bald for box queries"
                )
        if self.mmdet_config is not None:
            raise ValueError(
                f"strategies {boxes} query boxes, whose crops train torchvision detectors "
                "(model) only; an mmdet_config trains on whole images: drop query='region'"
            )
        budget = self.region_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise ValueError(
                f"strategies {boxes} query boxes: set region_budget, the boxes bought per "
                f"round (> 0), got {budget!r}"
            )
        unknown = set(self.partial) - {"context", "min_visible", "min_size"}
        if unknown:
            raise ValueError(
                f"partial does not take {sorted(unknown)}; it accepts context, min_visible, "
                "min_size"
            )

    def _check_detector(self) -> None:
        """Exactly one detector: a torchvision ``model`` or an ``mmdet_config`` file."""
        given = [name for name in ("model", "mmdet_config") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one detector, model (a MODELS config of a torchvision "
                "detector, e.g. dict(type='torchvision_detection', "
                "name='retinanet_resnet50_fpn')) or mmdet_config (an mmdet config file, e.g. "
                f"'configs/det/retinanet_r18_synthetic.py'); got {given or 'neither'}"
            )
        if self.model and "type" not in self.model:
            raise ValueError(
                "model must be a MODELS config of a torchvision detector, e.g. "
                f"dict(type='torchvision_detection', name='retinanet_resnet50_fpn'), got "
                f"{self.model!r}"
            )
        mmdet_only = ("mmdet_cfg_options", "mmdet_train", "work_dir")
        if self.model and (extra := [k for k in mmdet_only if getattr(self, k)]):
            raise ValueError(
                f"{extra} apply to an mmdet_config only; the torchvision model is trained "
                "with train"
            )
        if self.mmdet_config is not None and self.train:
            raise ValueError(
                "train configures the torchvision model's training; an mmdet_config trains "
                "with its own schedule, changed by mmdet_train (max_epochs, batch_size, lr, "
                f"min_epoch_items, ...), got train={self.train!r}"
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
        if cfg.mmdet_cfg is not None:
            _check_mmdet_classes(cfg.mmdet_cfg, list(pool.classes), str(cfg.mmdet_config))
        self.strategies = resolve_strategies(cfg.strategies)
        self.query_kinds = cfg.query_kinds
        self.select_batch_size = cfg.batch_size
        self._check_softmax_strategies()

    def _check_softmax_strategies(self) -> None:
        """BADGE reads an image-level softmax: refuse it for a sigmoid head before training."""
        badge = [n for n, s in self.strategies if "item_probs" in s.needs]
        if not badge:
            return
        if self.cfg.mmdet_cfg is not None:
            head = self.cfg.mmdet_cfg.model.get("roi_head", {}).get("bbox_head")
            head = head or self.cfg.mmdet_cfg.model.get("bbox_head", {})
            loss_cls = head.get("loss_cls", {}) if isinstance(head, Mapping) else {}
            sigmoid = bool(loss_cls.get("use_sigmoid", False)) and "roi_head" not in (
                self.cfg.mmdet_cfg.model
            )
        else:
            model_cfg = self._num_classes(copy.deepcopy(self.cfg.model))
            with torch.random.fork_rng():
                probe = TorchvisionDetectionAdapter(model_cfg, device="cpu")
            sigmoid = probe.prob_kind == "sigmoid"
        if sigmoid:
            raise ValueError(
                f"strategies {badge} need an image-level softmax, but this detector's head "
                "scores classes with sigmoids (RetinaNet, FCOS); use a two-stage detector "
                "(Faster R-CNN) or drop them (coreset is the diversity strategy that works)"
            )

    def record_queries(self, label: str, seed: int, r: int, queries: list[Query]) -> None:
        """With ``cfg.queries_dir``: the round's queries as the COCO json annotators get
        (:func:`taskal.export.queries_to_coco`), ``<label>_seed<s>_round<r>.json``."""
        if self.cfg.queries_dir is None:
            return
        name = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}_seed{seed}_round{r}.json"
        coco = queries_to_coco(queries, self.pool, round_index=r)
        write_coco_queries(Path(self.cfg.queries_dir) / name, coco, overwrite=True)

    @property
    def cost_unit(self) -> str:
        """What the recorded costs count: ``"boxes"`` (drawn) when only whole images are
        queried and opening one is free, else ``"annotation cost"``."""
        cost = self.cfg.cost
        drawn = cost.per_image == 0 and cost.per_box_drawn == 1
        if drawn and all(kind == "item" for kind in self.query_kinds.values()):
            return "boxes"
        return "annotation cost"

    def annotation_cost(self, labeled: Labeled) -> float:
        """What labeling ``labeled`` cost under ``cfg.cost``: per whole image, opening it and
        drawing its ground-truth boxes; per partially labeled image, opening it, verifying
        each queried box and drawing each labeled object no queried box matches."""
        cost = self.cfg.cost
        if isinstance(labeled, list):
            full, partial = labeled, []
        else:
            full = sorted(labeled.full, key=str)
            partial = sorted(set(labeled.boxes) - labeled.full, key=str)
        total = sum(cost.image_query(len(self.pool.target(i)["labels"])) for i in full)
        if partial:
            assert isinstance(labeled, LabelState)
            oracle = PartialDetectionPool(self.pool, labeled)
            for item in partial:
                queried = torch.tensor(labeled.boxes[item], dtype=torch.float32).reshape(-1, 4)
                objects = self.pool.target(item)["boxes"][oracle.labeled_objects(item)]
                matched = (box_iou(objects.float(), queried) >= 0.5).any(1)
                total += cost.box_query(len(queried), new_image=True)
                total += cost.per_box_drawn * int((~matched).sum())
        return float(total)

    def evaluate(self, adapter: Adapter) -> float:
        """COCO box mAP (pycocotools) on the test split."""
        return coco_map(adapter, self.test, batch_size=self.cfg.batch_size)["mAP"]

    def train(self, strategy: QueryStrategy, labeled: Labeled, seed: int, r: int) -> Adapter:
        """A fresh detector trained on ``labeled`` for round ``r`` (the same initialisation
        for every strategy), with a loss predictor or class quality where the strategy
        reads one. Partial labels train on whole labeled images and box crops."""
        if isinstance(labeled, list):
            pool: Any = self.pool
            ids = labeled
        else:
            pool = PartialDetectionPool(self.pool, labeled, **self.cfg.partial)
            # the initial images in the order item queries train them (round 0 is the same
            # model for both kinds), then the crops in pool order
            first = {item: k for k, item in enumerate(self.initial_labeled(seed))}
            ids = sorted(pool.ids, key=lambda i: first.get(i, len(first)))
        if self.cfg.mmdet_cfg is None:
            adapter: Adapter = self._train_torchvision(strategy, pool, ids, seed, r)
        else:
            adapter = self._train_mmdet(strategy, ids, seed, r)
        if "class_quality" in strategy.needs:
            size = self.cfg.batch_size
            adapter.class_quality = class_quality(adapter, pool, ids, batch_size=size)
        return adapter

    def _train_torchvision(
        self, strategy: QueryStrategy, pool: Any, labeled: list[ItemId], seed: int, r: int
    ) -> TorchvisionDetectionAdapter:
        torch.manual_seed(mix_seed(seed, r, 0))
        model_cfg = copy.deepcopy(self.cfg.model)
        adapter = TorchvisionDetectionAdapter(self._num_classes(model_cfg), device=self.cfg.device)
        llal = None
        if "loss_pred" in strategy.needs:
            infos = [f for f in adapter.feature_info if f.name == "fpn"] or adapter.feature_info
            llal = LossPredictionModule(infos, hidden=self.cfg.llal_cfg.hidden)
        g = torch.Generator().manual_seed(mix_seed(seed, r, 2))
        cfg = self.cfg
        train_detector(adapter, pool, labeled, cfg.train_cfg, g, False, llal, cfg.llal_cfg)
        return adapter

    def _train_mmdet(
        self, strategy: QueryStrategy, labeled: list[ItemId], seed: int, r: int
    ) -> MMDetAdapter:
        """The mmdet config's detector, wrapped before training so that the dropout the
        adapter adds for MC sampling is trained in, then trained by ``train_mmdet``: the
        same seed (initialisation, data order, augmentation) for every strategy."""
        cfg = self.cfg
        assert cfg.mmdet_cfg is not None and cfg.mmdet_train_cfg is not None
        init_seed = mix_seed(seed, r, 0) % 2**31  # the Runner seeds numpy: 32 bits at most
        with self._run_dir(strategy, seed, r) as work_dir:
            train_cfg = dataclasses.replace(cfg.mmdet_train_cfg, work_dir=work_dir)
            return fit_mmdet(
                cfg.mmdet_cfg,
                self.pool,
                labeled,
                train_cfg,
                init_seed,
                strategy,
                llal_cfg=cfg.llal_cfg,
                device=cfg.device,
            )

    @contextlib.contextmanager
    def _run_dir(self, strategy: QueryStrategy, seed: int, r: int) -> Iterator[Path]:
        """``<work_dir>/<strategy>_seed<seed>_round<r>``, or a temporary folder removed on exit."""
        label = next((name for name, s in self.strategies if s is strategy), "train")
        with run_dir(self.cfg.work_dir, f"{label}_seed{seed}_round{r}", "taskal_mmdet_") as d:
            yield d

    def _num_classes(self, model_cfg: dict[str, Any]) -> dict[str, Any]:
        name = str(model_cfg.get("name", model_cfg.get("arch", "")))
        background = 1 if name.startswith(("fasterrcnn", "faster_rcnn")) else 0
        model_cfg.setdefault("num_classes", len(self.pool.classes) + background)
        return model_cfg


def _check_mmdet_classes(cfg: Config, classes: Sequence[str], path: str) -> None:
    """Every box head's ``num_classes`` in the config must be the pool's number of classes."""
    model = cfg.model
    heads: list[tuple[str, Any]] = [("model.bbox_head", model.get("bbox_head"))]
    roi = (model.get("roi_head") or {}).get("bbox_head")
    if isinstance(roi, Sequence):  # a cascade: one box head per stage
        heads += [(f"model.roi_head.bbox_head[{i}]", h) for i, h in enumerate(roi)]
    else:
        heads.append(("model.roi_head.bbox_head", roi))
    for where, head in heads:
        n = head.get("num_classes") if isinstance(head, Mapping) else None
        if n is not None and n != len(classes):
            raise ValueError(
                f"mmdet_config {path!r} sets {where}.num_classes={n}, but the pool has "
                f"{len(classes)} classes {list(classes)}; set {where}.num_classes="
                f"{len(classes)} (in the config or through mmdet_cfg_options)"
            )
