"""Uniform random sampling: the baseline every other strategy is measured against."""

from __future__ import annotations

import torch
from torch import Tensor

from taskal.registry import QUERY_STRATEGIES
from taskal.strategies.base import QueryStrategy
from taskal.types import PoolOutputs


@QUERY_STRATEGIES.register_module(name="random")
class RandomSampling(QueryStrategy):
    """Pick ``budget`` candidates uniformly without replacement (from ``generator``)."""

    def select(
        self, outputs: PoolOutputs, budget: int, generator: torch.Generator | None = None
    ) -> Tensor:
        return torch.randperm(len(outputs), generator=generator)[:budget]
