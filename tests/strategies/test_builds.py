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


def test_two_stage_with_badge_second() -> None:
    out = make_outputs(n=30, k=1)
    s = TwoStage(first={"type": "margin"}, second={"type": "badge"}, candidates_factor=3)
    picks = s.select(out, 4, torch.Generator().manual_seed(0))
    assert set(picks.tolist()) <= set(s.first.select(out, 12).tolist())
    assert len(set(picks.tolist())) == 4


def test_subset_keeps_units_in_position_order() -> None:
    out = make_outputs(n=6, k=2)
    assert out.predictions is not None and out.embeddings_ND is not None
    positions = torch.tensor([4, 1, 5])
    sub = out.subset(positions)
    assert sub.ids == ["item4", "item1", "item5"]
    assert sub.predictions is not None and sub.embeddings_ND is not None
    assert sub.predictions.owner_U.tolist() == [0, 1, 2]
    assert torch.equal(sub.predictions.probs_UCK, out.predictions.probs_UCK[positions])
    assert torch.equal(sub.embeddings_ND, out.embeddings_ND[positions])


def test_two_stage_picks_from_the_uncertain_top() -> None:
    out = make_outputs(n=30, k=1)
    s = TwoStage(first={"type": "entropy"}, second={"type": "coreset"}, candidates_factor=2)
    picks = s.select(out, 5, torch.Generator().manual_seed(0))
    top10 = set(s.first.select(out, 10).tolist())
    assert set(picks.tolist()) <= top10 and len(set(picks.tolist())) == 5
    assert s.needs == {"probs", "embeddings", "labeled_embeddings"}
