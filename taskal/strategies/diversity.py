"""Diversity strategies: core-set (k-center greedy) and BADGE."""

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

    Already-labeled items are the initial centers; memory stays ``O(N)`` (no ``N x N``).
    """

    requires = frozenset({"embeddings", "labeled_embeddings"})

    def select(
        self, outputs: PoolOutputs, budget: int, generator: torch.Generator | None = None
    ) -> Tensor:
        if outputs.embeddings_ND is None:
            raise ValueError("coreset needs embeddings; none were gathered")
        emb_ND = outputs.embeddings_ND.double()
        init = None
        labeled = outputs.labeled_embeddings_LD
        if labeled is not None and labeled.shape[0] > 0:
            init = F.min_sq_dists(emb_ND, labeled.double().to(emb_ND.device))
        picks = F.k_center_greedy(F.sq_dists_to(emb_ND), len(outputs), budget, init, generator)
        return picks


@QUERY_STRATEGIES.register_module(name="badge")
class BADGE(QueryStrategy):
    """BADGE (Ash et al., ICLR 2020): k-means++ seeding on last-layer gradient embeddings.

    Works on item-level predictions (one unit per item, as in classification).
    """

    requires = frozenset({"probs", "embeddings"})

    def select(
        self, outputs: PoolOutputs, budget: int, generator: torch.Generator | None = None
    ) -> Tensor:
        p, emb_ND = outputs.predictions, outputs.embeddings_ND
        if p is None or emb_ND is None:
            raise ValueError("badge needs predictions and embeddings; none were gathered")
        if p.num_units != len(outputs) or not torch.equal(
            p.owner_U.cpu(), torch.arange(len(outputs))
        ):
            raise ValueError(
                "badge needs exactly one prediction per item (image-level units, in item "
                f"order); got {p.num_units} units for {len(outputs)} items"
            )
        probs_NC = F.check_probs(p.probs_UCK).mean(-1)
        return F.badge_select(probs_NC, emb_ND.to(probs_NC.device), budget, generator)
