"""Input checks shared by the strategy math: fail early, say what arrived and what to do."""

from __future__ import annotations

import numbers
import weakref
from typing import Any

import torch
from torch import Tensor

from taskal.types import PROB_KINDS


def check_probs(probs_UCK: Tensor, kind: str = "softmax", atol: float = 1e-3) -> Tensor:
    """Check that ``probs_UCK`` holds probabilities ``[U, C, K]`` and return it unchanged.

    Args:
        probs_UCK: ``[U, C, K]`` probabilities (units, classes, samples).
        kind: ``"softmax"``: every ``[u, :, k]`` is a distribution over ``C >= 2`` classes
            (sums to one within ``atol``, entries ``>= 0``); ``"sigmoid"``: ``C >= 1``
            independent per-class scores, each in ``[0, 1]`` (no sum constraint).
        atol: tolerance on the sum to one (softmax only).

    Returns:
        ``probs_UCK`` itself.

    Raises:
        ValueError: on an unknown ``kind``, a wrong rank, too few classes, NaN/inf, values
            outside the kind's range, or (softmax) columns that do not sum to one; these
            usually mean logits were passed where probabilities belong.
    """
    if kind not in PROB_KINDS:
        raise ValueError(f"unknown probability kind {kind!r}; choose one of {PROB_KINDS}")
    if _already_checked(probs_UCK, kind, atol):
        return probs_UCK
    if probs_UCK.dim() != 3:
        raise ValueError(
            f"expected probabilities shaped [U, C, K] (units, classes, samples), got shape "
            f"{tuple(probs_UCK.shape)}; add a trailing sample axis with probs.unsqueeze(-1)."
        )
    min_classes = 2 if kind == "softmax" else 1
    if probs_UCK.shape[1] < min_classes:
        hint = (
            " (a one-class head is a sigmoid head: pass kind='sigmoid')"
            if kind == "softmax"
            else ""
        )
        raise ValueError(
            f"{kind} probabilities need at least {min_classes} classes, got "
            f"C={probs_UCK.shape[1]}{hint}"
        )
    if probs_UCK.numel() == 0:
        return probs_UCK
    # two passes over the data: class sums (a NaN or inf anywhere makes their total
    # non-finite) and the value range; the slow diagnostics run only on failure.
    sums_UK = probs_UCK.sum(dim=1)
    bad = 0
    if not bool(torch.isfinite(sums_UK.sum())):  # NaN/inf, or finite values so large they overflow
        bad = int((~torch.isfinite(probs_UCK)).flatten(1).any(1).sum())
    if bad:
        raise ValueError(
            f"probabilities contain NaN or inf in {bad} of {probs_UCK.shape[0]} units; "
            "check the model's outputs (a diverged training run is the usual cause)."
        )
    lo_t, hi_t = torch.aminmax(probs_UCK)
    lo, hi = float(lo_t), float(hi_t)
    if kind == "sigmoid":
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"sigmoid scores must lie in [0, 1]; were logits passed? apply sigmoid first "
                f"(got values in [{lo:.3g}, {hi:.3g}])."
            )
        _remember(probs_UCK, kind, atol)
        return probs_UCK
    if lo < 0.0:
        raise ValueError("probabilities must be >= 0; were logits passed? apply softmax first.")
    worst = float((sums_UK - 1).abs().max())
    if worst > atol:
        raise ValueError(
            f"probabilities must sum to one over classes (dim 1); the worst unit is off by "
            f"{worst:.3g}. Were logits or unnormalised scores passed? apply softmax first "
            "(or pass kind='sigmoid' for independent per-class scores)."
        )
    _remember(probs_UCK, kind, atol)
    return probs_UCK


# The last tensor that passed: the selector checks a batch's probabilities and the strategy's
# score function checks them again; a per-pixel tensor is then read once, not twice. The
# memo holds the same object (weakly) at the same version, so an in-place change or a new
# tensor is checked afresh.
_last: tuple[weakref.ref[Tensor], int, str, float] | None = None


def _already_checked(probs: Tensor, kind: str, atol: float) -> bool:
    if _last is None:
        return False
    ref, version, last_kind, last_atol = _last
    return ref() is probs and probs._version == version and (kind, atol) == (last_kind, last_atol)


def _remember(probs: Tensor, kind: str, atol: float) -> None:
    global _last
    _last = (weakref.ref(probs), probs._version, kind, atol)


def check_scores(scores_N: Tensor, name: str = "scores") -> Tensor:
    """Check a 1-D score vector is finite (higher = label first)."""
    if scores_N.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(scores_N.shape)}")
    if not torch.isfinite(scores_N).all():
        bad = int((~torch.isfinite(scores_N)).sum())
        raise ValueError(f"{name} contain {bad} NaN/inf values of {scores_N.numel()}")
    return scores_N


def check_budget(budget: int, pool_size: int) -> int:
    """Check ``0 < budget <= pool_size``."""
    if pool_size == 0:
        raise ValueError("the unlabeled pool is empty: every item is already labeled.")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    if budget > pool_size:
        raise ValueError(
            f"budget {budget} is larger than the unlabeled pool ({pool_size} items); "
            f"lower the budget to at most {pool_size} or add items to the pool."
        )
    return budget


def is_int(x: Any) -> bool:
    """An integer (Python's or numpy's), and not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def foreground(probs_UC: Tensor, background: int | None) -> Tensor:
    """``probs_UC`` ``[U, C]`` without its background column (when the head has one:
    column 0 for torchvision's Faster R-CNN, ``C - 1`` for mmdet's two-stage heads)."""
    if background is None:
        return probs_UC
    if not 0 <= background < probs_UC.shape[1]:
        raise ValueError(f"background={background} is not a column of {probs_UC.shape[1]} classes")
    keep = torch.ones(probs_UC.shape[1], dtype=torch.bool, device=probs_UC.device)
    keep[background] = False
    return probs_UC[:, keep]
