"""Build a model's adapter and train it on a round's labeled items: the step a simulation and
a label campaign (``tools/al_round.py``) share, so that what one measures the other runs.

The adapter is built first and its model trained in place, so the dropout it injects for MC
sampling is trained in; a strategy that reads predicted losses gets the model wrapped in
its LLAL module, trained jointly and attached to the adapter afterwards.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from torch import nn

from taskal.adapters._segmentation import PixelRegions
from taskal.adapters.mmdet_detection import MMDetAdapter
from taskal.adapters.mmseg_segmentation import MMSegAdapter
from taskal.llal.module import LossPredictionModule
from taskal.llal.openmmlab import LLALDetector, LLALSegmentor, LLALStopGradHook
from taskal.strategies.base import QueryStrategy
from taskal.training import LLALConfig, TrainConfig, train_classifier
from taskal.training_mmdet import MMDetTrainConfig, train_mmdet
from taskal.training_mmseg import MMSegTrainConfig, train_mmseg
from taskal.types import Adapter, Batch, ItemId


def _llal(strategy: QueryStrategy | None) -> bool:
    return strategy is not None and "loss_pred" in strategy.needs


def fit_classifier(
    make_adapter: Callable[[], Adapter],
    labeled: Batch,
    train_cfg: TrainConfig,
    init_seed: int,
    data_seed: int,
    strategy: QueryStrategy | None = None,
    llal_cfg: LLALConfig | None = None,
) -> Adapter:
    """The adapter ``make_adapter()`` builds (after ``torch.manual_seed(init_seed)``, so the
    model's initialisation follows the seed) trained by :func:`train_classifier` on
    ``labeled``, its data order drawn from ``data_seed``."""
    torch.manual_seed(init_seed)
    adapter = make_adapter()
    llal = None
    if _llal(strategy):
        llal_cfg = llal_cfg or LLALConfig()
        llal = LossPredictionModule(adapter.feature_info, hidden=llal_cfg.hidden)
    g = torch.Generator().manual_seed(data_seed)
    train_classifier(adapter, labeled, train_cfg, g, llal, llal_cfg)
    return adapter


def fit_mmseg(
    cfg: Config,
    pool: Any,
    ids: Sequence[ItemId],
    train_cfg: MMSegTrainConfig,
    seed: int,
    strategy: QueryStrategy | None = None,
    *,
    regions: PixelRegions | None = None,
    adapter_kwargs: Mapping[str, Any] | None = None,
    llal_cfg: LLALConfig | None = None,
    device: str = "cpu",
) -> MMSegAdapter:
    """An :class:`MMSegAdapter` over ``cfg.model`` trained by :func:`train_mmseg`.

    ``seed`` (below 2**31: the Runner seeds numpy) seeds the initialisation, the data order
    and augmentation. Training writes under ``train_cfg.work_dir``.
    """
    torch.manual_seed(seed)
    adapter = MMSegAdapter(
        copy.deepcopy(dict(cfg.model)), regions=regions, device=device, **dict(adapter_kwargs or {})
    )
    model: nn.Module = adapter.model
    hooks: list[Hook] = []
    if _llal(strategy):  # the segmentor and its loss predictor, jointly, per image
        llal_cfg = llal_cfg or LLALConfig()
        model = LLALSegmentor(adapter.model, hidden=llal_cfg.hidden)
        model.weight, model.margin = llal_cfg.weight, llal_cfg.margin
        hooks.append(LLALStopGradHook(llal_cfg.stop_grad_fraction))
    train_mmseg(cfg, pool, ids, train_cfg, seed, model, hooks)
    model.to(torch.device(device))  # the Runner trains on the GPU when there is one
    if isinstance(model, LLALSegmentor):
        adapter.attach_loss_predictor(model.loss_predictor)
    return adapter


def fit_mmdet(
    cfg: Config,
    pool: Any,
    ids: Sequence[ItemId],
    train_cfg: MMDetTrainConfig,
    seed: int,
    strategy: QueryStrategy | None = None,
    *,
    adapter_kwargs: Mapping[str, Any] | None = None,
    llal_cfg: LLALConfig | None = None,
    device: str = "cpu",
) -> MMDetAdapter:
    """An :class:`MMDetAdapter` over ``cfg.model`` trained by :func:`train_mmdet` (see
    :func:`fit_mmseg` for ``seed``)."""
    torch.manual_seed(seed)
    adapter = MMDetAdapter(
        copy.deepcopy(dict(cfg.model)), device=device, **dict(adapter_kwargs or {})
    )
    model: nn.Module = adapter.model
    hooks: list[Hook] = []
    if _llal(strategy):
        llal_cfg = llal_cfg or LLALConfig()
        model = LLALDetector(adapter.model, hidden=llal_cfg.hidden)
        model.weight, model.margin = llal_cfg.weight, llal_cfg.margin
        hooks.append(LLALStopGradHook(llal_cfg.stop_grad_fraction))
    train_mmdet(cfg, pool, ids, train_cfg, seed, model, hooks)
    model.to(torch.device(device))
    if isinstance(model, LLALDetector):
        adapter.attach_loss_predictor(model.loss_predictor)
    return adapter


__all__ = ["fit_classifier", "fit_mmdet", "fit_mmseg"]
