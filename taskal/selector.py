"""The task-agnostic selector: stream a strategy over the pool, then select under a budget.

Selection streams in bounded memory. Per batch the selector strips the labels
(:meth:`Batch.without_labels`), asks the adapter for what the strategy requires, validates
the probabilities and lets the strategy reduce unit outputs (boxes, pixels) to one score per
item before the next batch. What is kept grows with the pool's *item* count (a score, an
embedding, a predicted loss per item), never with its pixel or anchor count. For region
queries the unit scores are reduced to region scores per batch and only the best regions
(enough to spend the budget twice over) are kept.

Item queries can also be scored by several processes (``torchrun``; each scores every
``W``-th batch and the results are gathered, :mod:`taskal.distributed`) and cached on disk
batch by batch so that a killed run resumes without scoring again what it finished
(``cache_dir``, :mod:`taskal.streaming`). Each batch draws its MC-dropout masks from a seed
of its own, so both give the queries of one uninterrupted process.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from taskal import distributed
from taskal.functional import check_budget, check_probs, foreground, region_class_counts
from taskal.functional.reduction import REDUCTIONS
from taskal.queries import LabelState, Query
from taskal.regions import RegionBuffer, empty_boxes, region_boxes, unlabeled_regions
from taskal.registry import QUERY_STRATEGIES, build
from taskal.seeds import mix_seed
from taskal.strategies.base import QueryStrategy
from taskal.streaming import Chunk, ChunkCache, batch_spans, ids_digest, shard
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

    def write_chunk(self, start: int, chunk: Chunk) -> None:
        for name, values in chunk.items():
            self.write(name, start, values)

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
        cache_dir: item queries: write every scored batch into this folder at once and,
            when a run is repeated after an interruption, load the batches found there
            instead of scoring them again (the same candidates, strategy, batch size, seed
            and model; anything else clears the folder first). ``None``: keep it in memory.
        cache_key: what else the cached results depend on (a config's digest, a test
            transform); the fingerprint already holds the candidates, the batch size, the
            seed, the strategy's settings, the adapter's weights and its plain settings.
        distributed: item queries: split the scoring over the ranks of the initialised
            ``torch.distributed`` process group (every rank must call :meth:`select` with
            the same arguments; each scores every ``W``-th batch, all get the same
            queries). ``False`` (default): this process scores everything, group or not.
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
        cache_dir: str | os.PathLike[str] | None = None,
        cache_key: str | None = None,
        distributed: bool = False,
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
        if cache_dir is not None and query == "region":
            raise ValueError(
                "cache_dir caches per-item results of item queries; region queries keep only "
                "the best regions while streaming: leave cache_dir unset"
            )
        if distributed and query == "region":
            raise ValueError(
                "region queries are scored by one process (the best regions are kept while "
                "streaming); leave distributed=False"
            )
        self.cache_dir = cache_dir
        self.cache_key = cache_key
        self.distributed = distributed
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
        # MC-dropout masks come from torch's global RNG: each batch seeds it from this seed
        # and its index (in a forked RNG state), so the same generator gives the same picks
        # and the caller's global state is untouched.
        seed = int(torch.randint(2**62, (1,), generator=generator))
        buffer = (
            RegionBuffer(float(budget), self.max_item_share, self.max_class_share)
            if self.query == "region"
            else None
        )
        outputs = self.stream(
            adapter, source, candidates, labeled_ids, buffer, state, generator, seed
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
        seed: int | None = None,
    ) -> PoolOutputs:
        """Score ``candidates`` batch by batch into per-item :class:`PoolOutputs`.

        Labels never reach the adapter: every batch passes through
        :meth:`Batch.without_labels` first. Batch ``b`` seeds torch's RNG (forked) with
        ``mix_seed(seed, b)``; ``seed=None`` draws it from ``generator``. With
        ``distributed=True`` in a process group every rank scores its share of the batches
        and gets everything back.
        """
        strategy = self.strategy
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        if seed is None:
            seed = int(torch.randint(2**62, (1,), generator=generator))
        # region queries rank regions, so they need unit probabilities and no item scores
        needs = strategy.needs if regions is None else frozenset({"probs"})
        if strategy.sampling == "ensemble" and not hasattr(adapter, "members"):
            raise ValueError(
                f"{type(strategy).__name__} scores a deep ensemble: pass an EnsembleAdapter "
                "(taskal.adapters.EnsembleAdapter) of trained members"
            )
        n_samples = strategy.n_samples if strategy.sampling != "deterministic" else 1
        background = getattr(adapter, "background", None)
        quality = _class_quality(adapter, strategy) if "class_quality" in needs else None
        cache = None
        if self.cache_dir is not None:
            fingerprint = self._fingerprint(adapter, candidates, labeled, seed)
            cache = ChunkCache(self.cache_dir, fingerprint, shared=self.distributed)
            cache.open()

        def score(batch: Batch, start: int) -> Chunk:
            batch = batch.without_labels(self.keep_meta)
            out = BatchOutputs(list(batch.ids), background=background)
            out.class_quality_C = quality
            chunk: Chunk = {}
            predicts = bool(needs & {"probs", "item_probs", "item_class"})
            if predicts and "embeddings" in needs and hasattr(adapter, "predict_and_embed"):
                out.predictions, embeddings = adapter.predict_and_embed(batch, n_samples)
                out.embeddings_BD = embeddings.detach().cpu()
            elif predicts:
                out.predictions = adapter.predict(batch, n_samples=n_samples)
            elif "embeddings" in needs:
                out.embeddings_BD = adapter.embed(batch).detach().cpu()
            if out.predictions is not None:
                check_probs(out.predictions.probs_UCK, out.predictions.kind)
            if "loss_pred" in needs:
                out.loss_pred_B = adapter.predict_loss(batch).detach().cpu()
                chunk["losses"] = out.loss_pred_B
            if "item_probs" in needs:
                chunk["probs"] = _item_probs(out.predictions, len(batch), strategy, background)
            if "item_class" in needs:
                chunk["classes"] = _item_classes(out.predictions, len(batch), background)
            if out.embeddings_BD is not None:
                chunk["embeds"] = out.embeddings_BD
            if regions is not None and out.predictions is not None:
                self._push_regions(
                    regions, out.predictions, start, candidates, state, generator, background
                )
            elif (scores := strategy.score_batch(out)) is not None:
                chunk["scores"] = scores.detach().cpu()
            return chunk

        acc = _Stream(len(candidates))
        desc = f"scoring pool ({type(strategy).__name__})"
        self._pass("pool", source, candidates, score, acc, seed, cache, desc)
        outputs = acc.outputs(list(candidates))
        if "labeled_embeddings" in needs:

            def embed(batch: Batch, start: int) -> Chunk:
                return {"embeds": adapter.embed(batch.without_labels(self.keep_meta)).cpu()}

            known = _Stream(len(labeled))
            self._pass("labeled", source, labeled, embed, known, seed, cache, "embedding labeled")
            dim = outputs.embeddings_ND.shape[1] if outputs.embeddings_ND is not None else 0
            emb = known.fields.get("embeds")
            outputs.labeled_embeddings_LD = emb if emb is not None else torch.zeros(0, dim)
        return outputs

    def _pass(
        self,
        name: str,
        source: ItemSource,
        ids: Sequence[ItemId],
        step: Callable[[Batch, int], Chunk],
        acc: _Stream,
        seed: int,
        cache: ChunkCache | None,
        desc: str,
    ) -> None:
        """Run ``step(batch, start)`` over this rank's batches of ``ids`` (those not cached
        yet) into ``acc``, then gather the other ranks' batches into it."""
        rank, size = distributed.world() if self.distributed else (0, 1)
        spans = batch_spans(len(ids), self.batch_size)
        if size > 1:  # every rank must cut the same ids into the same batches
            mine_key = (name, len(ids), self.batch_size, seed, ids_digest(ids))
            if any(k != mine_key for k in distributed.all_gather(mine_key)):
                raise ValueError(
                    f"the ranks disagree on what to score ({name} pass): every rank must call "
                    "select() with the same pool, labeled items, budget, batch size and "
                    "generator"
                )
        mine = shard(len(spans), rank, size)
        kept: dict[int, Chunk] = {}
        todo = []
        for b in mine:
            chunk = cache.load(name, b) if cache is not None else None
            if chunk is None:
                todo.append(b)
                continue
            acc.write_chunk(spans[b][0], chunk)
            if size > 1:
                kept[b] = chunk
        todo_ids = [i for b in todo for i in ids[spans[b][0] : spans[b][1]]]
        shown = self.progress and rank == 0
        if size > 1:
            desc = f"{desc}, rank 0 of {size}"
        done = len(mine) - len(todo)
        bar = tqdm(total=len(mine), initial=done, desc=desc, leave=False, disable=not shown)
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices), bar:
            batches = iter(source.batches(todo_ids, self.batch_size))
            for b in todo:
                start, stop = spans[b]
                batch = next(batches, None)
                if batch is None:
                    raise ValueError(
                        f"the item source stopped before the batch starting at position {start} "
                        f"of the {len(ids)} requested ids; its batches(ids, batch_size) must "
                        "yield the requested ids in the requested order, batch_size at a time"
                    )
                if list(batch.ids) != list(ids[start:stop]):
                    raise ValueError(
                        "the item source yielded ids out of order (at position "
                        f"{start}); its batches(ids, batch_size) must yield the requested ids "
                        "in the requested order, batch_size at a time"
                    )
                torch.manual_seed(mix_seed(seed, b))
                chunk = step(batch, start)
                acc.write_chunk(start, chunk)
                if cache is not None:
                    cache.save(name, b, chunk)
                if size > 1:
                    kept[b] = chunk
                bar.update(1)
            if next(batches, None) is not None:
                raise ValueError(
                    f"the item source yielded more than the {len(ids)} requested ids; its "
                    "batches(ids, batch_size) must yield the requested ids in the requested order"
                )
        if size > 1:
            for part in distributed.all_gather(kept):
                for b, chunk in part.items():
                    if b % size != rank:
                        acc.write_chunk(spans[b][0], chunk)

    def _fingerprint(
        self,
        adapter: Adapter,
        candidates: Sequence[ItemId],
        labeled: Sequence[ItemId],
        seed: int,
    ) -> dict[str, Any]:
        """What the cached batches depend on."""
        return {
            "candidates": ids_digest(candidates),
            "labeled": ids_digest(labeled),
            "batch_size": self.batch_size,
            "seed": seed,
            "strategy": _describe(self.strategy),
            "keep_meta": sorted(self.keep_meta),
            "adapter": type(adapter).__qualname__,
            "adapter_settings": _plain_settings(adapter),
            "model": weights_digest(adapter),
            "key": self.cache_key,
        }

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


def _describe(obj: object) -> str:
    """An object's class and settings as text: its attributes, recursively for strategies
    inside strategies (``repr`` alone may leave settings out)."""
    fields = {
        k: _describe(v) if isinstance(v, QueryStrategy) else repr(v)
        for k, v in sorted(vars(obj).items())
    }
    return f"{type(obj).__module__}.{type(obj).__qualname__}({fields})"


def _plain_settings(adapter: Adapter) -> dict[str, str]:
    """An adapter's public attributes that are plain values (dropout ``p``, input shape,
    IoUs...); private ones may be caches that change from call to call."""
    plain = (bool, int, float, str, tuple, type(None))
    items = sorted(vars(adapter).items())
    return {k: repr(v) for k, v in items if not k.startswith("_") and isinstance(v, plain)}


def weights_digest(adapter: Adapter) -> str:
    """A digest of an adapter's weights and buffers (an ensemble's members', a loss
    predictor's included): the model a cache of its scores belongs to."""
    members = getattr(adapter, "members", None) or [adapter]
    h = hashlib.sha256()
    for member in members:
        modules = [getattr(member, "model", None), getattr(member, "loss_predictor", None)]
        for module in modules:
            if not isinstance(module, torch.nn.Module):
                continue
            for key, value in module.state_dict().items():
                h.update(key.encode())
                if isinstance(value, Tensor):
                    h.update(str(value.dtype).encode())
                    data = value.detach().cpu().contiguous()
                    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
