"""What the detection adapters share: checking given box units against a batch, and
matching given boxes to a dense model's own anchors (ensemble members with other anchors or
other regressions score the reference member's boxes through their best-overlapping anchor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

from taskal.types import Units

#: pixels within which a decoded box is "the very box" a unit names.
BOX_ATOL = 1e-2


def check_box_units(units: Units, sizes: list[tuple[int, int]], device: torch.device) -> Units:
    """``units`` on ``device``, after checking that they can belong to a batch of images of
    ``sizes`` ``(H, W)``: boxes present, owners inside the batch, boxes inside their image
    (1e-3 px of slack)."""
    if units.boxes_U4 is None:
        raise ValueError("detection units need boxes_U4; pass Predictions.units()")
    owner, boxes = units.owner_U.to(device), units.boxes_U4.to(device)
    if len(units) and (int(owner.min()) < 0 or int(owner.max()) >= len(sizes)):
        raise ValueError(
            f"units belong to items outside this batch of {len(sizes)}; pass the units of a "
            "prediction on this batch"
        )
    limits = torch.tensor(sizes, device=device)[owner].flip(1).repeat(1, 2)
    if bool((boxes < -1e-3).any() or (boxes > limits + 1e-3).any()):
        raise ValueError("unit boxes lie outside their images: are they from this batch?")
    return Units(owner, units.unit_U.to(device), boxes)


def check_match_iou(match_iou: float) -> float:
    """``match_iou`` as a float, after checking it lies in ``(0, 1]``."""
    if not 0.0 < match_iou <= 1.0:
        raise ValueError(f"match_iou must lie in (0, 1], got {match_iou}")
    return float(match_iou)


def same_boxes(a: Tensor, b: Tensor) -> bool:
    """Whether two ``[N, 4]`` box sets are the same boxes, coordinate by coordinate (not by
    IoU: a box clipped to zero area has no IoU with itself)."""
    return a.shape == b.shape and torch.allclose(a, b, atol=BOX_ATOL, rtol=0.0)


def match_boxes(given: Tensor, boxes: Tensor, match_iou: float) -> tuple[Tensor, Tensor]:
    """For each ``given [G, 4]`` box, the index of the ``boxes [A, 4]`` row that decodes to
    the very box, else the one overlapping it most, and whether that row counts as
    detecting it (the very box, or IoU >= ``match_iou``)."""
    iou = box_iou(given, boxes).nan_to_num(0.0)  # 0/0 for boxes of no area
    exact = (given[:, None] - boxes[None]).abs().amax(-1) <= BOX_ATOL
    score, best = (iou + 2.0 * exact).max(1)
    return best, score >= match_iou


@dataclass
class DenseCache:
    """What a dense head's MC samples re-run on: the cached maps (tower outputs or FPN
    levels), the units naming *this* model's anchors, and which units this model detects
    (``None``: all of them, they are its own boxes)."""

    levels: list[Tensor]
    lookup: Units
    found: Tensor | None
