"""Per-class detection quality on labeled images (the difficulty PPAL calibrates by)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_iou

from taskal.evaluation.coco_map import default_background
from taskal.functional import foreground
from taskal.types import ItemId


@torch.no_grad()
def class_quality(
    adapter: Any,
    pool: Any,
    ids: Sequence[ItemId],
    batch_size: int = 8,
    iou_thr: float = 0.5,
    xi: float = 0.6,
) -> Tensor:
    """``[C]`` quality in ``[0, 1]`` of each foreground class on the labeled images ``ids``.

    Every ground-truth box of class ``c`` gets the best ``p_c^xi * IoU^(1 - xi)`` over the
    adapter's detections that overlap it with ``IoU >= iou_thr`` (``p_c`` the detection's
    probability of ``c``; PPAL's quality with ``xi = 0.6``), or 0 when no detection does (a
    missed object is the hardest kind). A class's quality is the mean over its boxes; a class
    with no box in ``ids`` gets 0 (unknown counts as hard, as PPAL starts from 0).

    Only labeled images are read: their ground truth is known, and predictions run on the
    batch without labels.

    Args:
        adapter: a detection adapter (boxes as units).
        pool: a :class:`~taskal.data.CocoDetectionPool` (``take`` gives torchvision targets).
        ids: labeled item ids.
        batch_size: images per forward.
        iou_thr: the overlap a detection needs to count for a ground-truth box.
        xi: the weight of the score against the IoU.
    """
    if not 0.0 < iou_thr <= 1.0 or not 0.0 <= xi <= 1.0:
        raise ValueError(f"iou_thr must lie in (0, 1] and xi in [0, 1], got {iou_thr}, {xi}")
    background = default_background(adapter)
    num_fg = adapter.num_classes - (background is not None)
    sums = torch.zeros(num_fg, dtype=torch.float64)
    counts = torch.zeros(num_fg, dtype=torch.float64)
    ids = list(ids)
    for start in range(0, len(ids), batch_size):
        batch = pool.take(ids[start : start + batch_size])
        p = adapter.predict(batch.without_labels(), n_samples=1)
        if p.boxes_U4 is None:
            raise ValueError("class_quality needs box units (a detection adapter)")
        probs = foreground(p.probs_UCK.mean(-1), background).double().cpu()
        boxes, owner = p.boxes_U4.double().cpu(), p.owner_U.cpu()
        for i, sample in enumerate(batch.data_samples or []):
            gt_boxes = torch.as_tensor(sample["boxes"]).double().reshape(-1, 4)
            gt_labels = torch.as_tensor(sample["labels"]).long().reshape(-1)
            if not len(gt_labels):
                continue
            mine = owner == i
            iou = box_iou(gt_boxes, boxes[mine])  # [G, U_i]
            p_gt = probs[mine][:, gt_labels].T  # [G, U_i]: each unit's prob of the box's class
            q = p_gt.clamp_min(0) ** xi * iou.clamp_min(0) ** (1 - xi)
            q = torch.where(iou >= iou_thr, q, torch.zeros_like(q))
            best = q.max(1).values if q.shape[1] else q.new_zeros(len(gt_labels))
            sums.index_add_(0, gt_labels, best)
            counts.index_add_(0, gt_labels, torch.ones_like(best))
    return (sums / counts.clamp_min(1)).float()


__all__ = ["class_quality"]
