"""Uniform random sampling: the baseline every other strategy is measured against."""

from __future__ import annotations

import torch
from torch import Tensor

from taskal.registry import QUERY_STRATEGIES
from taskal.strategies.base import QueryStrategy
from taskal.types import PoolOutputs, Predictions


@QUERY_STRATEGIES.register_module(name="random")
class RandomSampling(QueryStrategy):
    """Pick ``budget`` candidates uniformly without replacement (from ``generator``).

    For region queries every region gets one uniform random score, whatever its number of
    units, so regions are drawn uniformly (large regions are not favoured).
    """

    def select(
        self, outputs: PoolOutputs, budget: int, generator: torch.Generator | None = None
    ) -> Tensor:
        return torch.randperm(len(outputs), generator=generator)[:budget]

    def region_unit_scores(
        self, predictions: Predictions, generator: torch.Generator | None = None
    ) -> Tensor:
        return torch.zeros(predictions.num_units)

    def region_scores(self, scores_R: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.rand(len(scores_R), generator=generator, dtype=torch.float64)
