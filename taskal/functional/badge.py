"""BADGE (Ash et al. 2020): k-means++ over last-layer gradient embeddings, factorized.

For cross-entropy with the predicted label ``ŷ``, the gradient w.r.t. the last layer's
weights of item ``i`` is the outer product ``g_i = a_i ⊗ h_i`` with ``a_i = p_i - onehot(ŷ_i)``
``[C]`` and ``h_i`` the penultimate embedding ``[D]`` (with a trailing 1 for the bias).
Because ``<a_i ⊗ h_i, a_j ⊗ h_j> = <a_i, a_j><h_i, h_j>``, squared distances follow from
``[N, C]`` and ``[N, D]`` products alone: the ``[N, C x D]`` embedding is never built.
On the CPU the k-means++ seeding prunes (:mod:`taskal.functional.kmeanspp`): after a pick it
reads only the rows whose distance can still shrink, with the plain loop's picks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from taskal.functional.kmeanspp import FactorizedSqDists, kmeans_pp


def gradient_factors(probs_NC: Tensor, emb_ND: Tensor, bias: bool = True) -> tuple[Tensor, Tensor]:
    """Return ``(a_NC, h_ND')`` such that ``g_i = a_i ⊗ h_i`` is the last-layer gradient."""
    if probs_NC.shape[0] != emb_ND.shape[0]:
        raise ValueError(
            f"probs has {probs_NC.shape[0]} rows but embeddings have {emb_ND.shape[0]}"
        )
    a_NC = probs_NC.clone()
    a_NC[torch.arange(a_NC.shape[0]), probs_NC.argmax(1)] -= 1.0
    h_ND = emb_ND
    if bias:
        h_ND = torch.cat([emb_ND, emb_ND.new_ones(emb_ND.shape[0], 1)], dim=1)
    return a_NC, h_ND


def gradient_sq_norms(a_NC: Tensor, h_ND: Tensor) -> Tensor:
    """``||a_i ⊗ h_i||^2 = ||a_i||^2 ||h_i||^2``, ``[N]``."""
    return (a_NC * a_NC).sum(1) * (h_ND * h_ND).sum(1)


def gradient_sq_dists_to(a_NC: Tensor, h_ND: Tensor) -> FactorizedSqDists:
    """``j -> ||g_i - g_j||^2`` for all ``i``, in ``O(N (C + D))`` per call.

    ``||g_i - g_j||^2 = ||g_i||^2 + ||g_j||^2 - 2 <a_i, a_j><h_i, h_j>``: a
    :class:`~taskal.functional.kmeanspp.FactorizedSqDists` with factors ``a`` and ``h``,
    which :func:`~taskal.functional.kmeanspp.kmeans_pp` prunes on the CPU.
    """
    return FactorizedSqDists(a_NC, h_ND)


def badge_select(
    probs_NC: Tensor, emb_ND: Tensor, k: int, generator: torch.Generator | None = None
) -> Tensor:
    """Pick ``k`` items by k-means++ on gradient embeddings; ``[k]`` unique indices.

    The first seed is the item with the largest gradient norm, as in the reference code.
    On the CPU the seeding reads, per pick, only the rows whose distance to their nearest
    seed can still shrink (:func:`~taskal.functional.kmeanspp.kmeans_pp`); picks are those
    of the plain loop, one full pass per pick.
    """
    a_NC, h_ND = gradient_factors(probs_NC.double(), emb_ND.double())
    dists = gradient_sq_dists_to(a_NC, h_ND)
    first = int(dists.sq_norm_N.argmax())
    return kmeans_pp(dists, probs_NC.shape[0], k, first, generator)
