"""Strategy configs fail when built, with errors that say what to fix."""

from __future__ import annotations

import pytest
import torch

from taskal.selector import build_strategy
from taskal.strategies import TwoStage

from .template import make_outputs


def test_unknown_strategy_lists_registered() -> None:
    with pytest.raises(KeyError, match=r"Registered: .*entropy"):
        build_strategy("entropyy")


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"type": "bald", "n_samples": 1}, "n_samples must be >= 2"),
        ({"type": "entropy", "n_samples": 0}, "positive integer"),
        ({"type": "entropy", "reduction": "median"}, "reduction"),
        ({"type": "two_stage", "candidates_factor": 0.5}, "candidates_factor"),
        ({"type": "two_stage", "first": {"type": "coreset"}}, "ScoreStrategy"),
        ({"type": "bald", "n_sample": 20}, "n_sample"),
    ],
)
def test_bad_configs_fail_at_build(cfg: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises((ValueError, TypeError), match=match):
        build_strategy(cfg)


def test_two_stage_picks_from_the_uncertain_top() -> None:
    out = make_outputs(n=30, k=1)
    s = TwoStage(first={"type": "entropy"}, second={"type": "coreset"}, candidates_factor=2)
    picks = s.select(out, 5, torch.Generator().manual_seed(0))
    top10 = set(s.first.select(out, 10).tolist())
    assert set(picks.tolist()) <= top10 and len(set(picks.tolist())) == 5
    assert s.needs == {"probs", "embeddings", "labeled_embeddings"}
