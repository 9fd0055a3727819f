"""Compositions of strategies."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from taskal.registry import QUERY_STRATEGIES
from taskal.strategies.base import QueryStrategy, ScoreStrategy
from taskal.types import BatchOutputs, PoolOutputs


def build_part(cfg: Any, role: str, owner: str = "two_stage") -> QueryStrategy:
    """A composition's part from a strategy, a registered name or a config dict."""
    if isinstance(cfg, QueryStrategy):
        return cfg
    if isinstance(cfg, str):
        cfg = {"type": cfg}
    if not isinstance(cfg, dict):
        raise TypeError(
            f"{owner}'s {role} stage must be a strategy name or a config dict, got {cfg!r}"
        )
    from taskal.selector import build_strategy

    return build_strategy(cfg)


@QUERY_STRATEGIES.register_module(name="two_stage")
class TwoStage(QueryStrategy):
    """Top-M candidates by a score strategy, then a diverse subset of them.

    The usual remedy for top-k picking near-duplicates (e.g. Kirsch et al. 2019 discuss the
    problem; "uncertainty pre-filter + core-set" follows Yin et al. 2017 / Ash et al. 2020).

    Args:
        first: a :class:`ScoreStrategy` name or config (default entropy) that keeps the top
            ``M = candidates_factor * budget`` candidates; its ``n_samples`` is honoured.
        second: the strategy that picks ``budget`` among them, by name or config (default
            core-set); it must pick rather than score (core-set, BADGE, random).
        candidates_factor: ``M / budget`` (>= 1).
    """

    def __init__(
        self,
        first: dict[str, Any] | str | None = None,
        second: dict[str, Any] | str | None = None,
        candidates_factor: float = 5.0,
    ) -> None:
        self.first = build_part(first or "entropy", "first")
        self.second = build_part(second or "coreset", "second")
        if not isinstance(self.first, ScoreStrategy):
            raise ValueError(
                f"two_stage's first stage must score candidates (entropy, bald, llal, ...), "
                f"got {type(self.first).__name__}"
            )
        if isinstance(self.second, ScoreStrategy):
            raise ValueError(
                f"two_stage's second stage must pick a diverse subset (coreset, badge, random), "
                f"got the score strategy {type(self.second).__name__}, which would ignore the "
                "first stage"
            )
        if not isinstance(candidates_factor, (int, float)) or not candidates_factor >= 1:
            raise ValueError(f"candidates_factor must be a number >= 1, got {candidates_factor!r}")
        self.candidates_factor = float(candidates_factor)
        self.n_samples = self.first.n_samples

    @property
    def sampling(self) -> str:
        return self.first.sampling

    @property
    def needs(self) -> frozenset[str]:
        return self.first.needs | self.second.needs

    def score_batch(self, outputs: BatchOutputs) -> Tensor | None:
        return self.first.score_batch(outputs)

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
