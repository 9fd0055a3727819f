"""Diversity-based selection: k-center greedy (core-set) and k-means++ seeding.

Both work from a *distance-to-one-point* function, ``dist_to(j) -> [N]`` squared distances
from every candidate to point ``j``, and keep a running minimum, so memory is ``O(N)``: no
``N x N`` matrix is ever built. :func:`sq_dists_to` gives that function for plain
embeddings; :mod:`taskal.functional.badge` gives it for factorized gradient embeddings.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

DistTo = Callable[[int], Tensor]


def sq_dists_to(x_ND: Tensor) -> DistTo:
    """Return ``j -> ||x_i - x_j||^2`` for all ``i`` (``[N]``, float, clamped at 0)."""
    sq_norm_N = (x_ND * x_ND).sum(1)

    def dist_to(j: int) -> Tensor:
        return (sq_norm_N + sq_norm_N[j] - 2.0 * (x_ND @ x_ND[j])).clamp_min(0.0)

    return dist_to


def min_sq_dists(x_ND: Tensor, centers_MD: Tensor, chunk: int = 4096) -> Tensor:
    """``min_m ||x_i - c_m||^2`` for every row of ``x_ND``, in chunks of ``chunk`` centers."""
    out = torch.full((x_ND.shape[0],), float("inf"), dtype=x_ND.dtype, device=x_ND.device)
    for start in range(0, centers_MD.shape[0], chunk):
        block = torch.cdist(x_ND, centers_MD[start : start + chunk]).pow(2)
        out = torch.minimum(out, block.min(dim=1).values)
    return out


def k_center_greedy(
    dist_to: DistTo,
    num_points: int,
    budget: int,
    init_min_dist_N: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Greedy k-center (Sener & Savarese 2018, core-set): repeatedly pick the farthest point.

    Args:
        dist_to: squared distance from every candidate to candidate ``j``.
        num_points: number of candidates ``N``.
        budget: how many to pick, ``<= N``.
        init_min_dist_N: squared distance of every candidate to its nearest already-labeled
            point; ``None`` when nothing is labeled (the first pick is then random).
        generator: randomness for the first pick only.

    Returns:
        ``[budget]`` long indices into the candidates, in pick order, unique.
    """
    if init_min_dist_N is None:
        first = int(torch.randint(num_points, (1,), generator=generator))
        min_dist_N = dist_to(first)
        picks = [first]
    else:
        min_dist_N = init_min_dist_N.clone()
        picks = []
    chosen = torch.zeros(num_points, dtype=torch.bool, device=min_dist_N.device)
    chosen[picks] = True
    while len(picks) < budget:
        masked = min_dist_N.masked_fill(chosen, -1.0)
        j = int(masked.argmax())
        picks.append(j)
        chosen[j] = True
        min_dist_N = torch.minimum(min_dist_N, dist_to(j))
    return torch.tensor(picks, dtype=torch.long)


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
