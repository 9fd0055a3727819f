"""Base classes for query strategies: thin wrappers around :mod:`taskal.functional`.

A strategy declares what it needs from the adapter (``requires``) and how predictions must
be sampled (``sampling``). The :class:`~taskal.selector.Selector` streams over the pool:
for every batch it gathers what the strategy requires into :class:`BatchOutputs` and calls
:meth:`QueryStrategy.score_batch`, which reduces unit probabilities (boxes, pixels) to one
score per item before the next batch. :meth:`QueryStrategy.select` then picks from the
per-item :class:`PoolOutputs`. One direction everywhere: a higher score means "ask for this
label first"; ties are broken at random by the selection's generator.

What ``requires`` can hold:

==========================  ======================================================
``"probs"``                 unit probabilities, per batch (for ``score_batch``)
``"item_probs"``            mean class probabilities of image-level units ``[N, C]``
``"embeddings"``            pooled embeddings of the candidates ``[N, D]``
``"labeled_embeddings"``    pooled embeddings of the labeled items ``[L, D]``
``"loss_pred"``             predicted loss per candidate ``[N]`` (LLAL)
==========================  ======================================================
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from taskal.functional import reduce_regions, reduce_units, top_k
from taskal.functional.reduction import ITEM_REDUCTIONS
from taskal.types import BatchOutputs, PoolOutputs, Predictions

#: what a strategy can ask the selector to gather.
REQUIREMENTS = frozenset(
    {
        "probs",
        "item_probs",
        "item_class",
        "embeddings",
        "labeled_embeddings",
        "loss_pred",
        "class_quality",
    }
)
#: how predictions are sampled: one eval pass, MC dropout, or an ensemble's members.
SAMPLINGS = ("deterministic", "mc_dropout", "ensemble")


def check_n_samples(n_samples: object, minimum: int = 1, who: str = "strategy") -> int:
    """``n_samples`` as a positive int, at least ``minimum``; a clear error otherwise."""
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"{who}: n_samples must be a positive integer, got {n_samples!r}")
    if n_samples < minimum:
        raise ValueError(
            f"{who} needs MC-dropout samples: n_samples must be >= {minimum}, got {n_samples}"
        )
    return n_samples


class QueryStrategy:
    """Pick ``budget`` candidates from per-item :class:`PoolOutputs`.

    Subclasses set ``requires`` (and ``sampling`` where they sample) and implement
    :meth:`select`; score strategies implement :meth:`score_batch` instead. Arguments are
    validated in ``__init__`` so a bad config fails when built, not after scoring a pool.
    A strategy takes only the arguments it uses: ``n_samples`` belongs to the strategies
    that score probabilities.
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    #: samples per prediction (``K`` MC-dropout passes, or passes per ensemble member).
    n_samples: int = 1

    @property
    def sampling(self) -> str:
        """``"deterministic"``, ``"mc_dropout"`` or ``"ensemble"``."""
        return "deterministic"

    @property
    def needs(self) -> frozenset[str]:
        """Requirements of this instance (compositions add their parts')."""
        return self.requires

    def score_batch(self, outputs: BatchOutputs) -> Tensor | None:
        """``[B]`` item scores of one batch (higher = label first), or ``None`` if unused."""
        return None

    def region_unit_scores(
        self, predictions: Predictions, generator: torch.Generator | None = None
    ) -> Tensor:
        """``[U]`` unit scores for region queries (boxes, superpixels, patches)."""
        raise ValueError(
            f"{type(self).__name__} cannot rank regions: region queries need a strategy that "
            "scores units (an uncertainty strategy such as entropy or bald, or random)"
        )

    def region_scores(self, scores_R: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[R]`` final region scores from the reduced unit scores (unchanged by default)."""
        return scores_R

    def reduce_regions(
        self, predictions: Predictions, scores_U: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(owner_R, region_R, score_R, cost_R)`` of one batch's regions from its ``[U]``
        unit scores (on the CPU): :func:`taskal.functional.reduce_regions` with
        :attr:`reduction` by default; a strategy that scores a region from more than its
        units' scores (RIPU's class impurity) overrides it."""
        p = predictions
        return reduce_regions(
            scores_U,
            p.owner_U.cpu(),
            p.regions().cpu(),
            p.costs().detach().cpu().double(),
            self.reduction,
        )

    #: how unit scores become a region's (or an item's) score.
    reduction: str = "max"
    #: the query kinds the strategy ranks: whole items, regions, or both.
    query_kinds: ClassVar[tuple[str, ...]] = ("item", "region")

    def select(
        self, outputs: PoolOutputs, budget: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Return ``[budget]`` unique long positions into ``outputs.ids``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ScoreStrategy(QueryStrategy):
    """A strategy that scores every candidate and takes the top ``budget``.

    Ties are broken uniformly at random by the selection's generator (a class-sorted pool
    would otherwise favour its first classes).
    """

    def score_batch(self, outputs: BatchOutputs) -> Tensor:
        raise NotImplementedError

    def select(
        self, outputs: PoolOutputs, budget: int, generator: torch.Generator | None = None
    ) -> Tensor:
        if outputs.scores_N is None:
            raise ValueError(f"{type(self).__name__} needs item scores; none were gathered")
        return top_k(outputs.scores_N.cpu(), budget, generator)


class UnitScoreStrategy(ScoreStrategy):
    """Score units (images, boxes, pixels) from probabilities, then reduce to items.

    Args:
        n_samples: stochastic samples per prediction. With ``n_samples > 1`` the units are
            scored under MC dropout (the score of the mean prediction for entropy, margin
            and least confidence).
        reduction: how unit scores become an item (or region) score: ``"max"``, ``"mean"``,
            ``"sum"`` or, for items only, ``"topk_mean"`` (the mean of the ``top_k`` best).
        top_k: units averaged by ``"topk_mean"``.
        empty_score: the score of an item with no unit (an image without detections): 0
            ranks it with the most certain; a large value asks for it first.
    """

    requires = frozenset({"probs"})
    #: the fewest samples the score is defined for (2 for MC-dropout scores).
    min_samples: ClassVar[int] = 1

    def __init__(
        self,
        n_samples: int = 1,
        reduction: str = "max",
        top_k: int = 3,
        empty_score: float = 0.0,
    ) -> None:
        self.n_samples = check_n_samples(n_samples, self.min_samples, type(self).__name__)
        if reduction not in ITEM_REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; choose one of {ITEM_REDUCTIONS}")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if not isinstance(empty_score, (int, float)) or not math.isfinite(empty_score):
            raise ValueError(f"empty_score must be a finite number, got {empty_score!r}")
        self.reduction = reduction
        self.top_k = top_k
        self.empty_score = float(empty_score)

    @property
    def sampling(self) -> str:
        return "mc_dropout" if self.n_samples > 1 else "deterministic"

    def unit_scores(self, probs_UCK: Tensor, kind: str = "softmax") -> Tensor:
        """``[U]`` scores from ``[U, C, K]`` probabilities of the given kind."""
        raise NotImplementedError

    def _scores_U(self, p: Predictions) -> Tensor:
        scores_U = self.unit_scores(p.probs_UCK, p.kind)
        if scores_U.shape != (p.num_units,):
            raise ValueError(
                f"{type(self).__name__}.unit_scores returned shape {tuple(scores_U.shape)} for "
                f"{p.num_units} units; return one score per unit"
            )
        return scores_U

    def score_batch(self, outputs: BatchOutputs) -> Tensor:
        p = outputs.predictions
        if p is None:
            raise ValueError(f"{type(self).__name__} needs predictions; none were gathered")
        return reduce_units(
            self._scores_U(p), p.owner_U, len(outputs), self.reduction, self.top_k, self.empty_score
        )

    def region_unit_scores(
        self, predictions: Predictions, generator: torch.Generator | None = None
    ) -> Tensor:
        return self._scores_U(predictions)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_samples={self.n_samples}, reduction={self.reduction!r})"
