"""The task-agnostic selector: gather what a strategy needs over the pool, then select."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Any, Protocol

import torch
from tqdm import tqdm

from taskal.functional import check_budget
from taskal.registry import QUERY_STRATEGIES, build
from taskal.strategies.base import QueryStrategy
from taskal.types import Adapter, Batch, ItemId, PoolOutputs, Predictions


class ItemSource(Protocol):
    """Anything that yields batches of items by id (e.g. :class:`taskal.data.TensorPool`)."""

    ids: list[ItemId]

    def batches(self, ids: Sequence[ItemId], batch_size: int) -> Iterator[Batch]: ...


def build_strategy(cfg: dict[str, Any] | str | QueryStrategy) -> QueryStrategy:
    """Build a strategy from a config dict or a registered name."""
    if isinstance(cfg, QueryStrategy):
        return cfg
    if isinstance(cfg, str):
        cfg = {"type": cfg}
    strategy = build(QUERY_STRATEGIES, cfg)
    if not isinstance(strategy, QueryStrategy):
        raise TypeError(f"{cfg['type']!r} built a {type(strategy).__name__}, not a QueryStrategy")
    return strategy


class Selector:
    """Apply one query strategy to an adapter over a pool.

    Args:
        strategy: a :class:`QueryStrategy`, a registered name, or a config dict.
        batch_size: items per forward pass while scoring.
        progress: show a progress bar while scoring the pool.
    """

    def __init__(
        self,
        strategy: QueryStrategy | dict[str, Any] | str,
        batch_size: int = 256,
        progress: bool = True,
    ) -> None:
        self.strategy = build_strategy(strategy)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.progress = progress

    def select(
        self,
        adapter: Adapter,
        source: ItemSource,
        labeled: Collection[ItemId],
        budget: int,
        generator: torch.Generator | None = None,
    ) -> list[ItemId]:
        """Return ``budget`` unique ids from ``source`` that are not in ``labeled``.

        ``generator`` decides everything random: MC-dropout masks and the strategy's draws.

        Raises:
            ValueError: for an empty unlabeled pool, a budget larger than the pool, or a
                strategy that returns invalid positions.
        """
        labeled_set = set(labeled)
        unknown = labeled_set.difference(source.ids)
        if unknown:
            examples = sorted(map(str, unknown))[:3]
            raise KeyError(f"{len(unknown)} labeled ids are not in the pool, e.g. {examples}")
        candidates = [i for i in source.ids if i not in labeled_set]
        check_budget(budget, len(candidates))
        labeled_ids = [i for i in source.ids if i in labeled_set]
        # MC-dropout masks come from torch's global RNG: seed it from the generator inside a
        # forked RNG state, so the same generator gives the same picks and callers' global
        # state is untouched.
        seed = int(torch.randint(2**62, (1,), generator=generator))
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            outputs = self.gather(adapter, source, candidates, labeled_ids)
        positions = self.strategy.select(outputs, budget, generator)
        return self._check_positions(positions, len(candidates), budget, candidates)

    def gather(
        self,
        adapter: Adapter,
        source: ItemSource,
        candidates: Sequence[ItemId],
        labeled: Sequence[ItemId] = (),
    ) -> PoolOutputs:
        """Collect the adapter outputs that the strategy declares in ``needs``."""
        needs = self.strategy.needs
        sampling = self.strategy.sampling
        if sampling == "ensemble" and not hasattr(adapter, "members"):
            raise ValueError(
                f"{type(self.strategy).__name__} scores a deep ensemble: pass an "
                "EnsembleAdapter (taskal.adapters.EnsembleAdapter) of trained members"
            )
        n_samples = self.strategy.n_samples if sampling == "mc_dropout" else 1
        probs, owners, boxes, embeds, losses = [], [], [], [], []
        offset = 0
        batches = source.batches(candidates, self.batch_size)
        desc = f"scoring pool ({type(self.strategy).__name__})"
        total = -(-len(candidates) // self.batch_size)
        for batch in tqdm(batches, desc=desc, total=total, disable=not self.progress, leave=False):
            if "probs" in needs:
                pred = adapter.predict(batch, n_samples=n_samples)
                probs.append(pred.probs_UCK.cpu())
                owners.append(pred.owner_U.cpu() + offset)
                if pred.boxes_U4 is not None:
                    boxes.append(pred.boxes_U4.cpu())
            if "embeddings" in needs:
                embeds.append(adapter.embed(batch).cpu())
            if "loss_pred" in needs:
                losses.append(adapter.predict_loss(batch).cpu())
            offset += len(batch)
        outputs = PoolOutputs(list(candidates))
        if probs:
            outputs.predictions = Predictions(
                torch.cat(probs), torch.cat(owners), torch.cat(boxes) if boxes else None
            )
        if embeds:
            outputs.embeddings_ND = torch.cat(embeds)
        if losses:
            outputs.loss_pred_N = torch.cat(losses)
        if "labeled_embeddings" in needs:
            parts = [adapter.embed(b).cpu() for b in source.batches(labeled, self.batch_size)]
            dim = outputs.embeddings_ND.shape[1] if outputs.embeddings_ND is not None else 0
            outputs.labeled_embeddings_LD = torch.cat(parts) if parts else torch.zeros(0, dim)
        return outputs

    def _check_positions(
        self, positions: torch.Tensor, num: int, budget: int, candidates: Sequence[ItemId]
    ) -> list[ItemId]:
        name = type(self.strategy).__name__
        pos = positions.long().cpu().tolist()
        if len(pos) != budget:
            raise ValueError(f"{name} returned {len(pos)} items for a budget of {budget}")
        if len(set(pos)) != len(pos):
            raise ValueError(f"{name} returned duplicate items")
        if pos and (min(pos) < 0 or max(pos) >= num):
            raise ValueError(f"{name} returned positions outside [0, {num})")
        return [candidates[i] for i in pos]
