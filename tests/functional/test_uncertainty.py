from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskal import functional as F

ALL = [
    F.least_confidence,
    F.margin,
    F.entropy,
    F.bald,
    F.variation_ratios,
    F.mean_std,
    F.vote_entropy,
    F.mean_kl,
]


def _onehot(classes: list[int], c: int) -> torch.Tensor:
    """[1, C, K] with sample k one-hot at classes[k]."""
    return torch.nn.functional.one_hot(torch.tensor(classes), c).T.float()[None]


def test_uniform_is_most_uncertain() -> None:
    c = 4
    uniform = torch.full((1, c, 1), 1 / c)
    sure = _onehot([0], c)
    assert F.entropy(uniform).item() == pytest.approx(math.log(c))
    assert F.least_confidence(uniform).item() == pytest.approx(1 - 1 / c)
    assert F.margin(uniform).item() == pytest.approx(1.0)
    for fn in (F.entropy, F.least_confidence, F.margin):
        assert fn(sure).item() == pytest.approx(0.0, abs=1e-6)


def test_bald_known_answers() -> None:
    agree = _onehot([1, 1], 3)
    disagree = _onehot([0, 1], 3)
    assert F.bald(agree).item() == pytest.approx(0.0, abs=1e-6)
    assert F.bald(disagree).item() == pytest.approx(math.log(2))
    # uniform in every sample: high entropy but no disagreement -> BALD 0
    assert F.bald(torch.full((1, 3, 5), 1 / 3)).item() == pytest.approx(0.0, abs=1e-6)
    assert F.mean_kl(disagree).item() == pytest.approx(math.log(2))


def test_vote_based_known_answers() -> None:
    votes = _onehot([0, 0, 1, 2], 3)
    assert F.variation_ratios(votes).item() == pytest.approx(0.5)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert F.vote_entropy(votes).item() == pytest.approx(float(-(p * p.log()).sum()))
    assert F.mean_std(_onehot([0, 0], 3)).item() == 0.0
    assert F.mean_std(_onehot([0, 1], 3)).item() == pytest.approx((0.5 + 0.5 + 0) / 3)


@pytest.mark.parametrize("fn", ALL)
def test_rejects_nan_logits_and_bad_shapes(fn) -> None:  # type: ignore[no-untyped-def]
    good = torch.full((2, 3, 2), 1 / 3)
    nan = good.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fn(nan)
    with pytest.raises(ValueError, match="sum to one"):
        fn(torch.randn(2, 3, 2).abs() * 3)
    with pytest.raises(ValueError, match="logits"):
        fn(torch.tensor([[[-1.0], [2.0]]]))
    with pytest.raises(ValueError, match=r"\[U, C, K\]"):
        fn(good[..., 0])


probs_st = st.integers(1, 6).flatmap(
    lambda u: st.integers(2, 5).flatmap(
        lambda c: st.integers(1, 4).flatmap(
            lambda k: st.lists(
                st.floats(-20, 20, allow_nan=False), min_size=u * c * k, max_size=u * c * k
            ).map(lambda xs: torch.tensor(xs).view(u, c, k).softmax(1))
        )
    )
)


@settings(max_examples=40, deadline=None)
@given(probs_st)
def test_scores_finite_bounded_and_permutation_equivariant(probs: torch.Tensor) -> None:
    u, c, _ = probs.shape
    perm = torch.randperm(u)
    for fn in ALL:
        s = fn(probs)
        assert s.shape == (u,) and torch.isfinite(s).all()
        assert (s >= -1e-6).all() and (s <= max(1.0, math.log(c)) + 1e-5).all()
        assert torch.allclose(fn(probs[perm]), s[perm], atol=1e-6)


def test_reduce_units() -> None:
    scores = torch.tensor([0.1, 0.9, 0.4, 0.2])
    owner = torch.tensor([0, 0, 2, 2])
    assert F.reduce_units(scores, owner, 3, "max").tolist() == pytest.approx([0.9, 0.0, 0.4])
    assert F.reduce_units(scores, owner, 3, "mean").tolist() == pytest.approx([0.5, 0.0, 0.3])
    assert F.reduce_units(scores, owner, 3, "sum").tolist() == pytest.approx([1.0, 0.0, 0.6])
    with pytest.raises(ValueError, match="reduction"):
        F.reduce_units(scores, owner, 3, "median")
    with pytest.raises(ValueError, match="owner indices"):
        F.reduce_units(scores, owner, 2)


def test_check_budget() -> None:
    assert F.check_budget(3, 5) == 3
    with pytest.raises(ValueError, match="larger than the unlabeled pool"):
        F.check_budget(6, 5)
    with pytest.raises(ValueError, match="empty"):
        F.check_budget(1, 0)
    with pytest.raises(ValueError, match="positive integer"):
        F.check_budget(0, 5)
