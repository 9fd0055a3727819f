"""The round loop every simulation shares: train, measure, select, label, repeat.

Every (strategy, seed) run starts from the same seed-dependent initial labeled set, and
its models start from the same seed-dependent initialisation each round, so curves differ
only by what the strategies select. A task's simulation provides :meth:`RoundLoop.train`
and :meth:`RoundLoop.evaluate`.

A strategy runs with item queries (whole items, ``budget`` items per round) or, where the
task has regions (boxes, superpixels, patches), with region queries: ``region_budget``
annotation cost per round (the adapter's ``cost_U`` summed), answered by the oracle region
by region, so the model trains on partially labeled items (:class:`~taskal.queries.LabelState`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from tqdm import tqdm

from taskal.queries import LabelState, Query
from taskal.rounds import select_round
from taskal.strategies.base import QueryStrategy
from taskal.types import Adapter, ItemId

#: What a round trains on: the labeled items in labeling order (item queries), or full and
#: partial labels (region queries).
Labeled = list[ItemId] | LabelState


class RoundLoop:
    """Run ``cfg.rounds`` rounds of every (strategy, seed) over ``pool``.

    Subclasses set ``cfg`` (with ``initial``, ``budget``, ``rounds``, ``seeds``,
    ``progress``, and ``region_budget`` when a strategy queries regions), ``pool`` (with
    ``ids`` and ``batches``), ``strategies`` (label, strategy pairs), ``query_kinds``
    (label -> ``"item"`` or ``"region"``; missing labels query items) and
    ``select_batch_size``, and implement :meth:`train` and :meth:`evaluate` (both taking a
    :class:`~taskal.queries.LabelState` for region-query runs).
    """

    cfg: Any
    pool: Any
    strategies: list[tuple[str, QueryStrategy]]
    query_kinds: Mapping[str, str] = MappingProxyType({})
    #: extra :class:`~taskal.selector.Selector` arguments of region-query runs (caps).
    region_options: Mapping[str, object] = MappingProxyType({})
    select_batch_size: int = 256
    desc: str = "simulate"

    @property
    def region_budget(self) -> float:
        """Annotation cost region-query runs buy per round (``cfg.region_budget``)."""
        return float(self.cfg.region_budget)

    def check_pool_size(self) -> None:
        """Fail before any training when the pool cannot feed every round."""
        cfg = self.cfg
        needed = cfg.initial + cfg.rounds * cfg.budget
        if needed > len(self.pool.ids):
            raise ValueError(
                f"initial {cfg.initial} + rounds {cfg.rounds} x budget {cfg.budget} = {needed} "
                f"labels, but the pool holds only {len(self.pool.ids)} items; lower rounds or "
                "budget"
            )

    def train(self, strategy: QueryStrategy, labeled: Labeled, seed: int, r: int) -> Adapter:
        """A fresh model trained on ``labeled`` for round ``r``."""
        raise NotImplementedError

    def evaluate(self, adapter: Adapter) -> float:
        """The curve's metric on the held-out split."""
        raise NotImplementedError

    def extra_metrics(self) -> dict[str, float]:
        """More metrics of the model :meth:`evaluate` just scored, recorded beside
        ``metric`` in the curve (none by default)."""
        return {}

    def annotation_cost(self, labeled: Labeled) -> float | None:
        """What labeling ``labeled`` cost (recorded as the curve's ``cost``); ``None`` when
        the task counts labels only."""
        return None

    def run(self) -> list[dict[str, Any]]:
        """All runs as ``{"strategy", "seed", "curve"}`` dicts."""
        total = len(self.strategies) * len(self.cfg.seeds) * (self.cfg.rounds + 1)
        runs = []
        with tqdm(total=total, desc=self.desc, disable=not self.cfg.progress) as bar:
            for seed in self.cfg.seeds:
                for label, strategy in self.strategies:
                    bar.set_postfix_str(f"{label} seed={seed}")
                    curve = self.run_one(strategy, seed, bar, label)
                    runs.append({"strategy": label, "seed": seed, "curve": curve})
        return runs

    def initial_labeled(self, seed: int) -> list[ItemId]:
        g = torch.Generator().manual_seed(seed)
        rows = torch.randperm(len(self.pool.ids), generator=g)[: self.cfg.initial]
        return [self.pool.ids[int(r)] for r in rows]

    def record_queries(self, label: str, seed: int, r: int, queries: list[Query]) -> None:
        """Called with every round's queries (a task may write them out); does nothing."""

    def run_one(
        self, strategy: QueryStrategy, seed: int, bar: Any = None, label: str = ""
    ) -> list[dict[str, Any]]:
        cfg = self.cfg
        query = self.query_kinds.get(label, "item")
        labeled = self.initial_labeled(seed)
        # region queries: full labels of the initial items, then regions answered per round
        state = LabelState(full=set(labeled)) if query == "region" else None
        budget = cfg.budget if state is None else self.region_budget
        options = dict(self.region_options) if query == "region" else {}
        curve = []
        for r in range(cfg.rounds + 1):
            current: Labeled = list(labeled) if state is None else state.copy()
            t0 = time.perf_counter()
            adapter = self.train(strategy, current, seed, r)
            train_seconds = time.perf_counter() - t0
            metric = self.evaluate(adapter)
            extra = self.extra_metrics()
            select_seconds = 0.0
            if r < cfg.rounds:
                t1 = time.perf_counter()
                queries, _ = select_round(
                    adapter,
                    strategy,
                    self.pool,
                    current,
                    budget,
                    seed,
                    r,
                    query=query,
                    batch_size=self.select_batch_size,
                    options=options,
                )
                select_seconds = time.perf_counter() - t1
                self.record_queries(label or type(strategy).__name__, seed, r, queries)
                if state is None:
                    labeled = labeled + [q.item for q in queries]
                else:
                    state.add(queries)
            point: dict[str, Any] = {
                "labeled": len(current) if isinstance(current, list) else len(current.items()),
                "metric": metric,
                "select_seconds": select_seconds,
                "train_seconds": train_seconds,
                **extra,
            }
            if isinstance(current, LabelState):
                point["regions"] = sum(len(v) for v in current.partial.values())
            if (cost := self.annotation_cost(current)) is not None:
                point["cost"] = cost
            curve.append(point)
            if bar is not None:
                bar.update(1)
        return curve
