"""What to label and what is labeled: queries with costs, and full or partial labels.

A query is an item, or an item plus a region (a box, a superpixel, a patch), with the
annotation cost it spends; :class:`LabelState` records whole items and the labeled regions
of partially labeled ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from taskal.types import ItemId


@dataclass(frozen=True)
class Query:
    """One thing to label: an item, or a region of an item, and what labeling it costs.

    Attributes:
        item: the item's stable id.
        region: the region's index inside the item (a box unit, a superpixel id, a patch
            index), or ``None`` for the whole item.
        cost: annotation cost counted against the budget.
        score: the strategy's score (higher = label first); NaN for random picks.
        box: the region's xyxy box when the region is a detection box.
    """

    item: ItemId
    region: int | None = None
    cost: float = 1.0
    score: float = math.nan
    box: tuple[float, float, float, float] | None = None


@dataclass
class LabelState:
    """What is labeled: whole items, and regions of partially labeled items.

    Attributes:
        full: ids of fully labeled items.
        partial: ``item -> region indices`` labeled so far (items not in ``full``).
        boxes: ``item -> xyxy boxes`` of labeled box regions. A detector's boxes change
            between rounds (and their indices with them), so a box region counts as labeled
            when it overlaps one of these (IoU at least ``box_iou``), not by its index.
        box_iou: the overlap at which a predicted box is the labeled one (0.5).
    """

    full: set[ItemId] = field(default_factory=set)
    partial: dict[ItemId, set[int]] = field(default_factory=dict)
    boxes: dict[ItemId, list[tuple[float, float, float, float]]] = field(default_factory=dict)
    box_iou: float = 0.5

    @classmethod
    def of(cls, labeled: LabelState | Iterable[ItemId] | None) -> LabelState:
        """A ``LabelState`` from itself or from a collection of fully labeled ids."""
        if labeled is None:
            return cls()
        if isinstance(labeled, LabelState):
            return labeled
        return cls(full=set(labeled))

    def add(self, queries: Iterable[Query]) -> None:
        """Record answered queries (an item query labels the item fully)."""
        for q in queries:
            if q.region is None:
                self.full.add(q.item)
                self.partial.pop(q.item, None)
                self.boxes.pop(q.item, None)
            elif q.item not in self.full:
                self.partial.setdefault(q.item, set()).add(int(q.region))
                if q.box is not None:
                    self.boxes.setdefault(q.item, []).append(tuple(q.box))  # type: ignore[arg-type]

    def items(self) -> set[ItemId]:
        """Every item with at least one label."""
        return self.full | set(self.partial)

    def regions_of(self, item: ItemId) -> set[int]:
        return self.partial.get(item, set())

    def copy(self) -> LabelState:
        return replace(
            self,
            full=set(self.full),
            partial={k: set(v) for k, v in self.partial.items()},
            boxes={k: list(v) for k, v in self.boxes.items()},
        )
