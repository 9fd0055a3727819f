"""Difficulty-calibrated uncertainty for detection (after PPAL, Yang et al. 2022).

A detector is uncertain about many boxes of easy classes and few of hard ones, so a plain
sum of box uncertainties favours images crowded with easy objects. PPAL's
difficulty-calibrated uncertainty sampling weights each box's uncertainty by how hard its
class is for the current model: ``w_c = 1 + a * u * log(b * (1 - q_c) + 1)`` with
``b = exp(1 / a) - 1``, so a class of quality ``q_c = 1`` keeps weight 1 and one of quality
0 gets ``1 + u`` (PPAL's defaults: ``a = 0.3``, ``u = 0.2``). An image's score is the sum
of its weighted box uncertainties over boxes whose detection score reaches
``score_thr``.

PPAL keeps ``q_c`` as a moving average, during training, of ``p^xi * IoU^(1 - xi)`` over
the positive anchors of class ``c``. taskal measures the same quality once after training,
on the labeled images' detections (:func:`taskal.evaluation.class_quality`), so it works
with any detector the adapter wraps; the adapter carries it as ``class_quality``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from taskal import functional as F
from taskal.registry import QUERY_STRATEGIES
from taskal.strategies.base import UnitScoreStrategy
from taskal.types import BatchOutputs, Predictions


def class_weights(quality_C: Tensor, alpha: float = 0.3, upper: float = 0.2) -> Tensor:
    """PPAL's class weights ``1 + alpha * upper * log(b * (1 - q) + 1)``, ``b = e^(1/alpha) - 1``.

    Monotone in the difficulty ``1 - q``: from 1 (quality 1) to ``1 + upper`` (quality 0).
    """
    if not alpha > 0 or not upper >= 0:
        raise ValueError(f"alpha must be > 0 and upper >= 0, got {alpha}, {upper}")
    q = quality_C.float().clamp(0.0, 1.0)
    b = math.expm1(1.0 / alpha)
    return 1.0 + alpha * upper * torch.log1p(b * (1.0 - q))


@QUERY_STRATEGIES.register_module(name="difficulty_calibrated")
class DifficultyCalibrated(UnitScoreStrategy):
    """Sum of box entropies weighted by the box class's difficulty (PPAL's DCUS).

    A box's class is the argmax of its foreground probabilities and its detection score
    their maximum. The strategy needs the adapter's ``class_quality`` (see the module
    docstring); the selector raises a clear error when the adapter has none.

    Args:
        n_samples: MC-dropout samples (the entropy of the mean); 1 = deterministic.
        score_thr: boxes scored below this detection score are left out (PPAL: 0.05).
        alpha: PPAL's ``a``, the curvature of the weight (0.3).
        upper: PPAL's ``u``: the hardest class weighs ``1 + upper`` (0.2).
        reduction: how box scores become an image score (PPAL sums them).
        empty_score: the score of an image without any box above ``score_thr``.
    """

    requires = frozenset({"probs", "class_quality"})

    def __init__(
        self,
        n_samples: int = 1,
        score_thr: float = 0.05,
        alpha: float = 0.3,
        upper: float = 0.2,
        reduction: str = "sum",
        empty_score: float = 0.0,
    ) -> None:
        super().__init__(n_samples, reduction, empty_score=empty_score)
        if not 0.0 <= score_thr < 1.0:
            raise ValueError(f"score_thr must lie in [0, 1), got {score_thr!r}")
        class_weights(torch.zeros(1), alpha, upper)  # validates alpha and upper
        self.score_thr = float(score_thr)
        self.alpha = float(alpha)
        self.upper = float(upper)

    def weighted_scores(
        self, p: Predictions, quality_C: Tensor, background: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """``[U]`` difficulty-weighted entropies, and ``[U]`` True for the boxes whose
        detection score (their best foreground probability) reaches ``score_thr``."""
        fg = F.foreground(p.probs_UCK.mean(-1), background)
        if quality_C.numel() != fg.shape[1]:
            raise ValueError(
                f"class_quality has {quality_C.numel()} classes but the predictions have "
                f"{fg.shape[1]} foreground classes; measure it with the same detector"
            )
        conf, label = fg.max(1) if fg.shape[0] else (fg.new_zeros(0), fg.new_zeros(0).long())
        weights = class_weights(quality_C.to(fg.device), self.alpha, self.upper)
        return F.entropy(p.probs_UCK, kind=p.kind) * weights[label], conf >= self.score_thr

    def score_batch(self, outputs: BatchOutputs) -> Tensor:
        """Per image, the reduction over its boxes at or above ``score_thr``; an image with
        none scores ``empty_score``."""
        p = outputs.predictions
        if p is None or outputs.class_quality_C is None:
            raise ValueError(f"{type(self).__name__} needs predictions and class quality")
        scores_U, keep = self.weighted_scores(p, outputs.class_quality_C, outputs.background)
        return F.reduce_units(
            scores_U[keep],
            p.owner_U[keep],
            len(outputs),
            self.reduction,
            self.top_k,
            self.empty_score,
        )

    def region_unit_scores(
        self, predictions: Predictions, generator: torch.Generator | None = None
    ) -> Tensor:
        raise ValueError(
            "difficulty_calibrated ranks whole images; use Selector(query='item') or a "
            "region strategy such as entropy"
        )

    def __repr__(self) -> str:
        return (
            f"DifficultyCalibrated(n_samples={self.n_samples}, score_thr={self.score_thr}, "
            f"alpha={self.alpha}, upper={self.upper})"
        )
