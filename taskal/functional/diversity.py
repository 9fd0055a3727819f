"""Diversity-based selection: k-center greedy (core-set) and k-means++ seeding.

Both work from a *distance-to-one-point* function, ``dist_to(j) -> [N]`` squared distances
from every candidate to point ``j``, and keep a running minimum, so memory is ``O(N)``: no
``N x N`` matrix is ever built. :func:`~taskal.functional.distances.sq_dists_to` gives that
function for plain embeddings; :mod:`taskal.functional.badge` gives it for factorized
gradient embeddings. k-center lives in :mod:`taskal.functional.kcenter`, the distances in
:mod:`taskal.functional.distances`; both are re-exported here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from taskal.functional.distances import DistTo, SqDistsTo, min_sq_dists, sq_dists_to
from taskal.functional.kcenter import KCenterStats, k_center_greedy, k_center_greedy_features


def kmeans_pp(
    dist_to: DistTo,
    num_points: int,
    k: int,
    first: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): sample with probability ∝ D(x)^2.

    Args:
        dist_to: squared distance from every candidate to candidate ``j``.
        num_points: number of candidates ``N``.
        k: number of seeds ``<= N``.
        first: index of the first seed (BADGE uses the largest gradient norm).
        generator: randomness for the D^2 sampling.

    Returns:
        ``[k]`` long unique indices in pick order.
    """
    picks = [first]
    chosen = torch.zeros(num_points, dtype=torch.bool)
    chosen[first] = True
    min_dist_N = dist_to(first).cpu().double()
    while len(picks) < k:
        weights = min_dist_N.masked_fill(chosen, 0.0).clamp_min(0.0)
        if float(weights.sum()) <= 0.0:  # every remaining point duplicates a seed
            weights = (~chosen).double()
        j = int(torch.multinomial(weights, 1, generator=generator))
        picks.append(j)
        chosen[j] = True
        min_dist_N = torch.minimum(min_dist_N, dist_to(j).cpu().double())
    return torch.tensor(picks, dtype=torch.long)


__all__ = [
    "DistTo",
    "KCenterStats",
    "SqDistsTo",
    "k_center_greedy",
    "k_center_greedy_features",
    "kmeans_pp",
    "min_sq_dists",
    "sq_dists_to",
]
