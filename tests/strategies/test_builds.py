"""Strategy configs fail when built, with errors that say what to fix."""

from __future__ import annotations

import pytest
import torch

from taskal.selector import build_strategy
from taskal.strategies import TwoStage

from .template import make_batch, pool_of, select


def test_unknown_strategy_lists_registered() -> None:
    with pytest.raises(KeyError, match=r"Registered: .*entropy"):
        build_strategy("entropyy")


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"type": "bald", "n_samples": 1}, "n_samples must be >= 2"),
        ({"type": "entropy", "n_samples": 0}, "positive integer"),
        ({"type": "entropy", "reduction": "median"}, "reduction"),
        ({"type": "entropy", "reduction": "topk_mean", "top_k": 0}, "top_k"),
        ({"type": "bald", "empty_score": float("nan")}, "empty_score"),
        ({"type": "two_stage", "candidates_factor": 0.5}, "candidates_factor"),
        ({"type": "two_stage", "first": {"type": "coreset"}}, "must score candidates"),
        ({"type": "two_stage", "second": "entropy"}, "diverse subset"),
        ({"type": "two_stage", "first": 3}, "name or a config dict"),
        ({"type": "bald", "n_sample": 20}, "n_sample"),
        # defect 2: arguments a strategy never uses are refused, not ignored
        ({"type": "coreset", "n_samples": 20}, r"does not take \['n_samples'\]"),
        ({"type": "random", "n_samples": 5}, r"does not take \['n_samples'\]"),
        ({"type": "badge", "n_samples": 5}, r"does not take"),
        ({"type": "llal", "reduction": "max"}, r"does not take"),
    ],
)
def test_bad_configs_fail_at_build(cfg: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises((ValueError, TypeError), match=match):
        build_strategy(cfg)


@pytest.mark.parametrize("name", ["entropy", "least_confidence", "margin"])
def test_n_samples_is_honoured(name: str) -> None:
    """Defect 2: entropy with n_samples=20 scores 20 MC-dropout samples, not one pass."""
    assert build_strategy(name).sampling == "deterministic"
    s = build_strategy({"type": name, "n_samples": 20})
    assert s.sampling == "mc_dropout" and s.n_samples == 20


def test_two_stage_honours_first_stage_samples_and_names() -> None:
    """Defect 2 and 10: names for stages work; the first stage's n_samples drives sampling."""
    s = build_strategy({"type": "two_stage", "first": "entropy", "second": "coreset"})
    assert isinstance(s, TwoStage) and s.sampling == "deterministic"
    s = build_strategy({"type": "two_stage", "first": {"type": "entropy", "n_samples": 8}})
    assert s.sampling == "mc_dropout" and s.n_samples == 8


def test_two_stage_with_badge_second() -> None:
    batch = make_batch(n=30, k=1)
    s = TwoStage(first={"type": "margin"}, second={"type": "badge"}, candidates_factor=3)
    picks = select(s, batch, 4)
    assert set(picks.tolist()) <= set(select(s.first, batch, 12).tolist())
    assert len(set(picks.tolist())) == 4


def test_subset_keeps_item_order() -> None:
    s = build_strategy("entropy")
    pool = pool_of(s, make_batch(n=6, k=2))
    positions = torch.tensor([4, 1, 5])
    sub = pool.subset(positions)
    assert sub.ids == ["item4", "item1", "item5"]
    assert sub.scores_N is not None and pool.scores_N is not None
    assert torch.equal(sub.scores_N, pool.scores_N[positions])
    assert sub.embeddings_ND is not None and pool.embeddings_ND is not None
    assert torch.equal(sub.embeddings_ND, pool.embeddings_ND[positions])


def test_two_stage_picks_from_the_uncertain_top() -> None:
    batch = make_batch(n=30, k=1)
    s = TwoStage(first={"type": "entropy"}, second={"type": "coreset"}, candidates_factor=2)
    picks = select(s, batch, 5)
    top10 = set(select(s.first, batch, 10).tolist())
    assert set(picks.tolist()) <= top10 and len(set(picks.tolist())) == 5
    assert s.needs == {"probs", "embeddings", "labeled_embeddings"}


def test_class_balanced_caps_each_predicted_class() -> None:
    from taskal.types import Predictions

    batch = make_batch(n=30, c=3, k=1)
    probs = torch.zeros(30, 3, 1)
    probs[:20, 0] = 0.5  # class 0: the 20 most uncertain items
    probs[:20, 1] = 0.5
    probs[20:25, 2, 0] = 0.9  # two confident classes among the rest
    probs[25:, 1, 0] = 0.9
    probs[20:, 0, 0] = 0.1
    batch.predictions = Predictions(probs, torch.arange(30))
    s = build_strategy({"type": "class_balanced", "base": "entropy", "max_share": 0.4})
    picks = select(s, batch, 5).tolist()
    assert len(set(picks)) == 5
    assert sum(p < 20 for p in picks) == 2  # ceil(0.4 * 5) from the uncertain class
    plain = select(build_strategy("entropy"), batch, 5).tolist()
    assert all(p < 20 for p in plain)
    # caps that cannot fill the budget fall back to the best skipped items
    tight = build_strategy({"type": "class_balanced", "max_share": 0.1})
    assert len(set(select(tight, batch, 10).tolist())) == 10


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"type": "class_balanced", "base": "coreset"}, "must score candidates"),
        ({"type": "class_balanced", "max_share": 0}, "max_share"),
    ],
)
def test_class_balanced_bad_configs(cfg: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=match):
        build_strategy(cfg)
