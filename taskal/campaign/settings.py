"""The ``al`` block of a campaign config (``tools/al_round.py CONFIG``), checked when read.

An OpenMMLab config (inheriting an upstream one unmodified, with data and sizes overridden)
plus::

    al = dict(
        pool=dict(img_dir="data/unlabeled"),  # the images to select from (required)
        strategy="entropy",                   # a registered strategy name or config dict
        budget=8,                             # per round: items, or annotation cost for regions
        query="item",                         # or "region" (superpixels, patches, boxes)
        seed=0,
        stop_set=16,                          # unlabeled items kept for the stopping signal
    )

The labeled items the campaign starts with come from the config's training data
(``train_dataloader.dataset``) for mmdet and mmseg, or from ``al.labeled`` for classifiers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmengine.config import Config

from taskal.campaign.store import CampaignError

TASKS = ("cls", "det", "seg")


@dataclass
class CampaignSettings:
    """The resolved ``al`` block.

    Attributes:
        pool: where the unlabeled images are: ``img_dir`` (a folder, searched recursively).
        strategy: a registered strategy name or config dict (see ``taskal.strategies``).
        budget: what a round buys: items (``query="item"``) or annotation cost (regions).
        query: ``"item"`` (whole images) or ``"region"``.
        seed: seeds training (with ``--train``), the stop set and selection's tie breaks.
        stop_set: unlabeled items drawn once, never queried, whose predictions tell when
            successive models stop changing (the stopping signal).
        batch_size: images per forward while scoring.
        device: where models run while scoring.
        task: ``cls``, ``det`` or ``seg``; ``None`` infers it from ``default_scope``.
        labeled: classification only: the labeled images, ``root`` in ImageFolder layout.
        eval: labeled images to measure each round's model on (optional; see the task).
        regions: the region kind for ``query="region"`` (segmentation: ``PixelRegions``).
        region_caps: ``max_item_share`` / ``max_class_share`` for region queries.
        train: the task's training settings (``mmseg_train`` / ``mmdet_train`` fields, or
            classification ``TrainConfig`` fields); the config's own schedule otherwise.
        adapter: extra adapter arguments.
        llal: ``LLALConfig`` fields, for strategies that read predicted losses.
        gallery: top queries drawn in the report.
        image_size: classification only: the ``(H, W)`` images are resized to.
        image_url: what Label Studio tasks put before an image's key to show it (e.g.
            ``"/data/local-files/?d=pool/"``); ``None``: the file's absolute path.
    """

    pool: dict[str, Any]
    strategy: Any = "entropy"
    budget: float = 8
    query: str = "item"
    seed: int = 0
    stop_set: int = 16
    batch_size: int = 16
    device: str = "cpu"
    task: str | None = None
    labeled: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    regions: dict[str, Any] | None = None
    region_caps: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=dict)
    llal: dict[str, Any] = field(default_factory=dict)
    gallery: int = 8
    image_size: tuple[int, int] | None = None
    image_url: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pool, dict) or "img_dir" not in self.pool:
            raise CampaignError("al.pool must be a dict with img_dir, the unlabeled images' folder")
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise CampaignError(f"the budget must be a number, got {self.budget!r}")
        if not (math.isfinite(self.budget) and self.budget > 0):
            raise CampaignError(f"the budget must be > 0, got {self.budget}")
        if self.query == "item" and self.budget != int(self.budget):
            raise CampaignError(f"an item budget counts images: a whole number, got {self.budget}")
        if self.query not in ("item", "region"):
            raise CampaignError(f"al.query must be 'item' or 'region', got {self.query!r}")
        if self.task is not None and self.task not in TASKS:
            raise CampaignError(f"al.task must be one of {TASKS}, got {self.task!r}")
        for name in ("seed", "stop_set", "batch_size", "gallery"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CampaignError(f"al.{name} must be an int >= 0, got {value!r}")
        if self.batch_size < 1:
            raise CampaignError("al.batch_size must be >= 1")
        if self.image_size is not None:
            self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    @classmethod
    def from_config(cls, al: Any) -> CampaignSettings:
        if not isinstance(al, dict):
            raise CampaignError(
                "the config has no `al` block: add al = dict(pool=dict(img_dir=...), "
                "strategy=..., budget=...) (see configs/campaign/)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(al) - names)
        if unknown:
            raise CampaignError(f"unknown al setting(s) {unknown}; known: {sorted(names)}")
        try:
            return cls(**{k: plain(v) for k, v in al.items()})
        except TypeError as err:
            raise CampaignError(f"the al block is incomplete: {err}") from None


def load_campaign_config(
    path: str | Path,
    cfg_options: Mapping[str, Any] | None = None,
    budget: float | None = None,
    strategy: str | None = None,
) -> Config:
    """``Config.fromfile(path)`` with ``cfg_options`` merged and the command line's budget
    and strategy put into its ``al`` block.

    Raises:
        CampaignError: no such file, no ``al`` block, or a budget <= 0.
    """
    if not Path(path).is_file():
        raise CampaignError(f"config {path} does not exist")
    cfg = Config.fromfile(str(path))
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    if not isinstance(cfg.get("al"), dict):
        raise CampaignError(
            f"{path} has no `al` block: add al = dict(pool=dict(img_dir=...), strategy=..., "
            "budget=...) (see configs/campaign/)"
        )
    if budget is not None:
        if not budget > 0:
            raise CampaignError(f"--budget must be > 0, got {budget:g}")
        cfg.al.budget = int(budget) if float(budget).is_integer() else budget
    if strategy is not None:
        cfg.al.strategy = strategy
    return cfg


def plain(value: Any) -> Any:
    """ConfigDicts as plain dicts, recursively (lists and tuples keep their type)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


__all__ = ["TASKS", "CampaignSettings", "load_campaign_config", "plain"]
