"""Turn scores into picks: the ``k`` highest scores, with ties broken at random.

Breaking ties by pool order is a bias, not a neutral default: on a pool listed folder by folder
(one folder per class) equal scores (saturated probabilities, zero BALD for ``K == 1``, a
constant fallback score) would all go to the first classes. :func:`top_k` breaks ties uniformly
at random with an explicit ``torch.Generator``, so a seeded run is reproducible.
"""

from __future__ import annotations

import torch
from torch import Tensor

from taskal.functional.validation import check_scores


def top_k(scores_N: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Indices of the ``k`` largest scores, highest first, ties broken uniformly at random.

    The pool is shuffled with ``torch.randperm(N, generator=generator)`` and then stably
    sorted by descending score, so among equal scores every order is equally likely, while
    distinct scores keep their exact order (higher score = label first).

    Args:
        scores_N: ``[N]`` finite scores, higher = label first.
        k: how many to pick, ``0 <= k <= N``.
        generator: randomness for tie-breaking (on the CPU or on ``scores_N``'s device);
            ``None`` uses torch's global generator.

    Returns:
        ``[k]`` long indices into ``scores_N`` on its device, unique, in descending score order.

    Raises:
        ValueError: if ``scores_N`` is not 1-D or not finite, or ``k`` is out of range.
    """
    check_scores(scores_N)
    n = int(scores_N.shape[0])
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(
            f"k must be an integer in [0, {n}] (the number of scores), got {k!r}; "
            f"lower k to at most {n}."
        )
    device = generator.device if generator is not None else scores_N.device
    perm_N = torch.randperm(n, generator=generator, device=device).to(scores_N.device)
    order_N = torch.sort(scores_N[perm_N], descending=True, stable=True).indices
    return perm_N[order_N[:k]]
