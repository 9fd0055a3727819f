"""The round loop every simulation shares: train, measure, select, label, repeat.

Every (strategy, seed) run starts from the same seed-dependent initial labeled set, and
its models start from the same seed-dependent initialisation each round, so curves differ
only by what the strategies select. A task's simulation provides :meth:`RoundLoop.train`
and :meth:`RoundLoop.evaluate`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm import tqdm

from taskal.queries import Query
from taskal.selector import Selector
from taskal.strategies.base import QueryStrategy
from taskal.types import Adapter, ItemId


def mix_seed(*parts: int) -> int:
    """A deterministic seed from several integers."""
    value = 0x9E3779B9
    for p in parts:
        value = (value * 1_000_003 + int(p) + 1) % (2**61 - 1)
    return value


class RoundLoop:
    """Run ``cfg.rounds`` rounds of every (strategy, seed) over ``pool``.

    Subclasses set ``cfg`` (with ``initial``, ``budget``, ``rounds``, ``seeds``,
    ``progress``), ``pool`` (with ``ids`` and ``batches``), ``strategies`` (label, strategy
    pairs) and ``select_batch_size``, and implement :meth:`train` and :meth:`evaluate`.
    """

    cfg: Any
    pool: Any
    strategies: list[tuple[str, QueryStrategy]]
    select_batch_size: int = 256
    desc: str = "simulate"

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

    def train(self, strategy: QueryStrategy, labeled: list[ItemId], seed: int, r: int) -> Adapter:
        """A fresh model trained on ``labeled`` for round ``r``."""
        raise NotImplementedError

    def evaluate(self, adapter: Adapter) -> float:
        """The curve's metric on the held-out split."""
        raise NotImplementedError

    def annotation_cost(self, labeled: list[ItemId]) -> float | None:
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
        labeled = self.initial_labeled(seed)
        selector = Selector(strategy, batch_size=self.select_batch_size, progress=False)
        curve = []
        for r in range(cfg.rounds + 1):
            t0 = time.perf_counter()
            adapter = self.train(strategy, labeled, seed, r)
            train_seconds = time.perf_counter() - t0
            metric = self.evaluate(adapter)
            select_seconds = 0.0
            n_labeled = len(labeled)
            if r < cfg.rounds:
                t1 = time.perf_counter()
                g = torch.Generator().manual_seed(mix_seed(seed, r, 1))
                queries = selector.select(adapter, self.pool, labeled, cfg.budget, g)
                select_seconds = time.perf_counter() - t1
                self.record_queries(label or type(strategy).__name__, seed, r, queries)
                labeled = labeled + [q.item for q in queries]
            point = {
                "labeled": n_labeled,
                "metric": metric,
                "select_seconds": select_seconds,
                "train_seconds": train_seconds,
            }
            if (cost := self.annotation_cost(labeled[:n_labeled])) is not None:
                point["cost"] = cost
            curve.append(point)
            if bar is not None:
                bar.update(1)
        return curve
