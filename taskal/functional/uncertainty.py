"""Uncertainty scores from class probabilities ``probs_UCK`` ``[U, C, K]``.

All functions return ``[U]`` scores where higher means "ask for this label first". ``K`` is
the number of stochastic samples (MC-dropout passes or ensemble members); deterministic
predictions have ``K == 1``. Inputs must be probabilities (see :func:`check_probs`).

Every function takes ``kind``, the probability kind of :class:`taskal.types.Predictions`:

* ``"softmax"`` (default): ``probs_UCK[u, :, k]`` is one distribution over ``C >= 2``
  classes, and the score is the textbook formula over the ``C`` classes.
* ``"sigmoid"``: ``C >= 1`` independent per-class scores in ``[0, 1]`` (RetinaNet, FCOS,
  multi-label heads). Each class ``c`` is its own binary problem with probabilities
  ``(p_c, 1 - p_c)``; the softmax formula is computed on that 2-class problem for every class
  (``[U, C, K] -> [U * C, 2, K]``) and the unit's score is the **max over classes**: the most
  uncertain class decides the unit. Ranges are then those of a 2-class problem (entropy in
  ``[0, log 2]``, least confidence in ``[0, 1/2]``, margin in ``[0, 1]``) whatever ``C`` is,
  and a one-class head (``C == 1``) scores exactly like softmax on ``[p, 1 - p]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from taskal.functional.validation import check_probs

_EPS = 1e-12

_SoftmaxScore = Callable[[Tensor], Tensor]


def _entropy(p: Tensor, dim: int) -> Tensor:
    return -(p * torch.log(p.clamp_min(_EPS))).sum(dim)


def _score(core: _SoftmaxScore, probs_UCK: Tensor, kind: str) -> Tensor:
    """Validate, then apply a softmax score ``core`` (``[U, C, K] -> [U]``) for ``kind``.

    For ``"sigmoid"`` the core runs on the ``[U * C, 2, K]`` binary problems
    ``(p_c, 1 - p_c)`` and the ``[U, C]`` result is reduced by max over classes.
    """
    check_probs(probs_UCK, kind=kind)
    if kind == "softmax":
        return core(probs_UCK)
    u, c, k = probs_UCK.shape
    p_XK = probs_UCK.reshape(u * c, k)  # X = U * C binary problems
    binary_X2K = torch.stack((p_XK, 1.0 - p_XK), dim=1)
    return core(binary_X2K).reshape(u, c).amax(dim=1)


def least_confidence(probs_UCK: Tensor, *, kind: str = "softmax") -> Tensor:
    """``1 - max_c p̄_c`` of the mean prediction ``p̄`` (over the ``K`` samples).

    Lewis & Gale 1994. Higher = less confident = label first.

    Args:
        probs_UCK: ``[U, C, K]`` probabilities.
        kind: ``"softmax"`` or ``"sigmoid"`` (per-class binary, max over classes).

    Returns:
        ``[U]`` scores in ``[0, 1 - 1/C]`` (softmax) or ``[0, 1/2]`` (sigmoid).
    """
    return _score(_least_confidence, probs_UCK, kind)


def margin(probs_UCK: Tensor, *, kind: str = "softmax") -> Tensor:
    """``1 - (p̄_(1) - p̄_(2))``: a small margin between the two top classes scores high.

    Scheffer et al. 2001. For sigmoid, the margin of class ``c`` is ``|2 p̄_c - 1|`` and the
    unit takes the max over classes of ``1 - margin``.

    Args:
        probs_UCK: ``[U, C, K]`` probabilities.
        kind: ``"softmax"`` or ``"sigmoid"`` (per-class binary, max over classes).

    Returns:
        ``[U]`` scores in ``[0, 1]``; 1 for a tie between the top two.
    """
    return _score(_margin, probs_UCK, kind)


def entropy(probs_UCK: Tensor, *, kind: str = "softmax") -> Tensor:
    """Predictive entropy ``H[p̄]`` of the mean prediction, in nats (Shannon 1948).

    Args:
        probs_UCK: ``[U, C, K]`` probabilities.
        kind: ``"softmax"`` or ``"sigmoid"`` (per-class binary entropy, max over classes).

    Returns:
        ``[U]`` scores in ``[0, log C]`` (softmax) or ``[0, log 2]`` (sigmoid).
    """
    return _score(_entropy_core, probs_UCK, kind)


def bald(probs_UCK: Tensor, *, kind: str = "softmax") -> Tensor:
    """BALD mutual information ``H[p̄] - mean_k H[p_k]`` (Houlsby et al. 2011; Gal et al. 2017).

    Needs ``K > 1`` samples to be informative (it is 0 for ``K == 1``).

    Args:
        probs_UCK: ``[U, C, K]`` probabilities.
        kind: ``"softmax"`` or ``"sigmoid"`` (per-class binary BALD, max over classes).

    Returns:
        ``[U]`` scores in ``[0, log C]`` (softmax) or ``[0, log 2]`` (sigmoid).
    """
    return _score(_bald, probs_UCK, kind)


def variation_ratios(probs_UCK: Tensor, *, kind: str = "softmax") -> Tensor:
    """``1 - (votes for the modal class) / K`` over the K samples' argmax (Freeman 1965).

    For sigmoid a sample votes "positive" for class ``c`` when ``p_c >= 1/2``.

    Args:
        probs_UCK: ``[U, C, K]`` probabilities.
        kind: ``"softmax"`` or ``"sigmoid"`` (per-class binary votes, max over classes).

    Returns:
        ``[U]`` scores in ``[0, 1 - 1/C]`` (softmax) or ``[0, 1/2]`` (sigmoid); 0 when all
        samples agree.
    """
    return _score(_variation_ratios, probs_UCK, kind)


def mean_std(probs_UCK: Tensor, *, kind: str = "softmax") -> Tensor:
    """Mean over classes of the std over samples (Kampffmeyer et al. 2016; Kendall et al. 2015).

    For sigmoid the 2-class mean of class ``c`` is the std of ``p_c`` over samples (``p_c``
    and ``1 - p_c`` have the same std); the unit takes the max over classes.

    Args:
        probs_UCK: ``[U, C, K]`` probabilities.
        kind: ``"softmax"`` or ``"sigmoid"`` (per-class binary, max over classes).

    Returns:
        ``[U]`` scores in ``[0, 1/2]``; 0 for ``K == 1``.
    """
    return _score(_mean_std, probs_UCK, kind)


def vote_entropy(probs_UCK: Tensor, *, kind: str = "softmax") -> Tensor:
    """Entropy of the committee's vote distribution (Dagan & Engelson 1995), ``K`` members.

    Args:
        probs_UCK: ``[U, C, K]`` probabilities.
        kind: ``"softmax"`` or ``"sigmoid"`` (per-class binary votes, max over classes).

    Returns:
        ``[U]`` scores in ``[0, log min(C, K)]`` (softmax) or ``[0, log 2]`` (sigmoid).
    """
    return _score(_vote_entropy, probs_UCK, kind)


def mean_kl(probs_UCK: Tensor, *, kind: str = "softmax") -> Tensor:
    """Mean KL divergence of each member to the consensus, ``mean_k KL(p_k || p̄)``.

    McCallum & Nigam 1998 ("KL to the mean"); for a deep ensemble (Beluch et al. 2018) the
    members are the ``K`` axis. Mathematically this equals :func:`bald` on the same samples.

    Args:
        probs_UCK: ``[U, C, K]`` probabilities.
        kind: ``"softmax"`` or ``"sigmoid"`` (per-class binary KL, max over classes).

    Returns:
        ``[U]`` scores in ``[0, log C]`` (softmax) or ``[0, log 2]`` (sigmoid).
    """
    return _score(_mean_kl, probs_UCK, kind)


# Softmax cores: [U, C, K] valid probabilities -> [U]; no validation (done by _score).


def _least_confidence(probs_UCK: Tensor) -> Tensor:
    return 1.0 - probs_UCK.mean(-1).max(dim=1).values


def _margin(probs_UCK: Tensor) -> Tensor:
    top2_U2 = probs_UCK.mean(-1).topk(2, dim=1).values
    return 1.0 - (top2_U2[:, 0] - top2_U2[:, 1])


def _entropy_core(probs_UCK: Tensor) -> Tensor:
    return _entropy(probs_UCK.mean(-1), dim=1)


def _bald(probs_UCK: Tensor) -> Tensor:
    expected_U = _entropy(probs_UCK, dim=1).mean(-1)
    return (_entropy(probs_UCK.mean(-1), dim=1) - expected_U).clamp_min(0.0)


def _variation_ratios(probs_UCK: Tensor) -> Tensor:
    votes_UC = _vote_counts(probs_UCK)
    return 1.0 - votes_UC.max(dim=1).values / probs_UCK.shape[-1]


def _mean_std(probs_UCK: Tensor) -> Tensor:
    if probs_UCK.shape[-1] < 2 or probs_UCK.numel() == 0:
        return probs_UCK.new_zeros(probs_UCK.shape[0])
    return probs_UCK.std(dim=-1, unbiased=False).mean(dim=1)


def _vote_entropy(probs_UCK: Tensor) -> Tensor:
    votes_UC = _vote_counts(probs_UCK) / probs_UCK.shape[-1]
    return _entropy(votes_UC, dim=1)


def _mean_kl(probs_UCK: Tensor) -> Tensor:
    mean_UC1 = probs_UCK.mean(-1, keepdim=True)
    log_ratio = torch.log(probs_UCK.clamp_min(_EPS)) - torch.log(mean_UC1.clamp_min(_EPS))
    return (probs_UCK * log_ratio).sum(1).mean(-1).clamp_min(0.0)


def _vote_counts(probs_UCK: Tensor) -> Tensor:
    winners_UK = probs_UCK.argmax(dim=1)
    votes_UC = torch.zeros(
        probs_UCK.shape[0], probs_UCK.shape[1], dtype=probs_UCK.dtype, device=probs_UCK.device
    )
    return votes_UC.scatter_add_(1, winners_UK, torch.ones_like(winners_UK, dtype=votes_UC.dtype))
