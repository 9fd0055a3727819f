"""Learning Loss for Active Learning: the loss-prediction module and its ranking loss."""

from taskal.functional.llal import loss_ranking_loss
from taskal.llal.module import LossPredictionModule

__all__ = ["LossPredictionModule", "loss_ranking_loss"]
