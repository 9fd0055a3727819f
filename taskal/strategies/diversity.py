"""Diversity strategies: core-set (k-center greedy) and BADGE.

Both work on one embedding per item (``[N, D]``), which grows with the pool's item count
only, never with its pixel or anchor count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from taskal import functional as F
from taskal.registry import QUERY_STRATEGIES
from taskal.strategies.base import QueryStrategy
from taskal.types import PoolOutputs


@QUERY_STRATEGIES.register_module(name="coreset")
class CoreSet(QueryStrategy):
    """Core-set by greedy k-center in embedding space (Sener & Savarese, ICLR 2018).

    Already-labeled items are the initial centers; memory stays ``O(N)`` in the candidates
    and the labeled items alike (no ``N x N`` or ``N x L`` matrix).
    """

    requires = frozenset({"embeddings", "labeled_embeddings"})

    def select(
        self, outputs: PoolOutputs, budget: int, generator: torch.Generator | None = None
    ) -> Tensor:
        if outputs.embeddings_ND is None:
            raise ValueError("coreset needs embeddings; none were gathered")
        # float64 as before: the pruned search picks exactly what the plain loop picks
        emb_ND = outputs.embeddings_ND.double()
        labeled = outputs.labeled_embeddings_LD
        if labeled is not None:
            labeled = labeled.double().to(emb_ND.device)
        return F.k_center_greedy_features(emb_ND, budget, labeled, generator)


@QUERY_STRATEGIES.register_module(name="badge")
class BADGE(QueryStrategy):
    """BADGE (Ash et al., ICLR 2020): k-means++ seeding on last-layer gradient embeddings.

    Needs image-level softmax predictions (one unit per item, as in classification).
    """

    requires = frozenset({"item_probs", "embeddings"})

    def select(
        self, outputs: PoolOutputs, budget: int, generator: torch.Generator | None = None
    ) -> Tensor:
        probs_NC, emb_ND = outputs.probs_NC, outputs.embeddings_ND
        if probs_NC is None or emb_ND is None:
            raise ValueError("badge needs item probabilities and embeddings; none were gathered")
        return F.badge_select(probs_NC, emb_ND.to(probs_NC.device), budget, generator)
