"""Every registered strategy, tested the day it lands: invariants, seeding, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskal.strategies.base import REQUIREMENTS, SAMPLINGS, QueryStrategy, ScoreStrategy
from taskal.strategies.diversity import CoreSet
from taskal.types import Predictions

from .template import build, make_batch, permute, pool_of, registered_names, select

NAMES = registered_names()


def test_expected_strategies_registered() -> None:
    for name in [
        "random",
        "least_confidence",
        "margin",
        "entropy",
        "bald",
        "variation_ratios",
        "mean_std",
        "vote_entropy",
        "ensemble_kl",
        "llal",
        "coreset",
        "badge",
        "two_stage",
        "hybrid",
        "difficulty_calibrated",
    ]:
        assert name in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_declares_known_requirements(name: str) -> None:
    s = build(name)
    assert isinstance(s, QueryStrategy)
    assert s.needs <= REQUIREMENTS and s.sampling in SAMPLINGS


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("budget", [1, 7, 40])
def test_budget_respected_unique_in_range(name: str, budget: int) -> None:
    picks = select(build(name), make_batch(), budget)
    assert picks.dtype == torch.long and picks.shape == (budget,)
    assert len(set(picks.tolist())) == budget
    assert int(picks.min()) >= 0 and int(picks.max()) < 40


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_result(name: str) -> None:
    batch = make_batch(seed=3)
    assert (
        select(build(name), batch, 10, 11).tolist() == select(build(name), batch, 10, 11).tolist()
    )


@pytest.mark.parametrize("name", NAMES)
def test_permuting_the_pool_permutes_the_choice(name: str) -> None:
    s = build(name)
    batch = make_batch(seed=5)
    perm = torch.randperm(len(batch), generator=torch.Generator().manual_seed(2))
    shuffled = permute(batch, perm)
    if isinstance(s, ScoreStrategy):
        scores = s.score_batch(batch)
        assert torch.allclose(s.score_batch(shuffled), scores[perm], atol=1e-6)
        # the chosen scores agree (ids may differ only among ties, e.g. vote counts)
        chosen = scores[select(s, batch, 8)].sort().values
        chosen_shuffled = scores[perm][select(s, shuffled, 8)].sort().values
        assert torch.allclose(chosen, chosen_shuffled, atol=1e-6)
    if isinstance(s, CoreSet):
        a = {batch.ids[i] for i in select(s, batch, 8).tolist()}
        b = {shuffled.ids[i] for i in select(s, shuffled, 8).tolist()}
        assert a == b


PROB_NAMES = [n for n in NAMES if build(n).needs & {"probs", "item_probs"}]


@pytest.mark.parametrize("name", [n for n in NAMES if "probs" in build(n).needs])
def test_nan_probabilities_rejected(name: str) -> None:
    batch = make_batch()
    assert batch.predictions is not None
    batch.predictions.probs_UCK[3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        build(name).score_batch(batch)


@pytest.mark.parametrize("name", [n for n in NAMES if "probs" in build(n).needs])
def test_unnormalised_probabilities_rejected(name: str) -> None:
    batch = make_batch()
    assert batch.predictions is not None
    batch.predictions.probs_UCK *= 2
    with pytest.raises(ValueError, match="sum to one"):
        build(name).score_batch(batch)


@pytest.mark.parametrize("name", [n for n in NAMES if "probs" in build(n).needs])
def test_sigmoid_heads_score(name: str) -> None:
    """Independent per-class scores (RetinaNet, FCOS), one class included, are scored."""
    for c in (1, 3):
        g = torch.Generator().manual_seed(c)
        probs = torch.rand(12, c, 4, generator=g)
        batch = make_batch(n=12)
        batch.predictions = Predictions(probs, torch.arange(12), kind="sigmoid")
        batch.class_quality_C = torch.rand(c, generator=g)
        scores = build(name).score_batch(batch)
        assert scores is not None and scores.shape == (12,) and torch.isfinite(scores).all()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 30),
    budget=st.integers(1, 30),
    seed=st.integers(0, 10**6),
    name=st.sampled_from(NAMES),
)
def test_any_pool_and_budget(n: int, budget: int, seed: int, name: str) -> None:
    budget = min(budget, n)
    picks = select(build(name), make_batch(n=n, seed=seed), budget, seed)
    assert len(set(picks.tolist())) == budget and int(picks.max()) < n


def test_uncertainty_picks_the_uncertain() -> None:
    batch = make_batch(n=10, c=3, k=1)
    probs = torch.zeros(10, 3, 1)
    probs[:, 0] = 1.0
    probs[[2, 7], :, 0] = 1 / 3
    batch.predictions = Predictions(probs, torch.arange(10))
    for name in ["entropy", "least_confidence", "margin"]:
        assert sorted(select(build(name), batch, 2).tolist()) == [2, 7]


def test_ties_broken_by_the_generator_not_pool_order() -> None:
    """Defect 6: equal scores on a class-sorted pool must not favour its first items."""
    batch = make_batch(n=40, c=3, k=1)
    batch.predictions = Predictions(torch.full((40, 3, 1), 1 / 3), torch.arange(40))
    s = build("entropy")
    picks = [set(select(s, batch, 5, seed).tolist()) for seed in range(4)]
    assert picks[0] != set(range(5))
    assert len({frozenset(p) for p in picks}) > 1
    assert select(s, batch, 5, 9).tolist() == select(s, batch, 5, 9).tolist()


def test_llal_takes_top_predicted_loss() -> None:
    batch = make_batch(n=6)
    batch.loss_pred_B = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.0, 4.0])
    assert select(build("llal"), batch, 3).tolist() == [1, 5, 3]


def test_coreset_avoids_labeled_region() -> None:
    s = build("coreset")
    pool = pool_of(s, make_batch(n=4, d=1))
    pool.embeddings_ND = torch.tensor([[0.0], [0.1], [5.0], [10.0]])
    pool.labeled_embeddings_LD = torch.tensor([[0.05], [10.0]])
    assert s.select(pool, 1).tolist() == [2]


def test_unit_scores_reduce_to_items() -> None:
    """Boxes of one image reduce to its item score; an image without boxes scores 0."""
    probs = torch.tensor([[0.5, 0.5], [0.99, 0.01], [0.9, 0.1]]).unsqueeze(-1)
    batch = make_batch(n=3)
    batch.predictions = Predictions(probs, torch.tensor([0, 0, 2]))
    scores = build("entropy").score_batch(batch)
    assert scores[0] == pytest.approx(float(torch.log(torch.tensor(2.0))))
    assert scores[1] == 0.0 and 0 < scores[2] < scores[0]
