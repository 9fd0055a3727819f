"""Learning Loss for Active Learning (Yoo & Kweon 2019): query the top predicted loss."""

from __future__ import annotations

from torch import Tensor

from taskal.registry import QUERY_STRATEGIES
from taskal.strategies.base import ScoreStrategy
from taskal.types import BatchOutputs


@QUERY_STRATEGIES.register_module(name="llal")
class LearningLoss(ScoreStrategy):
    """Score = the loss predicted by the adapter's attached ``LossPredictionModule``.

    The model must have been trained jointly with the module (``llal`` in the training
    config), which the simulation does when this strategy is selected.
    """

    requires = frozenset({"loss_pred"})

    def score_batch(self, outputs: BatchOutputs) -> Tensor:
        if outputs.loss_pred_B is None:
            raise ValueError("llal needs predicted losses; none were gathered")
        return outputs.loss_pred_B
