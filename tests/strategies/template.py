"""Shared inputs for strategy tests: one batch with everything any strategy needs, and the
per-item pool a strategy selects from after streaming over it."""

from __future__ import annotations

import torch

from taskal.registry import QUERY_STRATEGIES
from taskal.selector import build_strategy
from taskal.strategies.base import QueryStrategy
from taskal.types import BatchOutputs, PoolOutputs, Predictions


def registered_names() -> list[str]:
    import taskal.strategies  # noqa: F401  (registers)

    return sorted(QUERY_STRATEGIES.module_dict)


def item_query_names() -> list[str]:
    """Registered strategies that rank whole items (all but the region-only ones)."""
    return [n for n in registered_names() if "item" in build_strategy(n).query_kinds]


def make_batch(n: int = 40, c: int = 4, k: int = 5, d: int = 6, seed: int = 0) -> BatchOutputs:
    """Image-level softmax predictions, embeddings, predicted losses and per-class quality
    of ``n`` items."""
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(n, c, k, generator=g) * 2).softmax(1)
    return BatchOutputs(
        ids=[f"item{i}" for i in range(n)],
        predictions=Predictions(probs, torch.arange(n)),
        embeddings_BD=torch.randn(n, d, generator=g),
        loss_pred_B=torch.rand(n, generator=g),
        class_quality_C=torch.rand(c, generator=g),
    )


def labeled_embeddings(d: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(7, d, generator=torch.Generator().manual_seed(seed + 100))


def pool_of(strategy: QueryStrategy, batch: BatchOutputs) -> PoolOutputs:
    """What the selector hands ``strategy.select`` after streaming over ``batch``."""
    scores = strategy.score_batch(batch)
    p = batch.predictions
    assert p is not None and batch.embeddings_BD is not None
    return PoolOutputs(
        list(batch.ids),
        scores_N=None if scores is None else scores.double(),
        probs_NC=p.probs_UCK.mean(-1),
        embeddings_ND=batch.embeddings_BD,
        labeled_embeddings_LD=labeled_embeddings(batch.embeddings_BD.shape[1]),
        loss_pred_N=batch.loss_pred_B,
        classes_N=p.probs_UCK.mean(-1).argmax(1),
    )


def permute(batch: BatchOutputs, perm: torch.Tensor) -> BatchOutputs:
    p = batch.predictions
    assert p is not None and batch.embeddings_BD is not None and batch.loss_pred_B is not None
    return BatchOutputs(
        [batch.ids[int(i)] for i in perm],
        Predictions(p.probs_UCK[perm], torch.arange(len(perm))),
        batch.embeddings_BD[perm],
        batch.loss_pred_B[perm],
        batch.class_quality_C,
    )


def select(
    strategy: QueryStrategy, batch: BatchOutputs, budget: int, seed: int | None = 0
) -> torch.Tensor:
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return strategy.select(pool_of(strategy, batch), budget, g)


def build(name: str) -> QueryStrategy:
    return build_strategy(name)
