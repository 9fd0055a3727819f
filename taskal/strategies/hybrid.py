"""Compositions of strategies."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from taskal.registry import QUERY_STRATEGIES, build
from taskal.strategies.base import QueryStrategy, ScoreStrategy
from taskal.types import PoolOutputs


@QUERY_STRATEGIES.register_module(name="two_stage")
class TwoStage(QueryStrategy):
    """Top-M candidates by an uncertainty score, then a diverse subset of them.

    The usual remedy for top-k picking near-duplicates (e.g. Kirsch et al. 2019 discuss the
    problem; "uncertainty pre-filter + core-set" follows Yin et al. 2017 / Ash et al. 2020).

    Args:
        first: config of a :class:`ScoreStrategy` (default entropy) that keeps the top
            ``M = candidates_factor * budget`` candidates.
        second: config of the strategy that picks ``budget`` among them (default core-set).
        candidates_factor: ``M / budget`` (>= 1).
    """

    def __init__(
        self,
        first: dict[str, Any] | None = None,
        second: dict[str, Any] | None = None,
        candidates_factor: float = 5.0,
    ) -> None:
        self.first = build(QUERY_STRATEGIES, first or {"type": "entropy"})
        self.second = build(QUERY_STRATEGIES, second or {"type": "coreset"})
        if not isinstance(self.first, ScoreStrategy):
            raise TypeError(
                f"two_stage's first stage must score candidates (a ScoreStrategy), got "
                f"{type(self.first).__name__}"
            )
        if self.second.sampling != "deterministic" and self.second.sampling != self.first.sampling:
            raise ValueError("two_stage's stages must share one sampling mode")
        if not candidates_factor >= 1:
            raise ValueError(f"candidates_factor must be >= 1, got {candidates_factor!r}")
        super().__init__(self.first.n_samples)
        self.candidates_factor = float(candidates_factor)

    @property
    def sampling(self) -> str:  # type: ignore[override]
        return self.first.sampling

    @property
    def needs(self) -> frozenset[str]:
        return self.first.needs | self.second.needs

    def select(
        self, outputs: PoolOutputs, budget: int, generator: torch.Generator | None = None
    ) -> Tensor:
        m = min(len(outputs), max(budget, round(self.candidates_factor * budget)))
        top_M = self.first.select(outputs, m, generator)
        picks = self.second.select(outputs.subset(top_M), budget, generator)
        return top_M[picks]

    def __repr__(self) -> str:
        return (
            f"TwoStage(first={self.first!r}, second={self.second!r}, M={self.candidates_factor}x)"
        )


QUERY_STRATEGIES.register_module(name="hybrid", module=TwoStage)
