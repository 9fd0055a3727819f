from __future__ import annotations

import pytest
import torch

from taskal import functional as F


def _picks(scores: torch.Tensor, k: int, seed: int) -> list[int]:
    return F.top_k(scores, k, torch.Generator().manual_seed(seed)).tolist()


def test_ties_are_broken_by_the_generator_not_pool_order() -> None:
    """On a class-sorted pool with equal scores, pool order would always pick the first class."""
    scores = torch.zeros(100)
    runs = {tuple(_picks(scores, 10, seed)) for seed in range(5)}
    assert len(runs) == 5  # different seeds pick different items
    assert tuple(range(10)) not in runs
    for picks in runs:
        assert len(set(picks)) == 10 and all(0 <= i < 100 for i in picks)


def test_same_seed_same_picks() -> None:
    scores = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0, 3.0, 2.0])
    assert _picks(scores, 5, 7) == _picks(scores, 5, 7)


def test_strictly_ordered_scores_give_the_exact_answer() -> None:
    scores = torch.tensor([0.3, -1.0, 2.5, 0.7, 1.1, 0.0])
    for seed in range(3):
        assert _picks(scores, 4, seed) == [2, 4, 3, 0]
    assert _picks(scores, 6, 0) == [2, 4, 3, 0, 5, 1]
    assert F.top_k(scores, 0).tolist() == []
    assert F.top_k(scores, 2).dtype == torch.long


def test_ties_only_reorder_within_a_score_level() -> None:
    scores = torch.tensor([1.0, 5.0, 1.0, 5.0, 1.0, 0.0, 5.0])
    for seed in range(10):
        picks = _picks(scores, 5, seed)
        assert sorted(picks[:3]) == [1, 3, 6]
        assert set(picks[3:]) <= {0, 2, 4}


def test_tie_breaking_is_roughly_uniform() -> None:
    scores = torch.zeros(4)
    first = [_picks(scores, 1, seed)[0] for seed in range(400)]
    counts = torch.bincount(torch.tensor(first), minlength=4)
    assert counts.min() > 60  # 100 expected each; pool order would give [400, 0, 0, 0]


def test_rejects_bad_k_and_scores() -> None:
    scores = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, 2\]"):
        F.top_k(scores, 3)
    with pytest.raises(ValueError, match="k must be"):
        F.top_k(scores, -1)
    with pytest.raises(ValueError, match="NaN"):
        F.top_k(torch.tensor([0.1, float("nan")]), 1)
    with pytest.raises(ValueError, match="1-D"):
        F.top_k(scores[None], 1)
