"""Region queries: which regions of which items to label, under an annotation budget.

Unit scores (boxes, pixels) are reduced to region scores batch by batch
(:func:`taskal.functional.reduce_regions`); :class:`RegionBuffer` keeps only the regions
the budget could buy, so memory is bounded by the budget, not by the pool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

from taskal.queries import LabelState, Query
from taskal.types import ItemId, Predictions


class RegionBuffer:
    """The best regions seen so far that the budget could buy.

    Regions costing more than the budget are counted but never kept; of the rest, the
    best are kept until their cost adds up to twice the budget (the greedy fill skips
    regions that no longer fit, so it needs some slack); with caps, only regions their item
    and class could still afford count towards that. Rows are ranked by score, ties by a
    random key from the selection's generator. Memory is bounded by the budget over the
    cheapest region's cost, not by the pool.

    Args:
        budget: the annotation cost to spend.
        max_item_share: the largest share of the budget one item's regions may take
            (``None``: no cap), so one image cannot take the whole budget.
        max_class_share: the largest share one predicted class's regions may take (a
            region's class: the class most of its units are predicted as).
    """

    def __init__(
        self,
        budget: float,
        max_item_share: float | None = None,
        max_class_share: float | None = None,
    ) -> None:
        self.budget = budget
        self.max_item_share = max_item_share
        self.max_class_share = max_class_share
        self.keep_cost = 2.0 * budget
        self.total_cost = 0.0
        self.min_cost = math.inf
        self.affordable = 0
        self.score = torch.zeros(0, dtype=torch.float64)
        self.tie = torch.zeros(0, dtype=torch.float64)
        self.item = torch.zeros(0, dtype=torch.long)
        self.region = torch.zeros(0, dtype=torch.long)
        self.cost = torch.zeros(0, dtype=torch.float64)
        self.box = torch.zeros(0, 4, dtype=torch.float64)
        self.cls = torch.zeros(0, dtype=torch.long)

    def push(
        self,
        score: Tensor,
        item: Tensor,
        region: Tensor,
        cost: Tensor,
        box: Tensor,
        generator: torch.Generator,
        cls: Tensor | None = None,
    ) -> None:
        """Add regions (``[R]`` each, ``box`` ``[R, 4]``, ``cls`` their predicted classes or
        ``None``) and drop all but the best."""
        if cls is None:
            cls = torch.full((len(score),), -1, dtype=torch.long)
        cost = cost.double()
        self.total_cost += float(cost.sum())
        if len(cost):
            self.min_cost = min(self.min_cost, float(cost.min()))
        fits = cost <= self.budget + 1e-9
        self.affordable += int(fits.sum())
        self.score = torch.cat([self.score, score.double()[fits]])
        self.tie = torch.cat([self.tie, torch.rand(len(score), generator=generator).double()[fits]])
        self.item = torch.cat([self.item, item.long()[fits]])
        self.region = torch.cat([self.region, region.long()[fits]])
        self.cost = torch.cat([self.cost, cost[fits]])
        self.box = torch.cat([self.box, box.double()[fits]])
        self.cls = torch.cat([self.cls, cls.long()[fits]])
        order = self._kept(self.order())
        for name in ("score", "tie", "item", "region", "cost", "box", "cls"):
            setattr(self, name, getattr(self, name)[order])

    def _kept(self, order: Tensor) -> Tensor:
        """The rows (in ``order``) worth keeping: the best until their cost reaches
        ``keep_cost``; with caps, rows beyond what their item or class could still spend
        (its cap plus one region) are dropped first, so the caps cannot starve the fill."""
        if self.max_item_share is None and self.max_class_share is None:
            cum = torch.cumsum(self.cost[order], 0)
            cut = torch.searchsorted(cum, torch.tensor([self.keep_cost], dtype=cum.dtype))
            return order[: int(cut) + 1]
        slack = float(self.cost.max()) if len(self.cost) else 0.0
        item_cap = self.budget * (self.max_item_share or math.inf) + slack
        class_cap = self.budget * (self.max_class_share or math.inf) + slack
        per_item: dict[int, float] = {}
        per_class: dict[int, float] = {}
        kept, total = [], 0.0
        for i in order.tolist():
            cost, item, cls = float(self.cost[i]), int(self.item[i]), int(self.cls[i])
            if per_item.get(item, 0.0) + cost > item_cap:
                continue
            if cls >= 0 and per_class.get(cls, 0.0) + cost > class_cap:
                continue
            per_item[item] = per_item.get(item, 0.0) + cost
            per_class[cls] = per_class.get(cls, 0.0) + cost
            kept.append(i)
            total += cost
            if total >= self.keep_cost:
                break
        return torch.tensor(kept, dtype=torch.long)

    def order(self) -> Tensor:
        """Positions by descending score, random among ties."""
        by_tie = torch.argsort(self.tie)
        return by_tie[torch.sort(self.score[by_tie], descending=True, stable=True).indices]

    def queries(self, candidates: Sequence[ItemId]) -> list[Query]:
        """The best regions whose costs fit the budget (and the caps), greedily by score."""
        budget = self.budget
        if self.total_cost < budget:
            raise ValueError(
                f"budget {budget:g} is larger than the unlabeled regions' total cost "
                f"({self.total_cost:g}); lower the budget or add items to the pool."
            )
        if self.affordable == 0:
            raise ValueError(
                f"every unlabeled region costs more than the budget {budget:g} (the cheapest "
                f"costs {self.min_cost:g}); raise the budget or use smaller regions."
            )
        item_cap = math.inf if self.max_item_share is None else self.max_item_share * budget
        class_cap = math.inf if self.max_class_share is None else self.max_class_share * budget
        per_item: dict[int, float] = {}
        per_class: dict[int, float] = {}
        queries, spent = [], 0.0
        for i in self.order().tolist():
            cost = float(self.cost[i])
            item, cls = int(self.item[i]), int(self.cls[i])
            if spent + cost > budget + 1e-9:
                continue
            if per_item.get(item, 0.0) + cost > item_cap + 1e-9:
                continue
            if cls >= 0 and per_class.get(cls, 0.0) + cost > class_cap + 1e-9:
                continue
            per_item[item] = per_item.get(item, 0.0) + cost
            per_class[cls] = per_class.get(cls, 0.0) + cost
            box = self.box[i]
            queries.append(
                Query(
                    candidates[int(self.item[i])],
                    int(self.region[i]),
                    cost,
                    float(self.score[i]),
                    None if torch.isnan(box).any() else tuple(box.tolist()),
                )
            )
            spent += cost
            if spent >= budget - 1e-9:
                break
        return queries


def unlabeled_regions(
    owner_R: Tensor,
    region_R: Tensor,
    offset: int,
    candidates: Sequence[ItemId],
    state: LabelState | None,
    box_R4: Tensor | None = None,
) -> Tensor:
    """``[R]`` True for regions not yet labeled (vectorised over the batch's regions).

    A region with a box (a detection) is labeled when it overlaps a labeled box of its item
    by ``state.box_iou`` or more; a region without one (a patch, a superpixel) when its
    index is among the item's labeled regions.
    """
    keep = torch.ones(len(owner_R), dtype=torch.bool)
    if state is None or not state.partial or len(owner_R) == 0:
        return keep
    has_box = torch.zeros(len(owner_R), dtype=torch.bool)
    if box_R4 is not None:
        has_box = ~torch.isnan(box_R4).any(1)
    span = int(region_R.max()) + 1
    done = [
        o * span + r
        for o in torch.unique(owner_R[~has_box]).tolist()
        for r in state.regions_of(candidates[offset + o])
        if r < span
    ]
    if done:
        by_index = torch.isin(owner_R * span + region_R, torch.tensor(done, dtype=torch.long))
        keep &= ~(by_index & ~has_box)
    if box_R4 is not None and bool(has_box.any()):
        for o in torch.unique(owner_R[has_box]).tolist():
            labeled = state.boxes.get(candidates[offset + o])
            if not labeled:
                continue
            rows = torch.nonzero((owner_R == o) & has_box)[:, 0]
            iou = box_iou(box_R4[rows].double(), torch.tensor(labeled, dtype=torch.float64))
            keep[rows[iou.max(1).values >= state.box_iou]] = False
    return keep


def empty_boxes(box_R4: Tensor) -> Tensor:
    """``[R]`` True for regions whose box has no area (a detection clipped flat at the image
    border): there is nothing to show an annotator. Regions without boxes (NaN) are not."""
    return (box_R4[:, 2] <= box_R4[:, 0]) | (box_R4[:, 3] <= box_R4[:, 1])


def region_boxes(p: Predictions, owner_R: Tensor, region_R: Tensor) -> Tensor:
    """``[R, 4]`` enclosing box of each region's units (NaN without boxes)."""
    num = owner_R.shape[0]
    if p.boxes_U4 is None or num == 0:
        return torch.full((num, 4), math.nan, dtype=torch.float64)
    owner_U, region_U = p.owner_U.cpu(), p.regions().cpu()
    span = int(region_U.max()) + 1
    keys_R = owner_R * span + region_R
    rows_U = torch.searchsorted(keys_R, owner_U * span + region_U)
    boxes = p.boxes_U4.detach().cpu().double()
    lo = torch.full((num, 2), math.inf, dtype=torch.float64)
    hi = torch.full((num, 2), -math.inf, dtype=torch.float64)
    lo.scatter_reduce_(0, rows_U[:, None].expand(-1, 2), boxes[:, :2], "amin")
    hi.scatter_reduce_(0, rows_U[:, None].expand(-1, 2), boxes[:, 2:], "amax")
    return torch.cat([lo, hi], 1)
