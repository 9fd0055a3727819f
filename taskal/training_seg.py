"""Supervised training of a torchvision segmentation model from full or partial labels.

Labels are ``gt_sem_seg`` maps in which 255 marks an unlabeled pixel: a partially labeled
image (only its queried regions labeled, :class:`~taskal.partial.PartialSegmentationPool`)
trains exactly like a full one, its unlabeled pixels adding nothing to the loss or its
gradient. The objective is the cross-entropy averaged over the batch's labeled pixels
(plus 0.5 x the auxiliary classifier's, as torchvision's references weight it, when the
model has one). The recipe is the detectors' (:class:`~taskal.training_det.DetTrainConfig`):
SGD with momentum, linear warm-up, epochs of at least ``min_epoch_items`` images, with a
random horizontal flip per image. mmseg models train through mmengine's Runner instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from taskal.adapters.torchvision_segmentation import IGNORE_INDEX, TorchvisionSegmentationAdapter
from taskal.functional.llal import loss_ranking_loss
from taskal.llal.module import LossPredictionModule
from taskal.training import LLALConfig
from taskal.training_det import (
    DetectionPool,
    DetTrainConfig,
    backward_step,
    check_labeled_ids,
    run_sgd,
)
from taskal.types import Batch, ItemId

#: the auxiliary classifier's loss weight (torchvision's segmentation references).
AUX_WEIGHT = 0.5


@dataclass
class SegTrainConfig(DetTrainConfig):
    """How a torchvision segmenter is trained each round: :class:`DetTrainConfig`'s fields
    (SGD, warm-up, ``min_epoch_items``, ``max_grad_norm``), plus:

    Attributes:
        flip: flip each training image (and its labels) left-right with probability 0.5.
    """

    epochs: int = 20
    lr: float = 0.01
    warmup_iters: int = 20
    flip: bool = True

    where: ClassVar[str] = "seg_train"


def train_segmenter(
    adapter: TorchvisionSegmentationAdapter,
    pool: DetectionPool,
    labeled_ids: Sequence[ItemId],
    cfg: SegTrainConfig,
    generator: torch.Generator,
    progress: bool = False,
    llal: LossPredictionModule | None = None,
    llal_cfg: LLALConfig | None = None,
) -> dict[str, float]:
    """Train ``adapter.model`` on ``labeled_ids`` of ``pool`` in place.

    ``pool.take(ids)`` must give batches whose data samples carry ``gt_sem_seg`` (255 =
    unlabeled). Each epoch draws ``max(len(labeled_ids), cfg.min_epoch_items)`` items (whole
    shuffles with ``generator``, cut to length; a last batch of one image joins the one
    before, for heads with BatchNorm after a global pool); flips draw from ``generator`` too, and
    dropout from torch's global RNG, so the same seeds give the same weights. With ``llal``
    a loss-prediction module on the adapter's feature layers trains jointly (targets: each
    image's loss from :meth:`~TorchvisionSegmentationAdapter.per_sample_loss`, no gradient),
    as in :func:`~taskal.training_det.train_detector`. The model is left in eval mode.

    Returns:
        the last epoch's mean ``"loss"`` (and ``"llal_loss"`` with ``llal``).

    Raises:
        ValueError: an empty labeled set, ids not in ``pool``, or labels outside the
            model's classes (other than 255).
        FloatingPointError: a non-finite loss (lower ``cfg.lr``).
    """
    ids = check_labeled_ids(pool, labeled_ids, "train_segmenter")
    llal_cfg = llal_cfg or LLALConfig()

    def step(batch: Batch, optim: Any, epoch: int, detach: bool) -> dict[str, float]:
        assert llal_cfg is not None
        return _step(adapter, batch, optim, epoch, cfg, llal, llal_cfg, detach)

    def flip(batch: Batch) -> Batch:
        return _flip(batch, generator)

    return run_sgd(
        adapter,
        pool,
        ids,
        cfg,
        generator,
        step,
        "train seg",
        progress,
        llal,
        llal_cfg,
        min_batch=2,
        prepare=flip if cfg.flip else None,
    )


def padded_targets(adapter: TorchvisionSegmentationAdapter, batch: Batch, hw: torch.Size) -> Tensor:
    """``[B, H, W]`` label maps padded with 255 to the padded batch's size ``hw``, after
    checking every label is a class of the model or 255."""
    targets = adapter.model_targets(batch)
    out = torch.full((len(targets), *hw), IGNORE_INDEX, dtype=torch.long, device=targets[0].device)
    for i, (item, t) in enumerate(zip(batch.ids, targets, strict=True)):
        bad = t[(t != IGNORE_INDEX) & ((t < 0) | (t >= adapter.num_classes))]
        if len(bad):
            raise ValueError(
                f"item {item!r} has labels {sorted(set(bad.tolist()))[:5]} outside the model's "
                f"{adapter.num_classes} classes (255 marks unlabeled pixels); build the model "
                "with as many classes as the pool has"
            )
        out[i, : t.shape[0], : t.shape[1]] = t
    return out


def _step(
    adapter: TorchvisionSegmentationAdapter,
    batch: Batch,
    optim: torch.optim.Optimizer,
    epoch: int,
    cfg: SegTrainConfig,
    llal: LossPredictionModule | None,
    llal_cfg: LLALConfig,
    detach: bool,
) -> dict[str, float]:
    """One SGD step: cross-entropy over the batch's labeled pixels (and the LLAL ranking)."""
    x, _ = adapter.preprocess(batch.inputs)
    target = padded_targets(adapter, batch, x.shape[-2:])
    layers = llal.layers if llal is not None else []
    with adapter.capture_features(layers) as feats:
        out = adapter.model(x)
    loss = _ce(out["out"], target)
    if out.get("aux") is not None:
        loss = loss + AUX_WEIGHT * _ce(out["aux"], target)
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"the segmentation loss became {float(loss.detach())} in epoch {epoch} on items "
            f"{list(batch.ids)}; lower seg_train.lr or set max_grad_norm"
        )
    stats = {"loss": float(loss.detach())}
    if llal is not None:
        rank = loss_ranking_loss(llal(feats, detach=detach), adapter.per_sample_loss(batch))
        loss = loss + llal_cfg.weight * rank
        stats["llal_loss"] = float(rank.detach())
    backward_step(loss, optim, cfg)
    return stats


def _ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy averaged over labeled pixels; 0 (with a gradient) when none is."""
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)


def _flip(batch: Batch, generator: torch.Generator) -> Batch:
    """Each image and its label map flipped left-right with probability 0.5."""
    flips = (torch.rand(len(batch), generator=generator) < 0.5).tolist()
    samples = batch.data_samples or [{} for _ in batch.inputs]
    images, out = [], []
    for x, s, flip in zip(batch.inputs, samples, flips, strict=True):
        s = dict(s)
        if flip:
            x = x.flip(-1)
            if s.get("gt_sem_seg") is not None:
                s["gt_sem_seg"] = torch.as_tensor(s["gt_sem_seg"]).flip(-1)
        images.append(x)
        out.append(s)
    return Batch(images, list(batch.ids), data_samples=out)


__all__ = ["SegTrainConfig", "padded_targets", "train_segmenter"]
