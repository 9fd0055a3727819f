from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskal import functional as F

Score = Callable[..., torch.Tensor]

ALL: list[Score] = [
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


def test_check_budget() -> None:
    assert F.check_budget(3, 5) == 3
    with pytest.raises(ValueError, match="larger than the unlabeled pool"):
        F.check_budget(6, 5)
    with pytest.raises(ValueError, match="empty"):
        F.check_budget(1, 0)
    with pytest.raises(ValueError, match="positive integer"):
        F.check_budget(0, 5)


# --- sigmoid heads: per-class binary problems (p_c, 1 - p_c), max over classes ------------


def _binary(p_UK: torch.Tensor) -> torch.Tensor:
    """[U, K] sigmoid scores of one class -> [U, 2, K] softmax probabilities [p, 1 - p]."""
    return torch.stack((p_UK, 1 - p_UK), dim=1)


def test_sigmoid_known_answers() -> None:
    half = torch.full((1, 1, 1), 0.5)
    assert F.entropy(half, kind="sigmoid").item() == pytest.approx(math.log(2))
    assert F.margin(half, kind="sigmoid").item() == pytest.approx(1.0)
    assert F.least_confidence(half, kind="sigmoid").item() == pytest.approx(0.5)
    for p in (0.0, 1.0):
        sure = torch.full((3, 4, 2), p)
        for fn in ALL:
            assert fn(sure, kind="sigmoid").tolist() == pytest.approx([0.0] * 3, abs=1e-6)


def test_sigmoid_max_over_classes() -> None:
    """Three confident classes and one at 0.5: the unit is as uncertain as its worst class."""
    probs = torch.tensor([0.99, 0.5, 0.01, 0.97])[None, :, None]
    assert F.entropy(probs, kind="sigmoid").item() == pytest.approx(math.log(2))
    assert F.least_confidence(probs, kind="sigmoid").item() == pytest.approx(0.5)
    # several classes may be on at once: no sum-to-one constraint, no error
    assert F.margin(probs, kind="sigmoid").item() == pytest.approx(1.0)


def test_sigmoid_bald_known_answer() -> None:
    disagree = torch.tensor([[[1.0, 0.0]], [[0.9, 0.9]]])  # [U=2, C=1, K=2]
    assert F.bald(disagree, kind="sigmoid").tolist() == pytest.approx([math.log(2), 0.0])
    assert F.variation_ratios(disagree, kind="sigmoid").tolist() == pytest.approx([0.5, 0.0])
    assert F.vote_entropy(disagree, kind="sigmoid").tolist() == pytest.approx([math.log(2), 0])


@pytest.mark.parametrize("fn", ALL)
def test_sigmoid_one_class_equals_two_class_softmax(fn: Score) -> None:
    g = torch.Generator().manual_seed(0)
    p_UK = torch.rand(7, 3, generator=g, dtype=torch.float64)
    p_UK[0] = 0.5
    p_UK[1] = 0.0
    got = fn(p_UK[:, None, :], kind="sigmoid")
    assert got.shape == (7,)
    assert torch.allclose(got, fn(_binary(p_UK)), atol=1e-12)


@pytest.mark.parametrize("fn", ALL)
def test_sigmoid_is_max_of_per_class_binary_scores(fn: Score) -> None:
    g = torch.Generator().manual_seed(1)
    probs_UCK = torch.rand(5, 4, 3, generator=g, dtype=torch.float64)
    per_class_UC = torch.stack([fn(_binary(probs_UCK[:, c])) for c in range(4)], dim=1)
    assert torch.allclose(fn(probs_UCK, kind="sigmoid"), per_class_UC.amax(1), atol=1e-12)


@pytest.mark.parametrize("fn", ALL)
def test_sigmoid_accepts_unnormalised_rejects_out_of_range(fn: Score) -> None:
    ok = torch.tensor([[[0.9], [0.8], [0.7]]])  # sums to 2.4: fine for independent classes
    assert torch.isfinite(fn(ok, kind="sigmoid")).all()
    with pytest.raises(ValueError, match="sum to one"):
        fn(ok)  # the same scores are not a softmax distribution
    with pytest.raises(ValueError, match=r"\[0, 1\]; were logits passed\? apply sigmoid"):
        fn(torch.tensor([[[1.5], [0.2]]]), kind="sigmoid")
    with pytest.raises(ValueError, match="logits"):
        fn(torch.tensor([[[-0.1]]]), kind="sigmoid")
    nan = ok.clone()
    nan[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fn(nan, kind="sigmoid")
    with pytest.raises(ValueError, match=r"softmax.*sigmoid"):
        fn(ok, kind="logits")


@pytest.mark.parametrize("fn", ALL)
def test_empty_pool_and_one_class_softmax(fn: Score) -> None:
    assert fn(torch.empty(0, 3, 2), kind="sigmoid").shape == (0,)
    assert fn(torch.empty(0, 3, 2)).shape == (0,)
    with pytest.raises(ValueError, match="kind='sigmoid'"):
        fn(torch.ones(2, 1, 1))


sigmoid_st = st.integers(1, 6).flatmap(
    lambda u: st.integers(1, 5).flatmap(
        lambda c: st.integers(1, 4).flatmap(
            lambda k: st.lists(
                st.floats(-20, 20, allow_nan=False), min_size=u * c * k, max_size=u * c * k
            ).map(lambda xs: torch.tensor(xs).view(u, c, k).sigmoid())
        )
    )
)


@settings(max_examples=40, deadline=None)
@given(sigmoid_st)
def test_sigmoid_scores_finite_bounded_and_permutation_equivariant(probs: torch.Tensor) -> None:
    u = probs.shape[0]
    perm = torch.randperm(u)
    for fn in ALL:
        s = fn(probs, kind="sigmoid")
        assert s.shape == (u,) and torch.isfinite(s).all()
        upper = 1.0 if fn is F.margin else math.log(2)
        assert (s >= 0).all() and (s <= upper + 1e-5).all(), fn.__name__
        assert torch.allclose(fn(probs[perm], kind="sigmoid"), s[perm], atol=1e-6)
    assert (F.bald(probs, kind="sigmoid") >= 0).all()
