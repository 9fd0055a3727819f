"""Diversity-based selection: k-center greedy (core-set) and k-means++ seeding.

Both work from a *distance-to-one-point* function, ``dist_to(j) -> [N]`` squared distances
from every candidate to point ``j``, and keep a running minimum, so memory is ``O(N)``: no
``N x N`` matrix is ever built. :func:`sq_dists_to` gives that function for plain
embeddings; :mod:`taskal.functional.badge` gives it for factorized gradient embeddings.
"""

from __future__ import annotations

import math
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


def min_sq_dists(x_ND: Tensor, centers_MD: Tensor, max_block: int = 2**20) -> Tensor:
    """``min_m ||x_i - c_m||^2``: squared distance of every row of ``x_ND`` to its nearest center.

    The core-set initialisation (Sener & Savarese 2018): the distance of every candidate to
    the labeled set. Rows and centers are processed in blocks of at most ``max_block``
    distances (``rows_per_block * centers_per_block <= max_block``), each computed as
    ``||c||^2 - 2 x.c`` and folded into an ``O(N)`` running minimum, to which ``||x||^2`` is
    added at the end (clamped at 0). Extra memory is ``O(N + M + max_block)`` whatever ``N``
    and ``M`` are (``2**20`` float64 distances are 8 MiB per block).

    Args:
        x_ND: ``[N, D]`` candidate embeddings.
        centers_MD: ``[M, D]`` center (labeled) embeddings, same dtype and device.
        max_block: the most distances held in one block, ``>= 1``.

    Returns:
        ``[N]`` squared distances ``>= 0`` in ``x_ND``'s dtype (``inf`` when ``M == 0``);
        higher = farther from every center (core-set picks the highest first).
    """
    if x_ND.dim() != 2 or centers_MD.dim() != 2 or x_ND.shape[1] != centers_MD.shape[1]:
        raise ValueError(
            f"expected x [N, D] and centers [M, D] with the same D, got {tuple(x_ND.shape)} "
            f"and {tuple(centers_MD.shape)}"
        )
    if isinstance(max_block, bool) or not isinstance(max_block, int) or max_block < 1:
        raise ValueError(f"max_block must be a positive integer, got {max_block!r}")
    n, m = int(x_ND.shape[0]), int(centers_MD.shape[0])
    cols = max(1, min(m, math.isqrt(max_block)))
    rows = max(1, min(n, max_block // cols))
    cols = max(1, min(m, max_block // rows))  # widen when N is small
    sq_norm_N = (x_ND * x_ND).sum(1)
    sq_norm_1M = (centers_MD * centers_MD).sum(1)[None]
    centers_DM = centers_MD.T.contiguous()
    # min_m ||x - c_m||^2 = ||x||^2 + min_m (||c_m||^2 - 2 x.c_m): ||x||^2 joins after the min
    out_N = torch.full((n,), float("inf"), dtype=x_ND.dtype, device=x_ND.device)
    for r0 in range(0, n, rows):
        best_R = out_N[r0 : r0 + rows]
        for c0 in range(0, m, cols):
            block_RC = torch.addmm(
                sq_norm_1M[:, c0 : c0 + cols],
                x_ND[r0 : r0 + rows],
                centers_DM[:, c0 : c0 + cols],
                alpha=-2.0,
            )
            torch.minimum(best_R, block_RC.amin(dim=1), out=best_R)
    return out_N.add_(sq_norm_N).clamp_min_(0.0)


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
        generator: randomness for the first pick and for breaking ties between equally
            distant points.

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
    # ties (duplicate embeddings) go to a random priority, not to the first in pool order
    priority_N = torch.rand(num_points, generator=generator).to(min_dist_N.device)
    while len(picks) < budget:
        masked = min_dist_N.masked_fill(chosen, -1.0)
        best = masked.max()
        j = int(torch.where(masked == best, priority_N, -1.0).argmax())
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
