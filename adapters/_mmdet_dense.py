"""Dense single-stage mmdet heads (``AnchorHead``, ``AnchorFreeHead``) for :class:`MMDetAdapter`.

The head runs once on the neck's levels; its full per-anchor class vectors are taken before
score filtering and top-k. The post-processing is ``BaseDenseHead._predict_by_feat_single``
taken apart at one point only: per level, mmdet's ``filter_scores_and_topk`` (the head's
``score_thr`` and ``nms_pre``) returns the kept anchors and classes, which the adapter turns
into unit ids ``anchor * cls_out_channels + class`` (``anchor`` counts the priors of
``prior_generator.grid_priors`` over all levels of the padded batch); the head's
``bbox_coder.decode`` decodes the kept boxes, and the head's own ``_bbox_post_process``
(score factors such as FCOS's centerness, ``min_bbox_size``, ``batched_nms``, ``max_per_img``)
filters the unit ids with the boxes, since it indexes every field of its ``InstanceData``.

A unit's probabilities are its anchor's class vector: sigmoid, or the softmax over
``C + 1`` (background last) of a softmax head. Score factors only rank boxes, as in mmdet.

Given units (an ensemble's reference boxes) are matched to this model's anchors by their
decoded boxes (:func:`match`), so members with other anchors or other regressions score the
same boxes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from mmdet.models.dense_heads.base_dense_head import BaseDenseHead
from mmdet.models.utils import filter_scores_and_topk
from mmdet.structures.bbox import cat_boxes, get_box_tensor
from mmengine.structures import InstanceData
from torch import Tensor, nn

from taskal.adapters._detection import DenseCache, match_boxes, same_boxes
from taskal.types import Units

_UNIT_FIELD = "taskal_unit"


def check_head(head: nn.Module) -> None:
    """Raise a ``TypeError`` unless ``head`` keeps ``BaseDenseHead``'s post-processing."""
    for name in ("predict_by_feat", "_predict_by_feat_single"):
        if getattr(type(head), name) is not getattr(BaseDenseHead, name):
            raise TypeError(
                f"{type(head).__name__} overrides BaseDenseHead.{name}, so the adapter cannot "
                "map its kept boxes back to their anchors; dense heads that keep mmdet's "
                "standard post-processing (RetinaHead, FCOSHead, ATSSHead, ...) are supported"
            )
    if getattr(getattr(head, "loss_cls", None), "custom_cls_channels", False):
        raise TypeError(f"{type(head).__name__} uses custom class channels; not supported")


def class_scores(head: Any, cls_scores: list[Tensor]) -> Tensor:
    """``[B, A, cls_out_channels]`` logits of every anchor over all levels, mmdet's order."""
    b, c = cls_scores[0].shape[0], head.cls_out_channels
    return torch.cat([x.permute(0, 2, 3, 1).reshape(b, -1, c) for x in cls_scores], 1)


def unit_probs(head: Any, cls_scores: list[Tensor], cache: DenseCache) -> Tensor:
    """The units' anchors' class vectors as probabilities ``[U, cls_out_channels]``; a unit
    this model does not detect gets zeros (sigmoid) or all mass on background (softmax)."""
    logits = class_scores(head, cls_scores)
    lookup, c = cache.lookup, head.cls_out_channels
    anchor = torch.div(lookup.unit_U, c, rounding_mode="floor")
    rows = logits[lookup.owner_U, anchor]
    probs = rows.sigmoid() if head.use_sigmoid_cls else rows.softmax(-1)
    if cache.found is not None:
        missed = torch.zeros_like(probs)
        if not head.use_sigmoid_cls:
            missed[:, -1] = 1.0
        probs = torch.where(cache.found[:, None], probs, missed)
    return probs


def dense(
    head: Any, feats: tuple[Tensor, ...], samples: list[Any], units: Units | None, match_iou: float
) -> tuple[Units, DenseCache, Tensor]:
    """Units, what MC samples re-run on and the units' probabilities ``[U, cls_out_channels]``.

    Given units are scored through their own anchors when each decodes, in this model, to
    the unit's box; otherwise every unit goes to this model's anchor decoding to the very
    box, else to the one overlapping it most (a unit none overlaps with IoU >= ``match_iou``
    is not detected by this model).
    """
    outs = head(feats)
    metas = [s.metainfo for s in samples]
    lookup: Units
    found: Tensor | None = None
    if units is None:
        score_factors = outs[2] if len(outs) > 2 else None
        units = lookup = detect(head, outs[0], outs[1], score_factors, metas)
    else:
        lookup, found = match(head, outs[0], outs[1], metas, units, match_iou)
    cache = DenseCache(list(feats), lookup, found)
    return units, cache, unit_probs(head, outs[0], cache)


def resample(head: Any, cache: DenseCache) -> Tensor:
    """The units' probabilities from one run of the head on cached neck levels."""
    return unit_probs(head, head(tuple(cache.levels))[0], cache)


def decode_all(
    head: Any, cls_scores: list[Tensor], bbox_preds: list[Tensor], metas: list[dict[str, Any]]
) -> list[Tensor]:
    """Every anchor's decoded box ``[A, 4]`` per image, in the units' anchor order."""
    sizes = [x.shape[-2:] for x in cls_scores]
    priors = cat_boxes(
        head.prior_generator.grid_priors(
            sizes, dtype=cls_scores[0].dtype, device=cls_scores[0].device
        )
    )
    size = head.bbox_coder.encode_size
    out = []
    for i, meta in enumerate(metas):
        preds = torch.cat([p[i].permute(1, 2, 0).reshape(-1, size) for p in bbox_preds])
        boxes = head.bbox_coder.decode(priors, preds, max_shape=meta["img_shape"])
        out.append(get_box_tensor(boxes))
    return out


def match(
    head: Any,
    cls_scores: list[Tensor],
    bbox_preds: list[Tensor],
    metas: list[dict[str, Any]],
    units: Units,
    match_iou: float,
) -> tuple[Units, Tensor | None]:
    """The units naming this model's anchors, and which of them it detects (see
    :func:`dense`); ``None`` when the given units are this model's own boxes."""
    assert units.boxes_U4 is not None
    if len(units) == 0:
        return units, None
    c = head.cls_out_channels
    boxes = decode_all(head, cls_scores, bbox_preds, metas)
    anchor = torch.div(units.unit_U, c, rounding_mode="floor")
    if int(anchor.max()) < len(boxes[0]):
        own = torch.stack(boxes)[units.owner_U, anchor]  # every image has all the anchors
        if same_boxes(own, units.boxes_U4):
            return units, None
    matched = torch.empty_like(units.unit_U)
    found = torch.zeros(len(units), dtype=torch.bool, device=units.unit_U.device)
    for i, image_boxes in enumerate(boxes):
        mine = torch.nonzero(units.owner_U == i).flatten()
        if len(mine):
            best, found[mine] = match_boxes(units.boxes_U4[mine], image_boxes, match_iou)
            matched[mine] = best * c + units.unit_U[mine] % c
    return Units(units.owner_U, matched, units.boxes_U4), found


def detect(
    head: Any,
    cls_scores: list[Tensor],
    bbox_preds: list[Tensor],
    score_factors: list[Tensor] | None,
    metas: list[dict[str, Any]],
) -> Units:
    """The head's ``predict_by_feat``, keeping each kept box's anchor and class."""
    sizes = [x.shape[-2:] for x in cls_scores]
    priors = head.prior_generator.grid_priors(
        sizes, dtype=cls_scores[0].dtype, device=cls_scores[0].device
    )
    offsets = torch.cumsum(torch.tensor([0] + [len(p) for p in priors[:-1]]), 0).tolist()
    cfg = copy.deepcopy(head.test_cfg)
    c = head.cls_out_channels
    owners, ids, kept = [], [], []
    for i, meta in enumerate(metas):
        preds, valid, scores, labels, unit, factors = [], [], [], [], [], []
        for level, (offset, level_priors) in enumerate(zip(offsets, priors, strict=True)):
            logits = cls_scores[level][i].permute(1, 2, 0).reshape(-1, c)
            probs = logits.sigmoid() if head.use_sigmoid_cls else logits.softmax(-1)[:, :-1]
            pred = bbox_preds[level][i].permute(1, 2, 0).reshape(-1, head.bbox_coder.encode_size)
            s, label, keep, rest = filter_scores_and_topk(
                probs,
                cfg.get("score_thr", 0),
                cfg.get("nms_pre", -1),
                dict(bbox_pred=pred, priors=level_priors),
            )
            preds.append(rest["bbox_pred"])
            valid.append(rest["priors"])
            scores.append(s)
            labels.append(label)
            unit.append((offset + keep) * c + label)
            if score_factors is not None:
                factors.append(score_factors[level][i].permute(1, 2, 0).reshape(-1)[keep])
        results = InstanceData(
            bboxes=head.bbox_coder.decode(
                cat_boxes(valid), torch.cat(preds), max_shape=meta["img_shape"]
            ),
            scores=torch.cat(scores),
            labels=torch.cat(labels),
        )
        results.set_field(torch.cat(unit), _UNIT_FIELD)
        if score_factors is not None:
            results.score_factors = torch.cat(factors).sigmoid()
        results = head._bbox_post_process(results, cfg, rescale=False, with_nms=True, img_meta=meta)
        if _UNIT_FIELD not in results:
            raise TypeError(
                f"{type(head).__name__}._bbox_post_process dropped the unit ids it was given; "
                "its kept boxes cannot be mapped back to their anchors"
            )
        flat = results.get(_UNIT_FIELD)
        owners.append(torch.full_like(flat, i))
        ids.append(flat)
        kept.append(get_box_tensor(results.bboxes))
    return Units(torch.cat(owners), torch.cat(ids), torch.cat(kept))
