"""Small pieces every task's campaign kit uses."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from taskal.campaign.store import CampaignError
from taskal.selector import build_strategy
from taskal.strategies.base import QueryStrategy

#: the end of every import error: a refused import records nothing
NOTHING = "; nothing was imported"
#: the longest side of a report's gallery picture
GALLERY_SIDE = 256


def innermost(dataset: Any) -> dict[str, Any]:
    """The dataset config inside OpenMMLab's wrappers (``RepeatDataset`` and the like)."""
    while isinstance(dataset, Mapping) and "dataset" in dataset:
        dataset = dataset["dataset"]
    return dict(dataset or {})


def train_dataset(cfg: Any) -> dict[str, Any]:
    """An OpenMMLab config's training dataset, unwrapped."""
    loader = cfg.get("train_dataloader") or {}
    return innermost(loader.get("dataset"))


def config_classes(cfg: Any) -> list[str]:
    """An mmdet or mmseg config's class names: ``classes``, or its training dataset's
    ``metainfo.classes``."""
    names = cfg.get("classes") or train_dataset(cfg).get("metainfo", {}).get("classes")
    if not names:
        raise CampaignError(
            "the config names no classes: set classes = (...) or "
            "train_dataloader.dataset.metainfo.classes"
        )
    return [str(c) for c in names]


def settings_of(cls: Any, values: Mapping[str, Any], where: str) -> Any:
    """``cls(**values)``, its errors as one-line :class:`CampaignError` s."""
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise CampaignError(f"{where}: {err}") from None


def refuse_ensembles(spec: Any) -> None:
    """Refuse a deep-ensemble strategy before a round starts: a campaign trains one model (a
    strategy that does not build is the round's to report)."""
    try:
        strategy = build_strategy(spec)
    except (KeyError, ValueError, TypeError):
        return
    check_single_model(strategy)


def check_single_model(strategy: QueryStrategy) -> None:
    """Refuse a strategy that scores a deep ensemble: a campaign trains one model."""
    if strategy.sampling == "ensemble":
        raise CampaignError(
            f"{type(strategy).__name__} scores a deep ensemble, which campaigns do not support; "
            "choose a single-model strategy (entropy, bald with MC dropout, coreset, llal ...)"
        )


def finite(x: float) -> float:
    """``x``, or 0 for a missing score (NaN) where a number must be shown."""
    return float(x) if np.isfinite(x) else 0.0


def read_json(path: Path, expected: str) -> Any:
    """The JSON in file ``path``; ``expected`` says what the file should be."""
    if not path.is_file():
        raise CampaignError(f"{path}: give {expected} (a file){NOTHING}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CampaignError(f"{path} is not JSON ({err}){NOTHING}") from None


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file."""
    with Image.open(path) as image:
        return int(image.width), int(image.height)


def picture(path: Path) -> tuple[np.ndarray, float]:
    """An RGB picture of at most :data:`GALLERY_SIDE` pixels a side, and its scale."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    scale = min(1.0, GALLERY_SIDE / max(image.width, image.height))
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8), scale
