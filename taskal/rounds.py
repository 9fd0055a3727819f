"""One selection round, shared by simulations and label campaigns: the same seeds, the same
selector, so that what ``tools/simulate.py`` measures is what ``tools/al_round.py`` runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from taskal import distributed
from taskal.queries import LabelState, Query
from taskal.seeds import mix_seed
from taskal.selector import Selector
from taskal.strategies.base import QueryStrategy
from taskal.types import Adapter, ItemId


def train_seed(seed: int, r: int, member: int | None = None) -> int:
    """The seed of round ``r``'s model initialisation (and data order with a Runner)."""
    return mix_seed(seed, r, 0) if member is None else mix_seed(seed, r, 0, member)


class Selection(NamedTuple):
    """A round's queries and the scores they were chosen from (``Selector.last_scores``)."""

    queries: list[Query]
    scores: torch.Tensor | None


def select_round(
    adapter: Adapter,
    strategy: QueryStrategy,
    pool: Any,
    labeled: list[ItemId] | LabelState,
    budget: float,
    seed: int,
    r: int,
    *,
    query: str = "item",
    batch_size: int = 256,
    progress: bool = False,
    options: Mapping[str, Any] | None = None,
) -> Selection:
    """Round ``r``'s queries: ``budget`` items (or annotation cost of regions) of ``pool``
    not in ``labeled``, with ties and random draws from a generator seeded by ``(seed, r)``."""
    # under torchrun (the tools join the group) every rank scores its share of the pool
    shared = query == "item" and distributed.world()[1] > 1
    selector = Selector(
        strategy, batch_size, progress, query, distributed=shared, **dict(options or {})
    )
    g = torch.Generator().manual_seed(mix_seed(seed, r, 1))
    queries = selector.select(adapter, pool, labeled, budget, g)
    return Selection(queries, selector.last_scores)


__all__ = ["Selection", "mix_seed", "select_round", "train_seed"]
