"""Shared inputs for strategy tests: one PoolOutputs with everything any strategy needs."""

from __future__ import annotations

import torch

from taskal.registry import QUERY_STRATEGIES
from taskal.selector import build_strategy
from taskal.strategies.base import QueryStrategy
from taskal.types import PoolOutputs, Predictions


def registered_names() -> list[str]:
    import taskal.strategies  # noqa: F401  (registers)

    return sorted(QUERY_STRATEGIES.module_dict)


def make_outputs(n: int = 40, c: int = 4, k: int = 5, d: int = 6, seed: int = 0) -> PoolOutputs:
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(n, c, k, generator=g) * 2).softmax(1)
    return PoolOutputs(
        ids=[f"item{i}" for i in range(n)],
        predictions=Predictions(probs, torch.arange(n)),
        embeddings_ND=torch.randn(n, d, generator=g),
        labeled_embeddings_LD=torch.randn(7, d, generator=g),
        loss_pred_N=torch.rand(n, generator=g),
    )


def permute(outputs: PoolOutputs, perm: torch.Tensor) -> PoolOutputs:
    return outputs.subset(perm)


def build(name: str) -> QueryStrategy:
    return build_strategy(name)
