"""Turn per-unit scores (boxes, pixels, regions) into one score per item (baal's ``reduction``)."""

from __future__ import annotations

from torch import Tensor

REDUCTIONS = ("max", "mean", "sum")


def reduce_units(
    scores_U: Tensor, owner_U: Tensor, num_items: int, reduction: str = "max"
) -> Tensor:
    """Aggregate ``scores_U`` into ``[num_items]`` by ``owner_U``.

    Items that own no unit (an image with no detected box) score 0.

    Args:
        scores_U: ``[U]`` unit scores, higher = label first.
        owner_U: ``[U]`` long, the item each unit belongs to, in ``[0, num_items)``.
        num_items: number of items.
        reduction: ``"max"``, ``"mean"`` or ``"sum"``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    if scores_U.shape != owner_U.shape:
        raise ValueError(
            f"scores {tuple(scores_U.shape)} and owner {tuple(owner_U.shape)} must match"
        )
    if owner_U.numel() and (int(owner_U.min()) < 0 or int(owner_U.max()) >= num_items):
        raise ValueError(
            f"owner indices must lie in [0, {num_items}), got "
            f"[{int(owner_U.min())}, {int(owner_U.max())}]"
        )
    out = scores_U.new_zeros(num_items)
    if scores_U.numel() == 0:
        return out
    if reduction == "sum":
        return out.index_add_(0, owner_U, scores_U)
    reduce = "amax" if reduction == "max" else "mean"
    return out.scatter_reduce_(0, owner_U, scores_U, reduce=reduce, include_self=False)
