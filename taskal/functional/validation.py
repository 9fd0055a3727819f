"""Input checks shared by the strategy math: fail early, say what arrived and what to do."""

from __future__ import annotations

import torch
from torch import Tensor


def check_probs(probs_UCK: Tensor, atol: float = 1e-3) -> Tensor:
    """Check that ``probs_UCK`` holds probabilities ``[U, C, K]`` and return it unchanged.

    Raises:
        ValueError: on a wrong rank, NaN/inf, negative values, or columns that do not sum
            to one (which usually means logits were passed where probabilities belong).
    """
    if probs_UCK.dim() != 3:
        raise ValueError(
            f"expected probabilities shaped [U, C, K] (units, classes, samples), got shape "
            f"{tuple(probs_UCK.shape)}; add a trailing sample axis with probs.unsqueeze(-1)."
        )
    if probs_UCK.shape[1] < 2:
        raise ValueError(f"expected at least 2 classes, got C={probs_UCK.shape[1]}")
    if probs_UCK.numel() == 0:
        return probs_UCK
    if not torch.isfinite(probs_UCK).all():
        bad = int((~torch.isfinite(probs_UCK)).flatten(1).any(1).sum())
        raise ValueError(
            f"probabilities contain NaN or inf in {bad} of {probs_UCK.shape[0]} units; "
            "check the model's outputs (a diverged training run is the usual cause)."
        )
    if (probs_UCK < 0).any():
        raise ValueError("probabilities must be >= 0; were logits passed? apply softmax first.")
    sums = probs_UCK.sum(dim=1)
    worst = float((sums - 1).abs().max())
    if worst > atol:
        raise ValueError(
            f"probabilities must sum to one over classes (dim 1); the worst unit is off by "
            f"{worst:.3g}. Were logits or unnormalised scores passed? apply softmax first."
        )
    return probs_UCK


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
