"""The task-agnostic selector: stream a strategy over the pool, then select under a budget.

Selection streams in bounded memory. Per batch the selector strips the labels
(:meth:`Batch.without_labels`), asks the adapter for what the strategy requires, validates
the probabilities and lets the strategy reduce unit outputs (boxes, pixels) to one score per
item before the next batch. What is kept grows with the pool's *item* count (a score, an
embedding, a predicted loss per item), never with its pixel or anchor count. For region
queries the unit scores are reduced to region scores per batch and only the best regions
(enough to spend the budget twice over) are kept.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Collection, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from taskal.functional import check_budget, check_probs, foreground, region_class_counts
from taskal.functional.reduction import REDUCTIONS
from taskal.queries import LabelState, Query
from taskal.regions import RegionBuffer, empty_boxes, region_boxes, unlabeled_regions
from taskal.registry import QUERY_STRATEGIES, build
from taskal.strategies.base import QueryStrategy
from taskal.types import (
    META_KEYS,
    Adapter,
    Batch,
    BatchOutputs,
    ItemId,
    PoolOutputs,
    Predictions,
)

QUERY_KINDS = ("item", "region")


class ItemSource(Protocol):
    """Anything that yields batches of items by id (e.g. :class:`taskal.data.TensorPool`)."""

    ids: list[ItemId]

    def batches(self, ids: Sequence[ItemId], batch_size: int) -> Iterator[Batch]: ...


def build_strategy(cfg: dict[str, Any] | str | QueryStrategy) -> QueryStrategy:
    """Build a strategy from a config dict or a registered name.

    An argument the strategy does not take (``n_samples`` for core-set, say) fails here
    with the list of the arguments it does take, before any scoring.
    """
    if isinstance(cfg, QueryStrategy):
        return cfg
    if isinstance(cfg, str):
        cfg = {"type": cfg}
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise TypeError(f"a strategy must be a name or a dict with a 'type' key, got {cfg!r}")
    QUERY_STRATEGIES.import_from_location()
    cls = QUERY_STRATEGIES.get(cfg["type"]) if isinstance(cfg["type"], str) else cfg["type"]
    if inspect.isclass(cls):
        init = cls.__init__
        params = {} if init is object.__init__ else dict(inspect.signature(init).parameters)
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            accepted = [n for n in params if n != "self"]
            unknown = sorted(set(cfg) - {"type"} - set(accepted))
            if unknown:
                raise ValueError(
                    f"strategy {cfg['type']!r} does not take {unknown}; it accepts "
                    f"{accepted or 'no arguments'}"
                )
    strategy = build(QUERY_STRATEGIES, cfg)
    if not isinstance(strategy, QueryStrategy):
        raise TypeError(f"{cfg['type']!r} built a {type(strategy).__name__}, not a QueryStrategy")
    return strategy


class _Stream:
    """Per-item results, written batch by batch into buffers sized for the whole pool.

    The buffers are allocated once (on the first batch that fills them), so scoring a pool
    leaves no small allocation behind per batch: with glibc's allocator, such leftovers
    between the large per-batch unit tensors keep freed heap memory resident, and peak RSS
    would creep up with the number of batches.
    """

    def __init__(self, num_items: int) -> None:
        self.num_items = num_items
        self.fields: dict[str, Tensor] = {}

    def write(self, name: str, start: int, values: Tensor) -> None:
        values = values.detach().cpu()
        buffer = self.fields.get(name)
        if buffer is None:
            shape = (self.num_items, *values.shape[1:])
            dtype = torch.float64 if name == "scores" else values.dtype
            buffer = self.fields[name] = torch.empty(shape, dtype=dtype)
        buffer[start : start + values.shape[0]] = values

    def outputs(self, ids: list[ItemId]) -> PoolOutputs:
        get = self.fields.get
        return PoolOutputs(
            ids,
            scores_N=get("scores"),
            probs_NC=get("probs"),
            embeddings_ND=get("embeds"),
            loss_pred_N=get("losses"),
            classes_N=get("classes"),
        )


class Selector:
    """Apply one query strategy to an adapter over a pool.

    Args:
        strategy: a :class:`QueryStrategy`, a registered name, or a config dict.
        batch_size: items per forward pass while scoring.
        progress: show a progress bar while scoring the pool.
        query: ``"item"`` (label whole images; the budget counts items) or ``"region"``
            (label regions: boxes, superpixels, patches, as the adapter's ``region_U``
            defines them; the budget counts annotation cost, ``cost_U`` summed per region).
        keep_meta: metainfo keys of your own that adapters may see during selection, on top
            of :data:`taskal.types.META_KEYS` (everything else in a data sample is stripped).
        max_item_share: region queries: the largest share of the budget one item's regions
            may take, so one image cannot take it all (``None``: no cap).
        max_class_share: region queries: the largest share one predicted class may take (a
            region's class is the one most of its units are predicted as, background
            columns of detectors left out; ``None``: no cap).
    """

    def __init__(
        self,
        strategy: QueryStrategy | dict[str, Any] | str,
        batch_size: int = 256,
        progress: bool = True,
        query: str = "item",
        keep_meta: Collection[str] = (),
        max_item_share: float | None = None,
        max_class_share: float | None = None,
    ) -> None:
        self.strategy = build_strategy(strategy)
        self.keep_meta = META_KEYS | frozenset(keep_meta)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if query not in QUERY_KINDS:
            raise ValueError(f"unknown query kind {query!r}; choose one of {QUERY_KINDS}")
        if query not in self.strategy.query_kinds:
            raise ValueError(
                f"{type(self.strategy).__name__} ranks {' or '.join(self.strategy.query_kinds)} "
                f"queries only; use Selector(query={self.strategy.query_kinds[0]!r})"
            )
        if query == "region":
            probe = Predictions(torch.full((1, 2, 1), 0.5), torch.zeros(1, dtype=torch.long))
            # raises for strategies without unit scores
            self.strategy.region_unit_scores(probe, torch.Generator())
            if self.strategy.reduction not in REDUCTIONS:
                raise ValueError(
                    f"reduction {self.strategy.reduction!r} turns units into an item score; "
                    f"region queries reduce a region's units with one of {REDUCTIONS}"
                )
        for name, share in (
            ("max_item_share", max_item_share),
            ("max_class_share", max_class_share),
        ):
            if share is None:
                continue
            if query != "region":
                raise ValueError(f"{name} caps region queries; item queries take no {name}")
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
                raise ValueError(f"{name} must lie in (0, 1] or be None, got {share!r}")
        self.max_item_share = max_item_share
        self.max_class_share = max_class_share
        self.batch_size = batch_size
        self.progress = progress
        self.query = query
        #: the last :meth:`select`'s scores: per candidate item (item queries; ``None`` for
        #: strategies that score no items, e.g. core-set), or of the best regions kept
        #: while streaming (region queries)
        self.last_scores: Tensor | None = None

    def select(
        self,
        adapter: Adapter,
        source: ItemSource,
        labeled: LabelState | Collection[ItemId],
        budget: float,
        generator: torch.Generator | None = None,
    ) -> list[Query]:
        """Return queries whose costs add up to at most ``budget``.

        Item queries: ``budget`` unique items not yet labeled. Region queries: regions of
        items not fully labeled, skipping regions already labeled and boxes without area,
        best first, while their cost fits the budget.

        ``generator`` decides everything random (MC-dropout masks, ties, random picks); with
        ``None`` a generator seeded 0 is used, so the same call gives the same queries and
        the caller's global RNG is left untouched.

        Raises:
            ValueError: for an empty unlabeled pool, a budget larger than the pool, or a
                strategy that returns invalid positions.
        """
        state = LabelState.of(labeled)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        known = set(source.ids)
        unknown = state.items().difference(known)
        if unknown:
            examples = sorted(map(str, unknown))[:3]
            raise KeyError(f"{len(unknown)} labeled ids are not in the pool, e.g. {examples}")
        done = state.full if self.query == "region" else state.items()
        candidates = [i for i in source.ids if i not in done]
        if self.query == "item":
            budget = check_budget(budget, len(candidates))  # type: ignore[arg-type]
        elif not candidates:
            check_budget(1, 0)
        elif not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
            raise ValueError(f"budget must be a positive annotation cost, got {budget!r}")
        labeled_set = state.items()
        labeled_ids = [i for i in source.ids if i in labeled_set]
        # MC-dropout masks come from torch's global RNG: seed it from the generator inside a
        # forked RNG state, so the same generator gives the same picks and the caller's
        # global state is untouched.
        seed = int(torch.randint(2**62, (1,), generator=generator))
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            buffer = (
                RegionBuffer(float(budget), self.max_item_share, self.max_class_share)
                if self.query == "region"
                else None
            )
            outputs = self.stream(
                adapter, source, candidates, labeled_ids, buffer, state, generator
            )
        if buffer is not None:
            self.last_scores = buffer.score.clone()
            return buffer.queries(candidates)
        self.last_scores = None if outputs.scores_N is None else outputs.scores_N.clone()
        positions = self.strategy.select(outputs, int(budget), generator)
        pos = self._check_positions(positions, len(candidates), int(budget))
        scores = outputs.scores_N
        return [
            Query(candidates[i], score=math.nan if scores is None else float(scores[i]))
            for i in pos
        ]

    def stream(
        self,
        adapter: Adapter,
        source: ItemSource,
        candidates: Sequence[ItemId],
        labeled: Sequence[ItemId] = (),
        regions: RegionBuffer | None = None,
        state: LabelState | None = None,
        generator: torch.Generator | None = None,
    ) -> PoolOutputs:
        """Score ``candidates`` batch by batch into per-item :class:`PoolOutputs`.

        Labels never reach the adapter: every batch passes through
        :meth:`Batch.without_labels` first.
        """
        strategy = self.strategy
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        # region queries rank regions, so they need unit probabilities and no item scores
        needs = strategy.needs if regions is None else frozenset({"probs"})
        if strategy.sampling == "ensemble" and not hasattr(adapter, "members"):
            raise ValueError(
                f"{type(strategy).__name__} scores a deep ensemble: pass an EnsembleAdapter "
                "(taskal.adapters.EnsembleAdapter) of trained members"
            )
        n_samples = strategy.n_samples if strategy.sampling != "deterministic" else 1
        acc = _Stream(len(candidates))
        background = getattr(adapter, "background", None)
        quality = _class_quality(adapter, strategy) if "class_quality" in needs else None
        offset = 0
        total = -(-len(candidates) // self.batch_size)
        desc = f"scoring pool ({type(strategy).__name__})"
        batches = source.batches(candidates, self.batch_size)
        for batch in tqdm(batches, desc=desc, total=total, disable=not self.progress, leave=False):
            expected = candidates[offset : offset + len(batch)]
            if list(batch.ids) != list(expected):
                raise ValueError(
                    "the item source yielded ids out of order (at position "
                    f"{offset}); its batches(ids, batch_size) must yield the requested ids "
                    "in the requested order"
                )
            batch = batch.without_labels(self.keep_meta)
            out = BatchOutputs(list(batch.ids), background=background)
            out.class_quality_C = quality
            if needs & {"probs", "item_probs", "item_class"}:
                out.predictions = adapter.predict(batch, n_samples=n_samples)
                check_probs(out.predictions.probs_UCK, out.predictions.kind)
            if needs & {"embeddings"}:
                out.embeddings_BD = adapter.embed(batch).detach().cpu()
            if "loss_pred" in needs:
                out.loss_pred_B = adapter.predict_loss(batch).detach().cpu()
                acc.write("losses", offset, out.loss_pred_B)
            if "item_probs" in needs:
                probs = _item_probs(out.predictions, len(batch), strategy, out.background)
                acc.write("probs", offset, probs)
            if "item_class" in needs:
                classes = _item_classes(out.predictions, len(batch), out.background)
                acc.write("classes", offset, classes)
            if out.embeddings_BD is not None:
                acc.write("embeds", offset, out.embeddings_BD)
            if regions is not None and out.predictions is not None:
                self._push_regions(
                    regions, out.predictions, offset, candidates, state, generator, background
                )
            elif (scores := strategy.score_batch(out)) is not None:
                acc.write("scores", offset, scores)
            offset += len(batch)
        if offset != len(candidates):
            raise ValueError(
                f"the item source yielded {offset} items for {len(candidates)} requested ids; "
                "its batches(ids, batch_size) must yield the requested ids in the requested order"
            )
        outputs = acc.outputs(list(candidates))
        if "labeled_embeddings" in needs:
            parts = [
                adapter.embed(b.without_labels(self.keep_meta)).detach().cpu()
                for b in source.batches(labeled, self.batch_size)
            ]
            dim = outputs.embeddings_ND.shape[1] if outputs.embeddings_ND is not None else 0
            outputs.labeled_embeddings_LD = torch.cat(parts) if parts else torch.zeros(0, dim)
        return outputs

    def _push_regions(
        self,
        buffer: RegionBuffer,
        p: Predictions,
        offset: int,
        candidates: Sequence[ItemId],
        state: LabelState | None,
        generator: torch.Generator,
        background: int | None = None,
    ) -> None:
        strategy = self.strategy
        scores_U = strategy.region_unit_scores(p, generator).detach().cpu().double()
        owner_R, region_R, score_R, cost_R = strategy.reduce_regions(p, scores_U)
        score_R = strategy.region_scores(score_R, generator)
        if not bool((cost_R > 0).all()):
            raise ValueError(
                "every region needs a positive annotation cost; the adapter's cost_U gave a "
                "region of cost <= 0"
            )
        if not torch.isfinite(score_R).all():
            raise ValueError(f"{type(strategy).__name__} gave NaN/inf region scores")
        box_R4 = region_boxes(p, owner_R, region_R)
        keep = unlabeled_regions(owner_R, region_R, offset, candidates, state, box_R4)
        keep &= ~empty_boxes(box_R4)
        class_R = None
        if buffer.max_class_share is not None:
            class_R = _region_classes(p, background)[keep]
        buffer.push(
            score_R[keep],
            owner_R[keep] + offset,
            region_R[keep],
            cost_R[keep],
            box_R4[keep],
            generator,
            class_R,
        )

    def _check_positions(self, positions: Tensor, num: int, budget: int) -> list[int]:
        name = type(self.strategy).__name__
        pos = positions.long().cpu().tolist()
        if len(pos) != budget:
            raise ValueError(f"{name} returned {len(pos)} items for a budget of {budget}")
        if len(set(pos)) != len(pos):
            raise ValueError(f"{name} returned duplicate items")
        if pos and (min(pos) < 0 or max(pos) >= num):
            raise ValueError(f"{name} returned positions outside [0, {num})")
        return [int(i) for i in pos]


def _item_probs(
    p: Predictions | None, num_items: int, strategy: QueryStrategy, background: int | None = None
) -> Tensor:
    """``[B, C]`` image-level softmax probabilities (for BADGE).

    Image-level units (classification) give theirs directly. With several units per image
    (detection boxes, segmentation pixels) an image's distribution is the mean of its
    units' softmax vectors; an image without units (no detections) is all background,
    which needs a background column (Faster R-CNN-style heads). Sigmoid scores are no
    distribution and are refused.
    """
    name = type(strategy).__name__
    if p is None:
        raise ValueError(f"{name} needs predictions; none were gathered")
    if p.kind != "softmax":
        raise ValueError(
            f"{name} needs softmax probabilities, got {p.kind} scores (a dense detector's "
            "per-class sigmoids are no image-level distribution; use a two-stage detector "
            "or coreset)"
        )
    probs_UC = p.probs_UCK.mean(-1).detach().cpu()
    owner = p.owner_U.cpu()
    if p.num_units == num_items and torch.equal(owner, torch.arange(num_items)):
        return probs_UC
    probs_UC = probs_UC.float()
    sums = torch.zeros(num_items, probs_UC.shape[1]).index_add_(0, owner, probs_UC)
    counts = torch.bincount(owner, minlength=num_items)
    out = sums / counts.clamp_min(1).unsqueeze(1)
    empty = counts == 0
    if bool(empty.any()):
        if background is None:
            raise ValueError(
                f"{name} averages an image's units into one distribution, but "
                f"{int(empty.sum())} images have no units and the head has no background "
                "column to give them; use a head with a background class or coreset"
            )
        out[empty, background] = 1.0
    return out


def _region_classes(p: Predictions, background: int | None) -> Tensor:
    """``[R]`` the class most units of each region are predicted as (a unit's class: its most
    probable foreground class), in :func:`taskal.functional.reduce_regions`'s order."""
    probs_UC = p.probs_UCK.mean(-1).detach().cpu().clone()
    if background is not None:
        probs_UC[:, background] = -1.0
    counts_RC = region_class_counts(
        probs_UC.argmax(1), p.owner_U.cpu(), p.regions().cpu(), probs_UC.shape[1]
    )
    return counts_RC.argmax(1)


def _item_classes(p: Predictions | None, num_items: int, background: int | None) -> Tensor:
    """``[B]`` each item's dominant foreground class: the argmax of its units' summed
    foreground probabilities (sigmoid or softmax), ``-1`` for an item without units."""
    if p is None:
        raise ValueError("item classes need predictions; none were gathered")
    fg = foreground(p.probs_UCK.mean(-1).detach().float().cpu(), background)
    owner = p.owner_U.cpu()
    mass = torch.zeros(num_items, fg.shape[1]).index_add_(0, owner, fg)
    classes = mass.argmax(1)
    classes[torch.bincount(owner, minlength=num_items) == 0] = -1
    return classes


def _class_quality(adapter: Adapter, strategy: QueryStrategy) -> Tensor:
    """The adapter's per-class quality, with a fix in the message when it has none."""
    quality = getattr(adapter, "class_quality", None)
    if quality is None:
        raise ValueError(
            f"{type(strategy).__name__} weights uncertainty by per-class difficulty, but "
            "the adapter has no class_quality: set adapter.class_quality = "
            "taskal.evaluation.class_quality(adapter, pool, labeled_ids) after training"
        )
    return torch.as_tensor(quality).detach().float().cpu()
