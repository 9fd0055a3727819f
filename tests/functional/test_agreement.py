"""Tests for Cohen's kappa and the stabilizing-predictions stop signal."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import cohen_kappa_score

from taskal.functional.agreement import cohen_kappa, stop_signal

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def _noisy_pair(seed: int, n: int, num_classes: int, flip: float) -> tuple[torch.Tensor, ...]:
    """Labels ``a`` and a copy ``b`` with a fraction ``flip`` of positions redrawn at random."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(num_classes, (n,), generator=g)
    redraw = torch.rand(n, generator=g) < flip
    b = torch.where(redraw, torch.randint(num_classes, (n,), generator=g), a)
    return a, b


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("num_classes", [2, 3, 7, 20])
@pytest.mark.parametrize("flip", [0.1, 0.6, 1.0])
def test_matches_sklearn_on_random_labels(seed: int, num_classes: int, flip: float) -> None:
    a, b = _noisy_pair(seed, 257, num_classes, flip)
    expected = cohen_kappa_score(a.numpy(), b.numpy())
    assert cohen_kappa(a, b, num_classes) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_any_shape_and_device_and_int_dtype(device: str) -> None:
    a, b = _noisy_pair(5, 4 * 6 * 5, 4, 0.3)
    expected = cohen_kappa_score(a.numpy(), b.numpy())
    a3, b3 = a.reshape(4, 6, 5).to(device), b.reshape(4, 6, 5).to(device, torch.int32)
    assert cohen_kappa(a3, b3.long(), 4) == pytest.approx(expected, abs=1e-12)
    assert cohen_kappa(a3.int(), b3, 4) == pytest.approx(expected, abs=1e-12)


def test_ignore_index_drops_positions_where_either_is_void() -> None:
    a, b = _noisy_pair(11, 300, 5, 0.4)
    g = torch.Generator().manual_seed(3)
    a_void = torch.where(torch.rand(300, generator=g) < 0.2, 255, a)
    b_void = torch.where(torch.rand(300, generator=g) < 0.2, 255, b)
    keep = (a_void != 255) & (b_void != 255)
    expected = cohen_kappa_score(a[keep].numpy(), b[keep].numpy())
    assert cohen_kappa(a_void, b_void, 5, ignore_index=255) == pytest.approx(expected, abs=1e-12)
    a_neg = torch.where(a_void == 255, -1, a_void)
    b_neg = torch.where(b_void == 255, -1, b_void)
    assert cohen_kappa(a_neg, b_neg, 5, ignore_index=-1) == pytest.approx(expected, abs=1e-12)


def test_hand_worked_values() -> None:
    # p_o = 0.5, p_a = (.5, .5), p_b = (.75, .25) -> p_e = 0.5 -> kappa 0
    assert cohen_kappa(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 0]), 2) == 0.0
    # perfect disagreement on a balanced binary pair
    assert cohen_kappa(torch.tensor([0, 1]), torch.tensor([1, 0]), 2) == -1.0
    # p_o = 3/4, p_e = (2*3 + 2*1) / 16 = 1/2 -> kappa = 1/2
    assert cohen_kappa(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1]), 2) == 0.5


def test_degenerate_single_class_agreement_is_one() -> None:
    same = torch.full((10,), 2)
    assert cohen_kappa(same, same.clone(), 3) == 1.0
    assert cohen_kappa(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long), 1) == 1.0
    # (scikit-learn returns NaN with a warning here; 1.0 is the documented convention)
    mixed = torch.tensor([0, 1, 2, 1, 0])
    assert cohen_kappa(mixed, mixed.clone(), 3) == 1.0
    # one class each, but different ones: p_o = 0 = p_e -> 0, not the degenerate case
    assert cohen_kappa(torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long), 2) == 0.0


@pytest.mark.parametrize(
    ("a", "b", "num_classes", "kwargs", "match"),
    [
        (torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 2, {}, "shapes"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 2, {}, "shapes"),
        (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 2, {}, "empty"),
        (torch.tensor([0, 2]), torch.tensor([0, 1]), 2, {}, r"\[0, 2\)"),
        (torch.tensor([0, -1]), torch.tensor([0, 1]), 2, {}, r"\[-1, 1\]"),
        (torch.tensor([255, 1]), torch.tensor([1, 255]), 2, {"ignore_index": 255}, "ignore_index"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), 2, {}, "integer"),
        (torch.tensor([True, False]), torch.tensor([0, 1]), 2, {}, "integer"),
        (torch.tensor([0, 1]), torch.tensor([0, 1]), 0, {}, "num_classes"),
        (torch.tensor([0, 1]), torch.tensor([0, 1]), 2.0, {}, "num_classes"),
        (torch.tensor([0, 1]), torch.tensor([0, 1]), 2, {"ignore_index": 1.5}, "ignore_index"),
    ],
)
def test_cohen_kappa_errors(
    a: torch.Tensor, b: torch.Tensor, num_classes: int, kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        cohen_kappa(a, b, num_classes, **kwargs)


def test_cohen_kappa_rejects_non_tensors() -> None:
    with pytest.raises(TypeError, match="tensors"):
        cohen_kappa([0, 1], torch.tensor([0, 1]), 2)  # type: ignore[arg-type]


def test_stop_signal_hand_worked() -> None:
    kappas = [0.5, 0.9, 0.99, 0.995, 1.0]
    # r=3: mean(.5, .9, .99) = .797; r=4: mean(.9, .99, .995) = .962; r=5: mean(.99, .995, 1) = .995
    assert stop_signal(kappas) == 5
    assert stop_signal(kappas, threshold=0.95) == 4
    assert stop_signal(kappas, threshold=0.7) == 3
    assert stop_signal(kappas, threshold=0.9, window=1) == 2  # kappas[1] = .9 compares rounds 2, 1
    assert stop_signal(kappas, threshold=0.9, window=2) == 3  # mean(.9, .99) = .945
    assert stop_signal(kappas, window=5) is None  # mean of all five is .877
    assert stop_signal(kappas, threshold=0.8, window=5) == 5


def test_stop_signal_returns_the_first_round_even_if_agreement_drops_later() -> None:
    assert stop_signal([1.0, 1.0, 0.2, 0.1], threshold=0.99, window=2) == 2


def test_stop_signal_not_enough_rounds_or_never() -> None:
    assert stop_signal([]) is None
    assert stop_signal([1.0, 1.0]) is None  # window 3 needs three kappas (four rounds)
    assert stop_signal([1.0, 1.0, 1.0]) == 3
    assert stop_signal([0.98] * 10) is None


def test_stop_signal_mean_equal_to_threshold_counts() -> None:
    assert stop_signal([0.5, 1.0], threshold=0.75, window=2) == 2
    # 0.99 + 0.99 + 0.99 sums to 2.9699999999999998 in plain float arithmetic
    assert stop_signal([0.99, 0.99, 0.99], threshold=0.99, window=3) == 3
    assert stop_signal([0.99, 0.99, 0.9899], threshold=0.99, window=3) is None


def test_stop_signal_accepts_numpy_floats_and_tuples() -> None:
    np = pytest.importorskip("numpy")
    assert stop_signal(tuple(np.array([0.2, 1.0, 1.0, 1.0])), window=3) == 4


@pytest.mark.parametrize(
    ("kappas", "kwargs", "match"),
    [
        ([0.5, float("nan")], {}, r"kappas\[1\]"),
        ([1.5], {}, r"kappas\[0\]"),
        ([-1.01], {}, r"\[-1, 1\]"),
        ([True], {}, "number"),
        (["0.9"], {}, "number"),
        ("0.9", {}, "string"),
        ([0.9], {"threshold": 1.5}, "threshold"),
        ([0.9], {"threshold": float("nan")}, "threshold"),
        ([0.9], {"threshold": None}, "threshold"),
        ([0.9], {"window": 0}, "window"),
        ([0.9], {"window": 2.0}, "window"),
        ([0.9], {"window": True}, "window"),
    ],
)
def test_stop_signal_errors(kappas: object, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stop_signal(kappas, **kwargs)  # type: ignore[arg-type]
