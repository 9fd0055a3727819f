"""Agreement between label vectors, and a stopping rule built on it.

:func:`cohen_kappa` measures how much two label vectors (two annotators, or two rounds'
predictions on the same items) agree beyond chance. :func:`stop_signal` is the "stabilizing
predictions" stopping rule of Bloodgood & Vijay-Shanker (2009, "A Method for Stopping Active
Learning Based on Stabilizing Predictions and the Need for User-Adjustable Stopping"): predict
a fixed, never-labeled *stop set* after every round, measure the kappa between consecutive
rounds' predictions, and stop once it has stayed high for a few rounds in a row.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from taskal.functional.validation import is_int

#: slack on ``mean >= threshold`` in :func:`stop_signal`: the mean of ``window`` kappas that
#: all equal the threshold can round to just below it.
_MEAN_TOL = 1e-12


def cohen_kappa(a: Tensor, b: Tensor, num_classes: int, ignore_index: int | None = None) -> float:
    """Cohen's kappa between two label vectors: agreement corrected for chance.

    ``kappa = (p_o - p_e) / (1 - p_e)`` where ``p_o`` is the fraction of positions where the
    labels agree and ``p_e = sum_c p_a(c) p_b(c)`` the agreement expected from the two label
    frequencies alone. It is computed exactly on integer counts (one host sync for the range
    check, one for the result), on whatever device the inputs live.

    Degenerate case: ``p_e == 1`` happens only when both vectors hold one and the same class
    everywhere, so they agree perfectly; the kappa is then defined as ``1.0`` (scikit-learn
    returns NaN there).

    Args:
        a: integer labels of any shape (flattened), values in ``[0, num_classes)``.
        b: integer labels, same shape and device as ``a``.
        num_classes: number of classes ``C >= 1``.
        ignore_index: drop every position where ``a`` or ``b`` equals it (e.g. ``255`` for
            unlabeled pixels) before anything else; ``None`` keeps all positions.

    Returns:
        Kappa as a Python float in ``[-1, 1]``: 1 is perfect agreement, 0 chance level.

    Raises:
        TypeError: if ``a`` or ``b`` is not a tensor.
        ValueError: on different shapes or devices, a non-integer dtype, no position left
            (empty input, or every position ignored), labels outside ``[0, num_classes)``, or
            a ``num_classes`` that is not a positive integer.
    """
    a_N, b_N = _flat_labels(a, b, num_classes, ignore_index)
    n = int(a_N.numel())
    count_a_C = torch.bincount(a_N, minlength=num_classes)
    count_b_C = torch.bincount(b_N, minlength=num_classes)
    agree_t = (a_N == b_N).sum()
    chance_t = (count_a_C * count_b_C).sum()  # n^2 * p_e
    agree, chance = (int(v) for v in torch.stack([agree_t, chance_t]).tolist())
    denominator = n * n - chance
    if denominator == 0:  # p_e == 1: both vectors are one class, hence identical
        return 1.0
    return (n * agree - chance) / denominator


def _flat_labels(
    a: Tensor, b: Tensor, num_classes: int, ignore_index: int | None
) -> tuple[Tensor, Tensor]:
    """Validate ``a`` and ``b`` and return them flattened, as long, without ignored positions."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"labels must be torch tensors, got {type(a).__name__}, {type(b).__name__}")
    if not is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if ignore_index is not None and not is_int(ignore_index):
        raise ValueError(f"ignore_index must be an integer or None, got {ignore_index!r}")
    if a.shape != b.shape:
        raise ValueError(
            f"label shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}; kappa compares the "
            "same items position by position"
        )
    if a.device != b.device:
        raise ValueError(f"labels live on different devices: {a.device} vs {b.device}")
    for name, t in (("a", a), ("b", b)):
        if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
            raise ValueError(
                f"labels {name} must be integer class indices (int64), got {t.dtype}; "
                "pass probs.argmax(dim) rather than probabilities"
            )
    a_N, b_N = a.reshape(-1).long(), b.reshape(-1).long()
    if ignore_index is not None:
        keep_N = (a_N != ignore_index) & (b_N != ignore_index)
        a_N, b_N = a_N[keep_N], b_N[keep_N]
    if a_N.numel() == 0:
        what = "every position equals ignore_index" if a.numel() else "the labels are empty"
        raise ValueError(f"cannot compute kappa: {what}")
    _check_range(a_N, b_N, num_classes)
    return a_N, b_N


def _check_range(a_N: Tensor, b_N: Tensor, num_classes: int) -> None:
    """Raise if a label lies outside ``[0, num_classes)`` (one host sync)."""
    lo_a, hi_a = torch.aminmax(a_N)
    lo_b, hi_b = torch.aminmax(b_N)
    bounds = torch.stack([torch.minimum(lo_a, lo_b), torch.maximum(hi_a, hi_b)]).tolist()
    lo, hi = int(bounds[0]), int(bounds[1])
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) (num_classes={num_classes}), got values in "
            f"[{lo}, {hi}]; pass ignore_index for a void label such as 255 or -1"
        )


def stop_signal(kappas: Sequence[float], threshold: float = 0.99, window: int = 3) -> int | None:
    """The round at which predictions have stabilised (Bloodgood & Vijay-Shanker, 2009).

    Convention: rounds are numbered ``0, 1, 2, ...`` in the order their models were trained
    (round 0 is the first model, trained on the seed labels), and ``kappas[i]`` is the Cohen's
    kappa between the predictions of round ``i + 1`` and of round ``i`` on a fixed, unlabeled
    stop set; ``len(kappas)`` is therefore the number of rounds minus one. The signal fires at
    round ``r`` when the mean of the ``window`` kappas that end with round ``r``,
    ``kappas[r - window : r]``, is ``>= threshold`` (up to ``1e-12`` of floating-point
    rounding). The earliest such ``r`` is returned: ``r >= window``, so at least
    ``window + 1`` rounds are needed. With ``window=3`` and ``threshold=0.99`` this is the
    paper's rule (the average of the last three kappas reaches 0.99).

    Args:
        kappas: agreement of each round with the one before, oldest first, each in ``[-1, 1]``.
        threshold: the mean kappa that counts as stable, in ``[-1, 1]``; the paper's default
            0.99 stops conservatively, lower values stop earlier.
        window: how many consecutive kappas are averaged, ``>= 1``.

    Returns:
        The first round ``r`` at which to stop (``window <= r <= len(kappas)``), or ``None``
        if the signal has not fired yet (including when there are fewer than ``window``
        kappas).

    Raises:
        ValueError: if a kappa is not a finite number in ``[-1, 1]``, ``threshold`` is not a
            finite number in ``[-1, 1]``, or ``window`` is not a positive integer.
    """
    values = _check_kappas(kappas)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    if not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a finite number in [-1, 1], got {threshold!r}")
    if not is_int(window) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    for r in range(window, len(values) + 1):
        mean = math.fsum(values[r - window : r]) / window
        if mean >= threshold - _MEAN_TOL:
            return r
    return None


def _check_kappas(kappas: Sequence[float]) -> list[float]:
    """``kappas`` as a list of floats, each finite and in ``[-1, 1]``."""
    if isinstance(kappas, (str, bytes)):
        raise ValueError("kappas must be a sequence of numbers, got a string")
    values = list(kappas)
    for i, k in enumerate(values):
        if isinstance(k, bool) or not isinstance(k, numbers.Real):
            raise ValueError(f"kappas[{i}] must be a number, got {k!r}")
        if not (math.isfinite(k) and -1.0 <= k <= 1.0):
            raise ValueError(f"kappas[{i}] must be a finite number in [-1, 1], got {k!r}")
    return [float(k) for k in values]
