"""Difficulty-calibrated uncertainty (PPAL's DCUS): class weights and image scores."""

from __future__ import annotations

import math

import pytest
import torch

from taskal import functional as F
from taskal.functional import foreground
from taskal.selector import build_strategy
from taskal.strategies.difficulty import DifficultyCalibrated, class_weights
from taskal.types import BatchOutputs, Predictions


def test_weights_run_from_one_to_one_plus_upper() -> None:
    w = class_weights(torch.tensor([1.0, 0.5, 0.0]), alpha=0.3, upper=0.2)
    assert w[0] == pytest.approx(1.0)
    assert w[2] == pytest.approx(1.2, abs=1e-6)
    assert w[0] < w[1] < w[2]
    # PPAL's formula at q = 0.5, written out
    b = math.exp(1 / 0.3) - 1
    assert float(w[1]) == pytest.approx(1 + 0.3 * 0.2 * math.log(b * 0.5 + 1), rel=1e-6)


@pytest.mark.parametrize("kw", [{"alpha": 0.0}, {"upper": -1.0}, {"score_thr": 1.0}])
def test_bad_arguments_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DifficultyCalibrated(**kw)


def _boxes() -> BatchOutputs:
    """Three images: image 0 holds a box of class 0 and one of class 1, image 1 one faint
    box (score under the threshold) and image 2 none. Softmax over 2 classes + background (0)."""
    probs = torch.tensor(
        [
            [0.2, 0.6, 0.2],  # image 0, class 0 (columns: background, c0, c1)
            [0.3, 0.1, 0.6],  # image 0, class 1
            [0.98, 0.01, 0.01],  # image 1: detection score 0.01 < 0.05
        ]
    ).unsqueeze(-1)
    p = Predictions(probs, torch.tensor([0, 0, 1]))
    return BatchOutputs(
        ["a", "b", "c"], predictions=p, class_quality_C=torch.tensor([0.9, 0.1]), background=0
    )


def test_image_score_is_the_weighted_sum_over_confident_boxes() -> None:
    out = _boxes()
    assert out.predictions is not None and out.class_quality_C is not None
    s = DifficultyCalibrated()
    scores = s.score_batch(out)
    unc = F.entropy(out.predictions.probs_UCK)
    w = class_weights(out.class_quality_C)
    assert float(scores[0]) == pytest.approx(float(unc[0] * w[0] + unc[1] * w[1]), rel=1e-6)
    assert float(scores[1]) == 0.0  # its only box is below score_thr
    assert float(scores[2]) == 0.0  # no box at all (empty_score)
    # faint boxes do not count as boxes: image 1 scores empty_score too, and a mean over
    # image 0's boxes is not diluted by them
    empty = DifficultyCalibrated(empty_score=5.0).score_batch(out)
    assert float(empty[1]) == 5.0 and float(empty[2]) == 5.0
    mean = DifficultyCalibrated(reduction="mean").score_batch(out)
    assert float(mean[0]) == pytest.approx(float(scores[0]) / 2, rel=1e-6)


def test_harder_class_weighs_more() -> None:
    """The same box uncertainty counts more for the class of lower quality."""
    probs = torch.tensor([[0.2, 0.6, 0.2], [0.2, 0.2, 0.6]]).unsqueeze(-1)
    out = BatchOutputs(
        ["easy", "hard"],
        predictions=Predictions(probs, torch.tensor([0, 1])),
        class_quality_C=torch.tensor([0.95, 0.05]),
        background=0,
    )
    scores = DifficultyCalibrated().score_batch(out)
    assert float(scores[1]) > float(scores[0])


def test_class_count_mismatch_is_explained() -> None:
    out = _boxes()
    out.class_quality_C = torch.ones(5)
    with pytest.raises(ValueError, match="5 classes but the predictions have 2 foreground"):
        DifficultyCalibrated().score_batch(out)


def test_foreground_drops_the_background_column() -> None:
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(foreground(x, 0), x[:, 1:])
    assert torch.equal(foreground(x, 2), x[:, :2])
    assert foreground(x, None) is x


def test_registered_and_usable_in_the_hybrid() -> None:
    s = build_strategy(
        {"type": "two_stage", "first": {"type": "difficulty_calibrated"}, "second": "coreset"}
    )
    assert "class_quality" in s.needs and "embeddings" in s.needs
