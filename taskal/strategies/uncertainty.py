"""Uncertainty strategies: softmax, MC dropout and deep-ensemble scores.

Every score is defined for softmax heads and for independent per-class sigmoid heads
(``Predictions.kind``); see :mod:`taskal.functional.uncertainty` for the sigmoid form.
"""

from __future__ import annotations

from torch import Tensor

from taskal import functional as F
from taskal.registry import QUERY_STRATEGIES
from taskal.strategies.base import UnitScoreStrategy


@QUERY_STRATEGIES.register_module(name="least_confidence")
class LeastConfidence(UnitScoreStrategy):
    """``1 - max p`` (of the MC mean when ``n_samples > 1``); see :func:`F.least_confidence`."""

    def unit_scores(self, probs_UCK: Tensor, kind: str = "softmax") -> Tensor:
        return F.least_confidence(probs_UCK, kind=kind)


@QUERY_STRATEGIES.register_module(name="margin")
class Margin(UnitScoreStrategy):
    """Smallest top-2 margin first (of the MC mean when ``n_samples > 1``)."""

    def unit_scores(self, probs_UCK: Tensor, kind: str = "softmax") -> Tensor:
        return F.margin(probs_UCK, kind=kind)


@QUERY_STRATEGIES.register_module(name="entropy")
class Entropy(UnitScoreStrategy):
    """Predictive entropy (of the MC mean when ``n_samples > 1``)."""

    def unit_scores(self, probs_UCK: Tensor, kind: str = "softmax") -> Tensor:
        return F.entropy(probs_UCK, kind=kind)


class MCDropoutStrategy(UnitScoreStrategy):
    """A score that needs ``K >= 2`` MC-dropout samples (20 by default)."""

    min_samples = 2

    def __init__(
        self,
        n_samples: int = 20,
        reduction: str = "max",
        top_k: int = 3,
        empty_score: float = 0.0,
    ) -> None:
        super().__init__(n_samples, reduction, top_k, empty_score)


@QUERY_STRATEGIES.register_module(name="bald")
class BALD(MCDropoutStrategy):
    """BALD mutual information under MC dropout (Gal, Islam & Ghahramani 2017)."""

    def unit_scores(self, probs_UCK: Tensor, kind: str = "softmax") -> Tensor:
        return F.bald(probs_UCK, kind=kind)


@QUERY_STRATEGIES.register_module(name="variation_ratios")
class VariationRatios(MCDropoutStrategy):
    """Variation ratios under MC dropout (Gal et al. 2017)."""

    def unit_scores(self, probs_UCK: Tensor, kind: str = "softmax") -> Tensor:
        return F.variation_ratios(probs_UCK, kind=kind)


@QUERY_STRATEGIES.register_module(name="mean_std")
class MeanSTD(MCDropoutStrategy):
    """Mean standard deviation of class probabilities under MC dropout."""

    def unit_scores(self, probs_UCK: Tensor, kind: str = "softmax") -> Tensor:
        return F.mean_std(probs_UCK, kind=kind)


class EnsembleStrategy(UnitScoreStrategy):
    """A score over the members of a deep ensemble (the ``K`` axis holds members).

    Args:
        n_samples: MC-dropout samples per member (1: one deterministic pass each).
        reduction: how unit scores become an item score.
    """

    @property
    def sampling(self) -> str:
        return "ensemble"


@QUERY_STRATEGIES.register_module(name="vote_entropy")
class VoteEntropy(EnsembleStrategy):
    """Entropy of the members' votes (Beluch et al. 2018 compare it as "ensemble VR")."""

    def unit_scores(self, probs_UCK: Tensor, kind: str = "softmax") -> Tensor:
        return F.vote_entropy(probs_UCK, kind=kind)


@QUERY_STRATEGIES.register_module(name="ensemble_kl")
class EnsembleKL(EnsembleStrategy):
    """Mean KL of each member to the consensus (McCallum & Nigam 1998)."""

    def unit_scores(self, probs_UCK: Tensor, kind: str = "softmax") -> Tensor:
        return F.mean_kl(probs_UCK, kind=kind)
