"""Registered query strategies (importing this package registers them all)."""

from taskal.strategies.balanced import ClassBalanced
from taskal.strategies.base import QueryStrategy, ScoreStrategy, UnitScoreStrategy
from taskal.strategies.difficulty import DifficultyCalibrated
from taskal.strategies.diversity import BADGE, CoreSet
from taskal.strategies.hybrid import TwoStage
from taskal.strategies.impurity import RegionImpurity
from taskal.strategies.llal import LearningLoss
from taskal.strategies.random import RandomSampling
from taskal.strategies.uncertainty import (
    BALD,
    EnsembleKL,
    Entropy,
    LeastConfidence,
    Margin,
    MeanSTD,
    VariationRatios,
    VoteEntropy,
)

__all__ = [
    "BADGE",
    "BALD",
    "ClassBalanced",
    "CoreSet",
    "DifficultyCalibrated",
    "EnsembleKL",
    "Entropy",
    "LearningLoss",
    "LeastConfidence",
    "Margin",
    "MeanSTD",
    "QueryStrategy",
    "RandomSampling",
    "RegionImpurity",
    "ScoreStrategy",
    "TwoStage",
    "UnitScoreStrategy",
    "VariationRatios",
    "VoteEntropy",
]
