"""Diversity-based selection: k-center greedy (core-set) and k-means++ seeding.

Both work from a *distance-to-one-point* function, ``dist_to(j) -> [N]`` squared distances
from every candidate to point ``j``, and keep a running minimum, so memory is ``O(N)``: no
``N x N`` matrix is ever built. :func:`~taskal.functional.distances.sq_dists_to` gives that
function for plain embeddings; :mod:`taskal.functional.badge` gives it for factorized
gradient embeddings. k-center lives in :mod:`taskal.functional.kcenter`, k-means++ in
:mod:`taskal.functional.kmeanspp`, the distances in :mod:`taskal.functional.distances`; all
are re-exported here.
"""

from __future__ import annotations

from taskal.functional.distances import DistTo, SqDistsTo, min_sq_dists, sq_dists_to
from taskal.functional.kcenter import KCenterStats, k_center_greedy, k_center_greedy_features
from taskal.functional.kmeanspp import FactorizedSqDists, KMeansPPStats, kmeans_pp

__all__ = [
    "DistTo",
    "FactorizedSqDists",
    "KCenterStats",
    "KMeansPPStats",
    "SqDistsTo",
    "k_center_greedy",
    "k_center_greedy_features",
    "kmeans_pp",
    "min_sq_dists",
    "sq_dists_to",
]
