"""Every registered strategy, tested the day it lands: invariants, seeding, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskal.strategies.base import REQUIREMENTS, SAMPLINGS, QueryStrategy, ScoreStrategy
from taskal.strategies.diversity import CoreSet

from .template import build, make_outputs, permute, registered_names

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
    out = make_outputs()
    picks = build(name).select(out, budget, torch.Generator().manual_seed(0))
    assert picks.dtype == torch.long and picks.shape == (budget,)
    assert len(set(picks.tolist())) == budget
    assert int(picks.min()) >= 0 and int(picks.max()) < len(out)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_result(name: str) -> None:
    out = make_outputs(seed=3)
    a = build(name).select(out, 10, torch.Generator().manual_seed(11))
    b = build(name).select(out, 10, torch.Generator().manual_seed(11))
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("name", NAMES)
def test_permuting_the_pool_permutes_the_choice(name: str) -> None:
    s = build(name)
    out = make_outputs(seed=5)
    perm = torch.randperm(len(out), generator=torch.Generator().manual_seed(2))
    shuffled = permute(out, perm)
    if isinstance(s, ScoreStrategy):
        scores = s.score(out)
        assert torch.allclose(s.score(shuffled), scores[perm], atol=1e-6)
        # the chosen scores agree (ids may differ only among ties, e.g. vote counts)
        chosen_scores = scores[s.select(out, 8)].sort().values
        shuffled_scores = scores[perm][s.select(shuffled, 8)].sort().values
        assert torch.allclose(chosen_scores, shuffled_scores, atol=1e-6)
    if isinstance(s, CoreSet):
        chosen = {out.ids[i] for i in s.select(out, 8).tolist()}
        chosen_shuffled = {shuffled.ids[i] for i in s.select(shuffled, 8).tolist()}
        assert chosen == chosen_shuffled


@pytest.mark.parametrize("name", [n for n in NAMES if "probs" in build(n).needs])
def test_nan_probabilities_rejected(name: str) -> None:
    out = make_outputs()
    assert out.predictions is not None
    out.predictions.probs_UCK[3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        build(name).select(out, 5)


@pytest.mark.parametrize("name", [n for n in NAMES if "probs" in build(n).needs])
def test_unnormalised_probabilities_rejected(name: str) -> None:
    out = make_outputs()
    assert out.predictions is not None
    out.predictions.probs_UCK *= 2
    with pytest.raises(ValueError, match="sum to one"):
        build(name).select(out, 5)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 30),
    budget=st.integers(1, 30),
    seed=st.integers(0, 10**6),
    name=st.sampled_from(NAMES),
)
def test_any_pool_and_budget(n: int, budget: int, seed: int, name: str) -> None:
    budget = min(budget, n)
    out = make_outputs(n=n, seed=seed)
    picks = build(name).select(out, budget, torch.Generator().manual_seed(seed))
    assert len(set(picks.tolist())) == budget and int(picks.max()) < n


def test_uncertainty_picks_the_uncertain() -> None:
    out = make_outputs(n=10, c=3, k=1)
    assert out.predictions is not None
    probs = torch.zeros(10, 3, 1)
    probs[:, 0] = 1.0
    probs[[2, 7], :, 0] = 1 / 3
    out.predictions.probs_UCK = probs
    for name in ["entropy", "least_confidence", "margin"]:
        assert sorted(build(name).select(out, 2).tolist()) == [2, 7]


def test_llal_takes_top_predicted_loss() -> None:
    out = make_outputs(n=6)
    out.loss_pred_N = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.0, 4.0])
    assert build("llal").select(out, 3).tolist() == [1, 5, 3]


def test_coreset_avoids_labeled_region() -> None:
    out = make_outputs(n=4, d=1)
    out.embeddings_ND = torch.tensor([[0.0], [0.1], [5.0], [10.0]])
    out.labeled_embeddings_LD = torch.tensor([[0.05], [10.0]])
    assert build("coreset").select(out, 1).tolist() == [2]
