"""Turn per-unit scores (boxes, pixels) into one score per item or per region.

:func:`reduce_units` gives one score per item (baal's ``reduction``); :func:`reduce_regions`
gives one score and one annotation cost per ``(item, region)`` pair, for region queries
(label a box, a superpixel or a patch instead of a whole image).
"""

from __future__ import annotations

import torch
from torch import Tensor

from taskal.types import rank_within_owner

REDUCTIONS = ("max", "mean", "sum")
#: item-level reductions: the region ones plus the mean of each item's ``k`` best units.
ITEM_REDUCTIONS = (*REDUCTIONS, "topk_mean")


def reduce_units(
    scores_U: Tensor,
    owner_U: Tensor,
    num_items: int,
    reduction: str = "max",
    k: int = 3,
    empty: float = 0.0,
) -> Tensor:
    """Aggregate ``scores_U`` into ``[num_items]`` by ``owner_U``.

    Args:
        scores_U: ``[U]`` unit scores, higher = label first.
        owner_U: ``[U]`` long, the item each unit belongs to, in ``[0, num_items)``.
        num_items: number of items.
        reduction: ``"max"``, ``"mean"``, ``"sum"`` or ``"topk_mean"`` (the mean of the
            item's ``k`` highest unit scores, or of all of them when it has fewer).
        k: units averaged by ``"topk_mean"``.
        empty: the score of an item that owns no unit (an image with no detected box):
            0 ranks it with the most certain images; a large value asks for it first.
    """
    if reduction not in ITEM_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {ITEM_REDUCTIONS}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
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
    has_units = torch.zeros(num_items, dtype=torch.bool, device=scores_U.device)
    has_units[owner_U] = True
    if reduction == "topk_mean" and scores_U.numel():
        # in descending score order, a unit's rank inside its item; keep ranks < k
        by_score = torch.sort(scores_U, descending=True, stable=True).indices
        top = by_score[rank_within_owner(owner_U[by_score]) < k]
        scores_U, owner_U, reduction = scores_U[top], owner_U[top], "mean"
    if scores_U.numel():
        if reduction == "sum":
            out.index_add_(0, owner_U, scores_U)
        else:
            reduce = "amax" if reduction == "max" else "mean"
            out.scatter_reduce_(0, owner_U, scores_U, reduce=reduce, include_self=False)
    return out.masked_fill(~has_units, float(empty))


def reduce_regions(
    scores_U: Tensor,
    owner_U: Tensor,
    region_U: Tensor,
    cost_U: Tensor | None = None,
    reduction: str = "max",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Aggregate unit scores and costs into one row per distinct ``(owner, region)`` pair.

    Args:
        scores_U: ``[U]`` unit scores, higher = label first.
        owner_U: ``[U]`` integer, the item each unit belongs to, ``>= 0``.
        region_U: ``[U]`` integer, the region each unit falls in inside its item, ``>= 0``
            (:meth:`taskal.types.Predictions.regions`).
        cost_U: ``[U]`` annotation cost each unit adds to its region, ``>= 0``; ``None``
            counts 1 per unit.
        reduction: how a region's unit scores combine: ``"max"``, ``"mean"`` or ``"sum"``.

    Returns:
        ``(owner_R, region_R, score_R, cost_R)``, one entry per distinct pair, sorted by
        ``(owner, region)``: long ``owner_R`` and ``region_R``, ``score_R`` (the reduced
        scores, higher = label first, in ``scores_U``'s dtype) and ``cost_R`` (summed costs, in
        ``cost_U``'s dtype, else ``scores_U``'s).

    Raises:
        ValueError: on an unknown reduction, tensors that are not all ``[U]``, non-integer or
            negative owners or regions, or negative costs.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    if scores_U.dim() != 1:
        raise ValueError(f"scores must be 1-D [U], got shape {tuple(scores_U.shape)}")
    named = {"owner": owner_U, "region": region_U}
    if cost_U is not None:
        named["cost"] = cost_U
    for name, t in named.items():
        if t.shape != scores_U.shape:
            raise ValueError(
                f"{name} {tuple(t.shape)} must match scores {tuple(scores_U.shape)}: one entry "
                "per unit"
            )
    for name, t in (("owner", owner_U), ("region", region_U)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} ids must be an integer tensor, got {t.dtype}")
        if t.numel() and int(t.min()) < 0:
            raise ValueError(
                f"{name} ids must be >= 0, got a minimum of {int(t.min())}; use "
                f"Predictions.regions() for one region per unit"
            )
    if cost_U is None:
        cost_U = torch.ones_like(scores_U)
    elif cost_U.numel() and bool((cost_U < 0).any()):
        raise ValueError(f"costs must be >= 0, got a minimum of {float(cost_U.min()):.3g}")
    owner_U, region_U = owner_U.long(), region_U.long()
    span = int(region_U.max()) + 1 if region_U.numel() else 1
    key_R, inverse_U = torch.unique(owner_U * span + region_U, return_inverse=True)  # sorted
    num_regions = int(key_R.shape[0])
    cost_R = cost_U.new_zeros(num_regions).index_add_(0, inverse_U, cost_U)
    score_R = scores_U.new_zeros(num_regions)
    if reduction == "sum":
        score_R.index_add_(0, inverse_U, scores_U)
    else:
        reduce = "amax" if reduction == "max" else "mean"
        score_R.scatter_reduce_(0, inverse_U, scores_U, reduce=reduce, include_self=False)
    return key_R // span, key_R % span, score_R, cost_R


def region_class_counts(
    classes_U: Tensor, owner_U: Tensor, region_U: Tensor, num_classes: int
) -> Tensor:
    """``[R, C]`` how many units of each region are predicted as each class, one row per
    distinct ``(owner, region)`` pair in :func:`reduce_regions`'s order.

    Args:
        classes_U: ``[U]`` predicted class of every unit, ``0..num_classes-1``.
        owner_U: ``[U]`` item of every unit, ``>= 0``.
        region_U: ``[U]`` region of every unit inside its item, ``>= 0``.
        num_classes: ``C``.

    Raises:
        ValueError: tensors of other shapes, or classes outside ``0..C-1``.
    """
    if not (classes_U.shape == owner_U.shape == region_U.shape) or classes_U.dim() != 1:
        raise ValueError(
            "classes, owners and regions must all be [U], got "
            f"{tuple(classes_U.shape)}, {tuple(owner_U.shape)}, {tuple(region_U.shape)}"
        )
    classes_U = classes_U.long()
    if classes_U.numel() and (int(classes_U.min()) < 0 or int(classes_U.max()) >= num_classes):
        raise ValueError(f"predicted classes must lie in 0..{num_classes - 1}")
    owner_U, region_U = owner_U.long(), region_U.long()
    span = int(region_U.max()) + 1 if region_U.numel() else 1
    key_R, inverse_U = torch.unique(owner_U * span + region_U, return_inverse=True)  # sorted
    counts_RC = torch.zeros(len(key_R), num_classes, dtype=torch.float64, device=classes_U.device)
    ones = torch.ones_like(classes_U, dtype=torch.float64)
    return counts_RC.index_put_((inverse_U, classes_U), ones, accumulate=True)


def region_impurity(
    classes_U: Tensor, owner_U: Tensor, region_U: Tensor, num_classes: int
) -> Tensor:
    """``[R]`` entropy (nats) of the predicted classes' histogram in each region, one entry
    per distinct ``(owner, region)`` pair in :func:`reduce_regions`'s order.

    A region predicted as one class has impurity 0; one split evenly over ``m`` classes has
    ``log m``. RIPU (Xie et al. 2022) multiplies it with the region's uncertainty, so that
    regions on class boundaries, where several classes meet, are asked first. Arguments and
    errors as :func:`region_class_counts`.
    """
    counts_RC = region_class_counts(classes_U, owner_U, region_U, num_classes)
    share = counts_RC / counts_RC.sum(1, keepdim=True)
    return -(share * share.clamp(min=1e-300).log()).sum(1)
