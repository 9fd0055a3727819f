"""Multi-round active learning for segmentation against a ground-truth oracle.

As for the other tasks (:mod:`taskal.simulation.rounds`): the same initial images and model
initialisation per seed, random always runs, and the curve records mIoU (mean Dice beside
it) on a held-out split against the labeled pixels.

A strategy queries whole images (``budget`` per round) or, with ``query="region"`` in its
entry, regions (patches or SLIC superpixels, :class:`~taskal.adapters._segmentation.PixelRegions`):
``region_budget`` labeled pixels per round (by default as many as ``budget`` images of the
pool hold on average, so both kinds buy the same pixels each round). The oracle answers a
region with its true labels (or one class per region, ``label="dominant"``), and the model
trains on whole images whose unlabeled pixels carry 255
(:class:`~taskal.partial.PartialSegmentationPool`). The model is a torchvision segmenter
(``model``, trained by :func:`~taskal.training_seg.train_segmenter`) or an mmseg config
(``mmseg_config``, trained through mmengine's Runner by
:func:`~taskal.training_mmseg.train_mmseg`, scored by
:class:`~taskal.adapters.MMSegAdapter`). The curve's ``cost`` is the labeled pixels.
With ``reference=True`` each seed also trains one model on the whole pool: the
full-supervision mIoU that curves are read against.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from mmengine.config import Config

from taskal.adapters._segmentation import PixelRegions
from taskal.adapters.mmseg_segmentation import MMSegAdapter
from taskal.adapters.torchvision_segmentation import TorchvisionSegmentationAdapter
from taskal.evaluation.segmentation import segmentation_metrics
from taskal.fitting import fit_mmseg
from taskal.llal.module import LossPredictionModule
from taskal.partial import PartialSegmentationPool
from taskal.queries import LabelState
from taskal.rounds import mix_seed
from taskal.selector import Selector
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
from taskal.training import LLALConfig
from taskal.training_mmseg import MMSegTrainConfig
from taskal.training_seg import SegTrainConfig, train_segmenter
from taskal.types import Adapter, ItemId


@dataclass
class SegSimulationConfig:
    """The ``al`` block of a segmentation config, resolved.

    Attributes:
        strategies: registered names or config dicts (``name`` labels results, ``query=
            "region"`` asks for regions); random is added first when missing.
        initial: images labeled whole, at random, before the first round.
        budget: images bought per round by image queries.
        rounds: selection rounds.
        seeds: one run per seed and strategy.
        model: a :data:`~taskal.registry.MODELS` config of a torchvision segmenter, e.g.
            ``dict(type="small_segmenter", arch="fcn")``; ``num_classes`` comes from the data.
            Give either ``model`` or ``mmseg_config``.
        mmseg_config: path of an mmseg 1.x config file (e.g.
            ``configs/seg/unet_s5_synthetic_medical.py``), trained each round by
            :func:`~taskal.training_mmseg.train_mmseg` with the config's own schedule and
            scored by :class:`~taskal.adapters.MMSegAdapter`; its heads' ``num_classes``
            must be the pool's.
        mmseg_cfg_options: entries merged into the mmseg config after loading it.
        mmseg_train: :class:`~taskal.training_mmseg.MMSegTrainConfig` fields but
            ``work_dir`` (``max_iters``, ``batch_size``, ``lr``, ...).
        work_dir: where the Runner's runs go with ``mmseg_config`` (one subfolder per
            training); ``None``: a temporary folder per training.
        adapter: extra :class:`~taskal.adapters.TorchvisionSegmentationAdapter` arguments
            (``dropout_p``, ``mean``, ``std``, ``size_divisor``).
        regions: :class:`PixelRegions` fields (``kind``, ``patch``, ``n_segments``,
            ``compactness``); budgets count pixels.
        region_budget: labeled pixels bought per round by region queries; ``None``: the
            pixels of ``budget`` average pool images.
        region_caps: :class:`~taskal.selector.Selector` caps of region queries,
            ``max_item_share`` and ``max_class_share`` (shares of a round's budget one image,
            or one predicted class, may take).
        label: how the oracle answers a region: ``"pixels"`` or ``"dominant"``.
        reference: also train one model per seed on the whole pool (full supervision).
        train: :class:`~taskal.training_seg.SegTrainConfig` fields.
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
    mmseg_config: str | None = None
    mmseg_cfg_options: dict[str, Any] = field(default_factory=dict)
    mmseg_train: dict[str, Any] = field(default_factory=dict)
    work_dir: str | None = None
    adapter: dict[str, Any] = field(default_factory=dict)
    regions: dict[str, Any] = field(default_factory=dict)
    region_budget: float | None = None
    region_caps: dict[str, Any] = field(default_factory=dict)
    label: str = "pixels"
    reference: bool = False
    train: dict[str, Any] = field(default_factory=dict)
    llal: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        check_round_settings(self)
        if bool(self.model) == (self.mmseg_config is not None):
            raise ValueError(
                "give exactly one model: model (a MODELS config of a torchvision segmenter, "
                "e.g. dict(type='small_segmenter', arch='fcn')) or mmseg_config (an mmseg "
                f"config file); got model={self.model!r}, mmseg_config={self.mmseg_config!r}"
            )
        self.mmseg_cfg: Config | None = None
        self.mmseg_train_cfg: MMSegTrainConfig | None = None
        if self.mmseg_config is not None:
            self.mmseg_cfg = load_openmmlab_config(
                self.mmseg_config,
                self.mmseg_cfg_options,
                "mmseg_config",
                "configs/seg/unet_s5_synthetic_medical.py",
            )
            if "work_dir" in self.mmseg_train:
                raise ValueError("mmseg_train does not take work_dir: set work_dir beside it")
            train = {"work_dir": ".", **self.mmseg_train}
            self.mmseg_train_cfg = _dataclass_from(MMSegTrainConfig, train, "mmseg_train")
            if set(self.adapter) - {"dropout_p"}:
                raise ValueError(
                    f"adapter {sorted(self.adapter)}: an mmseg model takes its normalization "
                    "and padding from its data_preprocessor; only dropout_p applies"
                )
            if self.train:
                raise ValueError(
                    "train configures the torchvision model's training; an mmseg_config "
                    "trains with its own schedule, changed by mmseg_train (max_iters, "
                    f"batch_size, lr, ...), got train={self.train!r}"
                )
        elif "type" not in self.model:
            raise ValueError(
                "model must be a MODELS config of a torchvision segmenter, e.g. "
                f"dict(type='small_segmenter', arch='fcn'), got {self.model!r}"
            )
        self.pixel_regions = PixelRegions.of(self.regions)
        if self.pixel_regions.cost != "pixels":
            raise ValueError(
                "the segmentation simulation counts labeled pixels; regions.cost='clicks' "
                "changes what a budget counts, which its curves cannot compare with images"
            )
        budget = self.region_budget
        if budget is not None and (isinstance(budget, bool) or not budget > 0):
            raise ValueError(f"region_budget must be > 0 pixels or None, got {budget!r}")
        if self.label not in ("pixels", "dominant"):
            raise ValueError(f"label must be 'pixels' or 'dominant', got {self.label!r}")
        self.train_cfg = _dataclass_from(SegTrainConfig, self.train, "train")
        self.llal_cfg = _dataclass_from(LLALConfig, self.llal, "al.llal")
        self.query_kinds = query_kinds(self.strategies, regions="patches or superpixels")
        unknown = set(self.region_caps) - {"max_item_share", "max_class_share"}
        if unknown:
            raise ValueError(
                f"region_caps does not take {sorted(unknown)}; it accepts max_item_share and "
                "max_class_share"
            )
        Selector("random", query="region", **self.region_caps)  # checks the shares
        for label, strategy in resolve_strategies(self.strategies):
            if strategy.sampling == "ensemble":
                raise ValueError(
                    f"strategy {label!r} scores a deep ensemble, which the segmentation "
                    "simulation does not train; use uncertainty, MC-dropout, LLAL, core-set, "
                    "BADGE, two-stage or random strategies"
                )


class SegmentationSimulation(RoundLoop):
    """Run the rounds of every (strategy, seed) on a segmentation pool and a test split.

    ``pool`` and ``test`` give ``ids``, ``classes``, ``take``, ``batches`` and
    ``num_pixels(item)`` (:class:`~taskal.data.SegmentationPool`).
    """

    desc = "simulate seg"

    def __init__(self, cfg: SegSimulationConfig, pool: Any, test: Any) -> None:
        self.cfg = cfg
        self.pool = pool
        self.test = test
        self.check_pool_size()
        self.strategies = resolve_strategies(cfg.strategies)
        self.query_kinds = cfg.query_kinds
        self.region_options = dict(cfg.region_caps)
        self.select_batch_size = cfg.batch_size
        self.pixels = {i: int(pool.num_pixels(i)) for i in pool.ids}
        average = sum(self.pixels.values()) / len(self.pixels)
        self._region_budget = cfg.region_budget or cfg.budget * average
        if cfg.mmseg_cfg is not None and not hasattr(pool, "img_dir"):
            raise ValueError(
                "an mmseg_config trains from image and mask files (a segmentation folder); "
                f"this pool is a {type(pool).__name__}: use a torchvision model for it"
            )
        self.cost_unit = "pixels"

    @property
    def region_budget(self) -> float:
        """Labeled pixels region-query runs buy per round (``cfg.region_budget``, or
        ``budget`` average images' worth)."""
        return float(self._region_budget)

    @property
    def total_pixels(self) -> int:
        """The labeled pixels of the whole pool."""
        return sum(self.pixels.values())

    def annotation_cost(self, labeled: Labeled) -> float:
        """Labeled pixels: whole images' pixels, plus the labeled regions' pixels."""
        if isinstance(labeled, list):
            return float(sum(self.pixels[i] for i in labeled))
        cost = sum(self.pixels[i] for i in labeled.full)
        partial = sorted(set(labeled.partial) - labeled.full, key=str)
        if partial:
            answers = self._partial_pool(labeled)
            cost += sum(answers.labeled_pixels(i) for i in partial)
        return float(cost)

    def evaluate(self, adapter: Adapter) -> float:
        """mIoU on the test split (its mean Dice is recorded beside it)."""
        self._last = self.metrics(adapter)
        return self._last["mIoU"]

    def extra_metrics(self) -> dict[str, float]:
        return {"mDice": float(self._last["mDice"])}

    def metrics(self, adapter: Adapter) -> dict[str, Any]:
        return segmentation_metrics(adapter, self.test, batch_size=self.cfg.batch_size)

    def train(self, strategy: QueryStrategy, labeled: Labeled, seed: int, r: int) -> Adapter:
        """A fresh model trained on ``labeled`` for round ``r`` (the same initialisation
        for every strategy); partial labels train with unlabeled pixels ignored."""
        if isinstance(labeled, list):
            pool: Any = self.pool
            ids = labeled
        else:
            pool = self._partial_pool(labeled)
            first = {item: k for k, item in enumerate(self.initial_labeled(seed))}
            ids = sorted(pool.ids, key=lambda i: first.get(i, len(first)))
        return self._fit(strategy, pool, ids, seed, r)

    def reference_runs(self) -> list[dict[str, Any]]:
        """Per seed: a model trained on the whole pool, its mIoU and mean Dice."""
        runs = []
        for seed in self.cfg.seeds:
            adapter = self._fit(None, self.pool, list(self.pool.ids), seed, 0)
            scores = self.metrics(adapter)
            runs.append({"seed": seed, "mIoU": scores["mIoU"], "mDice": scores["mDice"]})
        return runs

    def _fit(
        self, strategy: QueryStrategy | None, pool: Any, ids: list[ItemId], seed: int, r: int
    ) -> Adapter:
        if self.cfg.mmseg_cfg is not None:
            return self._fit_mmseg(strategy, pool, ids, seed, r)
        cfg = self.cfg
        torch.manual_seed(mix_seed(seed, r, 0))
        model_cfg = {"num_classes": len(self.pool.classes), **copy.deepcopy(cfg.model)}
        adapter = TorchvisionSegmentationAdapter(
            model_cfg, regions=cfg.pixel_regions, device=cfg.device, **cfg.adapter
        )
        llal = None
        if strategy is not None and "loss_pred" in strategy.needs:
            llal = LossPredictionModule(adapter.feature_info, hidden=cfg.llal_cfg.hidden)
        g = torch.Generator().manual_seed(mix_seed(seed, r, 2))
        train_segmenter(adapter, pool, ids, cfg.train_cfg, g, False, llal, cfg.llal_cfg)
        return adapter

    def _fit_mmseg(
        self, strategy: QueryStrategy | None, pool: Any, ids: list[ItemId], seed: int, r: int
    ) -> MMSegAdapter:
        """The mmseg config's segmentor, wrapped first (the adapter's dropout is trained in),
        then trained by ``train_mmseg`` with the same seed for every strategy."""
        cfg = self.cfg
        assert cfg.mmseg_cfg is not None and cfg.mmseg_train_cfg is not None
        init_seed = mix_seed(seed, r, 0) % 2**31  # the Runner seeds numpy: 32 bits at most
        label = "reference" if strategy is None else self._label(strategy)
        with run_dir(cfg.work_dir, f"{label}_seed{seed}_round{r}", "taskal_mmseg_") as work:
            train_cfg = dataclasses.replace(cfg.mmseg_train_cfg, work_dir=str(work))
            return fit_mmseg(
                cfg.mmseg_cfg,
                pool,
                ids,
                train_cfg,
                init_seed,
                strategy,
                regions=cfg.pixel_regions,
                adapter_kwargs=cfg.adapter,
                llal_cfg=cfg.llal_cfg,
                device=cfg.device,
            )

    def _label(self, strategy: QueryStrategy) -> str:
        return next((name for name, s in self.strategies if s is strategy), "train")

    def _partial_pool(self, state: LabelState) -> PartialSegmentationPool:
        return PartialSegmentationPool(self.pool, state, self.cfg.pixel_regions, self.cfg.label)


__all__ = ["SegSimulationConfig", "SegmentationSimulation"]
