"""Supervised training of a torchvision detector (Faster R-CNN, RetinaNet, FCOS) in place.

The recipe follows torchvision's detection references (``references/detection/train.py``):
SGD with momentum 0.9 and weight decay 1e-4, a linear warm-up from ``lr / 1000``, and the sum
of the model's loss dict as the objective. Images without boxes stay in: torchvision trains
them as background. mmdet models train through mmengine's Runner instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from taskal.adapters.torchvision_detection import TorchvisionDetectionAdapter
from taskal.functional.llal import loss_ranking_loss
from taskal.llal.module import LossPredictionModule
from taskal.training import LLALConfig
from taskal.types import Batch, ItemId

#: the warm-up starts at ``lr * WARMUP_FACTOR`` (torchvision's references: 1/1000).
WARMUP_FACTOR = 1e-3


class DetectionPool(Protocol):
    """What :func:`train_detector` reads from a pool (a :class:`~taskal.data.CocoDetectionPool`)."""

    ids: list[ItemId]

    def take(self, ids: Sequence[ItemId]) -> Batch: ...


@dataclass
class DetTrainConfig:
    """How a torchvision detector is trained on the labeled images each round (the same
    SGD recipe trains torchvision segmenters, :class:`~taskal.training_seg.SegTrainConfig`).

    Attributes:
        epochs: passes over the (resampled) labeled set.
        batch_size: images per SGD step (1 is allowed: detection BatchNorm sees H x W values).
        lr: SGD learning rate after warm-up: torchvision's references use 0.02 for 16 images
            per step, and the default is that scaled linearly to 4; scale it with
            ``batch_size``.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        warmup_iters: steps of linear warm-up from ``lr / 1000`` to ``lr`` (0 = none).
        min_epoch_items: an epoch draws at least this many images (with repetition), so a
            10-image labeled set gets as many steps as a 100-image one.
        max_grad_norm: clip the gradients' global L2 norm to this before each step (mmdet's
            FCOS configs use 35); ``None`` clips nothing, as torchvision's references.
    """

    epochs: int = 12
    batch_size: int = 4
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    min_epoch_items: int = 64
    max_grad_norm: float | None = None

    #: the config block named in error messages.
    where: ClassVar[str] = "det_train"

    def __post_init__(self) -> None:
        w = self.where
        if self.epochs < 1:
            raise ValueError(f"{w}.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"{w}.batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"{w}.lr must be a finite number > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"{w}.momentum must lie in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise ValueError(f"{w}.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_iters < 0:
            raise ValueError(f"{w}.warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.min_epoch_items < 0:
            raise ValueError(f"{w}.min_epoch_items must be >= 0, got {self.min_epoch_items}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"{w}.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")


def train_detector(
    adapter: TorchvisionDetectionAdapter,
    pool: DetectionPool,
    labeled_ids: Sequence[ItemId],
    cfg: DetTrainConfig,
    generator: torch.Generator,
    progress: bool = False,
    llal: LossPredictionModule | None = None,
    llal_cfg: LLALConfig | None = None,
) -> dict[str, float]:
    """Train ``adapter.model`` on the labeled images of ``pool`` in place.

    With ``llal`` a loss-prediction module (Learning Loss, Yoo & Kweon 2019) on the
    adapter's feature layers is trained jointly: the detector's step is unchanged, the
    module reads the layers captured in its forward, its target is each image's detection
    loss (the sum of the model's loss dict, from ``adapter.per_sample_loss``: one extra
    forward per image without gradient), and its ranking loss is added with weight
    ``llal_cfg.weight``; after ``llal_cfg.stop_grad_fraction`` of the epochs it no longer
    back-propagates into the detector. The trained module is attached to the adapter for
    the ``llal`` strategy.

    Each epoch draws ``max(len(labeled_ids), cfg.min_epoch_items)`` images: whole shuffles
    of the labeled set drawn with ``generator``, cut to length. Labels are the pool's
    ``0..C-1`` (shifted past Faster R-CNN's background class 0 by the adapter's targets).
    The model's own randomness (Faster R-CNN's RoI sampling, dropout) draws from torch's
    global RNG: the same ``generator`` seed and the same ``torch.manual_seed`` give the same
    weights. The model is left in eval mode, also when training fails.

    Returns:
        the last epoch's mean of every loss in the model's loss dict, plus ``"loss"``
        (their sum, the objective).

    Raises:
        ValueError: an empty labeled set, ids that are not in ``pool``, or labels outside
            the detector's classes.
        FloatingPointError: a non-finite loss (training stops; lower ``cfg.lr``).
    """
    ids = check_labeled_ids(pool, labeled_ids)
    device = next(adapter.model.parameters()).device

    def step(batch: Batch, optim: Any, epoch: int, detach: bool) -> dict[str, float]:
        if llal is None:
            return _step(adapter, batch, device, optim, epoch, cfg)
        assert llal_cfg is not None
        return _llal_step(adapter, batch, optim, epoch, cfg, llal, llal_cfg, detach)

    llal_cfg = llal_cfg or LLALConfig()
    return run_sgd(adapter, pool, ids, cfg, generator, step, "train det", progress, llal, llal_cfg)


def run_sgd(
    adapter: Any,
    pool: DetectionPool,
    ids: list[ItemId],
    cfg: DetTrainConfig,
    generator: torch.Generator,
    step: Callable[[Batch, Any, int, bool], dict[str, float]],
    desc: str,
    progress: bool,
    llal: LossPredictionModule | None,
    llal_cfg: LLALConfig,
    min_batch: int = 1,
    prepare: Callable[[Batch], Batch] | None = None,
) -> dict[str, float]:
    """The epochs every torchvision training runs: SGD with warm-up over
    :func:`epoch_batches`, ``step(batch, optim, epoch, detach)`` per batch (``detach``:
    LLAL's gradient stopped), optionally ``prepare`` on each batch (augmentation); the
    model (and the loss predictor) left in eval mode, the predictor attached after.

    Returns:
        the last epoch's mean of every loss ``step`` reports.
    """
    model = adapter.model
    params = [p for p in model.parameters() if p.requires_grad]
    if llal is not None:
        llal.to(next(model.parameters()).device).train()
        params += list(llal.parameters())
    stop_epoch = llal_cfg.stop_grad_epoch(cfg.epochs)
    optim, warmup = sgd_with_warmup(params, cfg)
    stats: dict[str, float] = {}
    model.train()
    try:
        for epoch in tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False):
            totals: dict[str, float] = {}
            steps = 0
            for part in epoch_batches(ids, cfg, generator, min_batch):
                batch = pool.take(part)
                if prepare is not None:
                    batch = prepare(batch)
                losses = step(batch, optim, epoch, epoch >= stop_epoch)
                warmup.step()
                for name, value in losses.items():
                    totals[name] = totals.get(name, 0.0) + value
                steps += 1
            stats = {k: v / steps for k, v in totals.items()}
    finally:
        model.eval()
        if llal is not None:
            llal.eval()
    if llal is not None:
        adapter.attach_loss_predictor(llal)
    return stats


def sgd_with_warmup(
    params: list[Any], cfg: DetTrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD with ``cfg``'s lr, momentum and weight decay, and its linear warm-up (step the
    scheduler once per batch)."""
    optim = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return optim, torch.optim.lr_scheduler.LambdaLR(optim, lambda s: warmup_factor(s, cfg))


def epoch_batches(
    ids: Sequence[ItemId], cfg: DetTrainConfig, generator: torch.Generator, min_batch: int = 1
) -> Iterator[list[ItemId]]:
    """One epoch's batches of ids: ``max(len(ids), cfg.min_epoch_items)`` items, whole
    shuffles of ``ids`` drawn with ``generator`` and cut to length, ``cfg.batch_size`` a
    batch; a last batch under ``min_batch`` items joins the one before it (BatchNorm after
    a global pool, as in DeepLabV3's ASPP, cannot train on one image)."""
    n = len(ids)
    per_epoch = max(n, cfg.min_epoch_items)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-per_epoch // n))])
    order = order[:per_epoch]
    starts = list(range(0, per_epoch, cfg.batch_size))
    if len(starts) > 1 and per_epoch - starts[-1] < min_batch:
        starts.pop()
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else per_epoch
        yield [ids[int(i)] for i in order[start:end]]


def check_labeled_ids(
    pool: DetectionPool, labeled_ids: Sequence[ItemId], who: str = "train_detector"
) -> list[ItemId]:
    """``labeled_ids`` as a list, after checking it names distinct items of ``pool``."""
    ids = list(labeled_ids)
    if not ids:
        raise ValueError(f"{who} needs at least one labeled image, got none")
    known = set(pool.ids)
    missing = [i for i in ids if i not in known]
    if missing:
        raise ValueError(
            f"{len(missing)} labeled ids are not items of the pool, e.g. {missing[:3]}; pass "
            "ids from pool.ids"
        )
    if len(set(ids)) != len(ids):
        raise ValueError("labeled ids repeat; pass each labeled image once")
    return ids


def warmup_factor(step: int, cfg: DetTrainConfig) -> float:
    """The lr multiplier at ``step``: linear from ``WARMUP_FACTOR`` to 1 over the warm-up."""
    if step >= cfg.warmup_iters:
        return 1.0
    alpha = step / cfg.warmup_iters
    return WARMUP_FACTOR * (1 - alpha) + alpha


def _step(
    adapter: TorchvisionDetectionAdapter,
    batch: Batch,
    device: torch.device,
    optim: torch.optim.Optimizer,
    epoch: int,
    cfg: DetTrainConfig,
) -> dict[str, float]:
    """One SGD step on ``batch``; returns the step's losses by name and their sum ``loss``."""
    images = [x.to(device) for x in batch.inputs]
    targets = adapter.model_targets(batch)
    _check_labels(adapter, batch, targets)
    loss_dict: dict[str, Tensor] = adapter.model(images, targets)
    loss = torch.stack([v.float() for v in loss_dict.values()]).sum()
    _check_finite(loss, loss_dict, batch, epoch, optim)
    backward_step(loss, optim, cfg)
    out = {k: float(v.detach()) for k, v in loss_dict.items()}
    out["loss"] = float(loss.detach())
    return out


def _llal_step(
    adapter: TorchvisionDetectionAdapter,
    batch: Batch,
    optim: torch.optim.Optimizer,
    epoch: int,
    cfg: DetTrainConfig,
    llal: LossPredictionModule,
    llal_cfg: LLALConfig,
    detach: bool,
) -> dict[str, float]:
    """One SGD step with the loss-prediction module.

    The detector trains exactly as in :func:`_step` (one batched forward, its batch loss);
    the module reads the feature layers captured in that forward and is ranked against
    each image's loss from :meth:`~TorchvisionDetectionAdapter.per_sample_loss` (no
    gradient, BatchNorm in eval, the RoI sampling seeded apart from the global RNG), so
    only the ranking loss's gradient tells an LLAL-trained detector from another.
    """
    device = next(adapter.model.parameters()).device
    images = [x.to(device) for x in batch.inputs]
    targets = adapter.model_targets(batch)
    _check_labels(adapter, batch, targets)
    with adapter.capture_features(llal.layers) as feats:
        loss_dict: dict[str, Tensor] = adapter.model(images, targets)
    loss = torch.stack([v.float() for v in loss_dict.values()]).sum()
    _check_finite(loss, loss_dict, batch, epoch, optim)
    target_B = adapter.per_sample_loss(batch)
    rank = loss_ranking_loss(llal(feats, detach=detach), target_B, llal_cfg.margin)
    backward_step(loss + llal_cfg.weight * rank, optim, cfg)
    out = {k: float(v.detach()) for k, v in loss_dict.items()}
    return {**out, "loss": float(loss.detach()), "llal_loss": float(rank.detach())}


def _check_finite(
    loss: Tensor, loss_dict: dict[str, Tensor], batch: Batch, epoch: int, optim: Any
) -> None:
    if not torch.isfinite(loss):
        parts = {k: float(v.detach()) for k, v in loss_dict.items()}
        raise FloatingPointError(
            f"the detection loss became {float(loss.detach())} in epoch {epoch} ({parts}) on "
            f"items {list(batch.ids)}; training stopped: lower DetTrainConfig.lr (now "
            f"{optim.param_groups[0]['lr']:.3g} after warm-up scaling), lengthen warmup_iters "
            "or set max_grad_norm"
        )


def backward_step(loss: Tensor, optim: torch.optim.Optimizer, cfg: DetTrainConfig) -> None:
    optim.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.max_grad_norm is not None:
        params = [p for group in optim.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optim.step()


def _check_labels(
    adapter: TorchvisionDetectionAdapter,
    batch: Batch,
    targets: list[dict[str, Any]],
) -> None:
    """Labels the detector can learn, with a fix in the message (an index error otherwise)."""
    first_label = 0 if adapter.background is None else 1
    for item, target in zip(batch.ids, targets, strict=True):
        labels = target["labels"]
        if labels.numel() and int(labels.max()) >= adapter.num_classes:
            hint = (
                "Faster R-CNN's class 0 is the background: build it with C + 1 classes"
                if first_label
                else "build the detector with as many classes as the pool has"
            )
            raise ValueError(
                f"item {item!r} has label {int(labels.max()) - first_label} but the detector "
                f"has {adapter.num_classes} classes; {hint}"
            )


__all__ = [
    "DetTrainConfig",
    "backward_step",
    "check_labeled_ids",
    "epoch_batches",
    "run_sgd",
    "sgd_with_warmup",
    "train_detector",
    "warmup_factor",
]
