"""Base classes for query strategies: thin wrappers around :mod:`taskal.functional`.

A strategy declares what it needs from the adapter (``requires``) and how predictions must
be sampled (``sampling``); the :class:`~taskal.selector.Selector` gathers exactly that over
the unlabeled candidates and calls :meth:`QueryStrategy.select`. One direction everywhere:
a higher score means "ask for this label first".
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from taskal.functional import check_scores, reduce_units
from taskal.functional.reduction import REDUCTIONS
from taskal.types import PoolOutputs

#: what a strategy can ask the selector to gather.
REQUIREMENTS = frozenset({"probs", "embeddings", "labeled_embeddings", "loss_pred"})
#: how predictions are sampled: one eval pass, MC dropout, or an ensemble's members.
SAMPLINGS = ("deterministic", "mc_dropout", "ensemble")


class QueryStrategy:
    """Pick ``budget`` candidates from :class:`PoolOutputs`.

    Subclasses set ``requires`` and ``sampling`` and implement :meth:`select`. Arguments are
    validated in ``__init__`` so a bad config fails when built, not after scoring a pool.

    Args:
        n_samples: stochastic samples ``K`` per prediction (MC-dropout passes); ignored for
            ``sampling == "ensemble"``, where ``K`` is the number of members.
    """

    requires: ClassVar[frozenset[str]] = frozenset()
    sampling: ClassVar[str] = "deterministic"
    min_samples: ClassVar[int] = 1

    def __init__(self, n_samples: int = 1) -> None:
        if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        if self.sampling == "mc_dropout" and n_samples < self.min_samples:
            raise ValueError(
                f"{type(self).__name__} needs MC-dropout samples: n_samples must be >= "
                f"{self.min_samples}, got {n_samples}"
            )
        self.n_samples = n_samples

    @property
    def needs(self) -> frozenset[str]:
        """Requirements of this instance (compositions add their parts')."""
        return self.requires

    def select(
        self, outputs: PoolOutputs, budget: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Return ``[budget]`` unique long positions into ``outputs.ids``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_samples={self.n_samples})"


class ScoreStrategy(QueryStrategy):
    """A strategy that scores every candidate and takes the top ``budget``.

    Ties are broken by candidate order (a stable sort), so results are deterministic.
    """

    def score(self, outputs: PoolOutputs) -> Tensor:
        """``[N]`` scores, higher = label first."""
        raise NotImplementedError

    def select(
        self, outputs: PoolOutputs, budget: int, generator: torch.Generator | None = None
    ) -> Tensor:
        scores_N = check_scores(self.score(outputs), f"{type(self).__name__} scores")
        order = torch.sort(scores_N.cpu(), descending=True, stable=True).indices
        return order[:budget]


class UnitScoreStrategy(ScoreStrategy):
    """Score units (images, boxes, pixels) from probabilities, then reduce to items.

    Args:
        n_samples: MC-dropout samples per prediction.
        reduction: how unit scores become an item score: ``"max"``, ``"mean"`` or ``"sum"``.
    """

    requires = frozenset({"probs"})

    def __init__(self, n_samples: int = 1, reduction: str = "max") -> None:
        super().__init__(n_samples)
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
        self.reduction = reduction

    def unit_scores(self, probs_UCK: Tensor) -> Tensor:
        """``[U]`` scores from ``[U, C, K]`` probabilities."""
        raise NotImplementedError

    def score(self, outputs: PoolOutputs) -> Tensor:
        if outputs.predictions is None:
            raise ValueError(f"{type(self).__name__} needs predictions; none were gathered")
        p = outputs.predictions
        scores_U = self.unit_scores(p.probs_UCK)
        return reduce_units(scores_U, p.owner_U, len(outputs), self.reduction)
