"""Uncertainty scores from class probabilities ``probs_UCK`` ``[U, C, K]``.

All functions return ``[U]`` scores where higher means "ask for this label first". ``K`` is
the number of stochastic samples (MC-dropout passes or ensemble members); deterministic
predictions have ``K == 1``. Inputs must be probabilities (see :func:`check_probs`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from taskal.functional.validation import check_probs

_EPS = 1e-12


def _entropy(p: Tensor, dim: int) -> Tensor:
    return -(p * torch.log(p.clamp_min(_EPS))).sum(dim)


def least_confidence(probs_UCK: Tensor) -> Tensor:
    """``1 - max_c p̄_c`` of the mean prediction; in ``[0, 1 - 1/C]``."""
    mean_UC = check_probs(probs_UCK).mean(-1)
    return 1.0 - mean_UC.max(dim=1).values


def margin(probs_UCK: Tensor) -> Tensor:
    """``1 - (p̄_(1) - p̄_(2))``: small margin between the two top classes scores high.

    Scheffer et al. 2001; in ``[0, 1]``.
    """
    mean_UC = check_probs(probs_UCK).mean(-1)
    top2 = mean_UC.topk(2, dim=1).values
    return 1.0 - (top2[:, 0] - top2[:, 1])


def entropy(probs_UCK: Tensor) -> Tensor:
    """Predictive entropy ``H[p̄]`` of the mean prediction (nats); in ``[0, log C]``."""
    mean_UC = check_probs(probs_UCK).mean(-1)
    return _entropy(mean_UC, dim=1)


def bald(probs_UCK: Tensor) -> Tensor:
    """BALD mutual information ``H[p̄] - mean_k H[p_k]`` (Houlsby et al. 2011; Gal et al. 2017).

    Needs ``K > 1`` samples to be informative (it is 0 for ``K == 1``); in ``[0, log C]``.
    """
    check_probs(probs_UCK)
    mean_UC = probs_UCK.mean(-1)
    expected_U = _entropy(probs_UCK, dim=1).mean(-1)
    return (_entropy(mean_UC, dim=1) - expected_U).clamp_min(0.0)


def variation_ratios(probs_UCK: Tensor) -> Tensor:
    """``1 - (votes for the modal class) / K`` over the K samples' argmax (Freeman 1965)."""
    check_probs(probs_UCK)
    votes_UC = _vote_counts(probs_UCK)
    return 1.0 - votes_UC.max(dim=1).values / probs_UCK.shape[-1]


def mean_std(probs_UCK: Tensor) -> Tensor:
    """Mean over classes of the std over samples (Kampffmeyer et al. 2016; Kendall et al. 2015)."""
    check_probs(probs_UCK)
    if probs_UCK.shape[-1] < 2:
        return probs_UCK.new_zeros(probs_UCK.shape[0])
    return probs_UCK.std(dim=-1, unbiased=False).mean(dim=1)


def vote_entropy(probs_UCK: Tensor) -> Tensor:
    """Entropy of the committee's vote distribution (Dagan & Engelson 1995), ``K`` members."""
    check_probs(probs_UCK)
    votes_UC = _vote_counts(probs_UCK) / probs_UCK.shape[-1]
    return _entropy(votes_UC, dim=1)


def mean_kl(probs_UCK: Tensor) -> Tensor:
    """Mean KL divergence of each member to the consensus, ``mean_k KL(p_k || p̄)``.

    McCallum & Nigam 1998 ("KL to the mean"); for a deep ensemble (Beluch et al. 2018) the
    members are the ``K`` axis. Mathematically this equals :func:`bald` on the same samples.
    """
    check_probs(probs_UCK)
    mean_UC1 = probs_UCK.mean(-1, keepdim=True)
    log_ratio = torch.log(probs_UCK.clamp_min(_EPS)) - torch.log(mean_UC1.clamp_min(_EPS))
    return (probs_UCK * log_ratio).sum(1).mean(-1).clamp_min(0.0)


def _vote_counts(probs_UCK: Tensor) -> Tensor:
    winners_UK = probs_UCK.argmax(dim=1)
    votes_UC = torch.zeros(
        probs_UCK.shape[0], probs_UCK.shape[1], dtype=probs_UCK.dtype, device=probs_UCK.device
    )
    return votes_UC.scatter_add_(1, winners_UK, torch.ones_like(winners_UK, dtype=votes_UC.dtype))
