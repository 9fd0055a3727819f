"""mIoU and mean Dice of a segmentation adapter on a labeled pool.

The adapter's deterministic pass runs on batches without labels (as during selection); each
pixel's prediction is its most probable class. One ``[C, C]`` confusion matrix accumulates
over the pool (pixels labeled 255 are left out), so memory does not grow with the pool::

    metrics = segmentation_metrics(adapter, test_pool)  # {"mIoU", "mDice", "accuracy", ...}

Per class, IoU = TP / (TP + FP + FN) and Dice = 2 TP / (2 TP + FP + FN); the means run over
the classes that occur in the labels or the predictions (as mmseg's ``nanmean``: a class
absent from both has no IoU), background included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from taskal.types import ItemId

IGNORE_INDEX = 255


def confusion_matrix(pred: Tensor, truth: Tensor, num_classes: int) -> Tensor:
    """``[C, C]`` counts (rows: true class, columns: predicted) of the pixels whose label
    is not 255.

    Raises:
        ValueError: a label outside ``0..C-1`` other than 255.
    """
    keep = truth != IGNORE_INDEX
    t, p = truth[keep].long(), pred[keep].long()
    if len(t) and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(
            f"labels {sorted(set(t[(t < 0) | (t >= num_classes)].tolist()))[:5]} lie outside "
            f"the {num_classes} classes (255 marks unlabeled pixels)"
        )
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def scores_from_confusion(cm: Tensor) -> dict[str, Any]:
    """``mIoU``, ``mDice``, pixel ``accuracy`` and per-class ``IoU`` / ``Dice`` lists (NaN
    for a class absent from labels and predictions) from a confusion matrix."""
    cm = cm.double()
    tp = cm.diag()
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    union = tp + fp + fn
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
    dice = torch.where(union > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.nan)
    present = union > 0
    total = cm.sum()
    return {
        "mIoU": float(iou[present].mean()) if bool(present.any()) else 0.0,
        "mDice": float(dice[present].mean()) if bool(present.any()) else 0.0,
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "IoU": iou.tolist(),
        "Dice": dice.tolist(),
    }


def segmentation_metrics(
    adapter: Any,
    pool: Any,
    ids: Sequence[ItemId] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """The adapter's :func:`scores_from_confusion` on ``ids`` of ``pool`` (all by default).

    ``pool.batches(ids, batch_size)`` must give batches whose data samples carry
    ``gt_sem_seg``; the adapter sees each batch without them.
    """
    ids = list(pool.ids if ids is None else ids)
    if not ids:
        raise ValueError("segmentation_metrics needs at least one item")
    c = int(adapter.num_classes)
    cm = torch.zeros(c, c, dtype=torch.long)
    total = -(-len(ids) // batch_size)
    batches = pool.batches(ids, batch_size)
    for batch in tqdm(batches, total=total, desc="mIoU", disable=not progress, leave=False):
        pred = adapter.predict(batch.without_labels())
        labels = pred.probs_UCK[..., 0].argmax(1).cpu()
        for i, sample in enumerate(batch.data_samples or []):
            truth = sample.get("gt_sem_seg") if isinstance(sample, dict) else None
            if truth is None:
                raise ValueError(f"item {batch.ids[i]!r} has no gt_sem_seg to evaluate against")
            truth = torch.as_tensor(truth).long().flatten()
            mine = labels[pred.owner_U.cpu() == i]
            order = pred.unit_U.cpu()[pred.owner_U.cpu() == i]
            if len(mine) != len(truth):
                raise ValueError(
                    f"item {batch.ids[i]!r}: {len(mine)} predicted pixels for a label map of "
                    f"{len(truth)}"
                )
            flat = torch.empty_like(truth)
            flat[order] = mine
            cm += confusion_matrix(flat, truth, c)
    return scores_from_confusion(cm)


__all__ = ["confusion_matrix", "scores_from_confusion", "segmentation_metrics"]
