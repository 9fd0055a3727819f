"""Class-aware diversity: a score strategy whose picks no single class may fill."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from taskal.functional import top_k
from taskal.registry import QUERY_STRATEGIES
from taskal.strategies.base import QueryStrategy, ScoreStrategy
from taskal.strategies.hybrid import build_part
from taskal.types import BatchOutputs, PoolOutputs


@QUERY_STRATEGIES.register_module(name="class_balanced")
class ClassBalanced(QueryStrategy):
    """The best items by a score strategy, at most ``max_share`` of the budget per class.

    Top-k uncertainty tends to pick one confusing class over and over (on the digits, 8 of
    20 entropy picks fall in one class). This walks the score ranking and skips an item
    once its predicted class holds ``ceil(max_share * budget)`` picks; if the caps leave
    the budget unfilled, the best skipped items fill it. An item's class is the foreground
    class with the most probability mass over its units: the argmax for an image-level
    prediction, the class that dominates an image's detected boxes (softmax or sigmoid
    heads, background column excluded); images without boxes form a group of their own.

    Args:
        base: a :class:`ScoreStrategy` name or config (default entropy); its ``n_samples``
            is honoured.
        max_share: the largest share of one round's budget one predicted class may take,
            in ``(0, 1]``.
    """

    def __init__(self, base: dict[str, Any] | str = "entropy", max_share: float = 0.3) -> None:
        self.base = build_part(base, "base", "class_balanced")
        if not isinstance(self.base, ScoreStrategy):
            raise ValueError(
                f"class_balanced's base must score candidates (entropy, bald, llal, ...), got "
                f"{type(self.base).__name__}"
            )
        if not isinstance(max_share, (int, float)) or not 0.0 < max_share <= 1.0:
            raise ValueError(f"max_share must lie in (0, 1], got {max_share!r}")
        self.max_share = float(max_share)
        self.n_samples = self.base.n_samples

    @property
    def sampling(self) -> str:
        return self.base.sampling

    @property
    def needs(self) -> frozenset[str]:
        return self.base.needs | {"item_class"}

    def score_batch(self, outputs: BatchOutputs) -> Tensor | None:
        return self.base.score_batch(outputs)

    def select(
        self, outputs: PoolOutputs, budget: int, generator: torch.Generator | None = None
    ) -> Tensor:
        if outputs.scores_N is None or outputs.classes_N is None:
            raise ValueError("class_balanced needs item scores and item classes")
        ranking = top_k(outputs.scores_N.cpu(), len(outputs), generator)
        classes = outputs.classes_N.cpu()[ranking].tolist()
        cap = max(1, math.ceil(self.max_share * budget))
        counts: dict[int, int] = {}
        picks: list[int] = []
        skipped: list[int] = []
        for position, cls in zip(ranking.tolist(), classes, strict=True):
            if len(picks) == budget:
                break
            if counts.get(cls, 0) < cap:
                counts[cls] = counts.get(cls, 0) + 1
                picks.append(position)
            else:
                skipped.append(position)
        picks += skipped[: budget - len(picks)]
        return torch.tensor(picks, dtype=torch.long)

    def __repr__(self) -> str:
        return f"ClassBalanced(base={self.base!r}, max_share={self.max_share})"
