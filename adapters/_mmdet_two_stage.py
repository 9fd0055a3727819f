"""Two-stage mmdet detectors (an RPN and a ``StandardRoIHead``) for :class:`MMDetAdapter`.

The pass is mmdet's own ``TwoStageDetector.predict`` taken apart so that every kept box keeps
its proposal and class: ``rpn_head.predict`` gives the proposals, the RoI head's
``bbox_roi_extractor`` (and ``shared_head``) pools them, ``bbox_head`` scores them,
``bbox_head.predict_by_feat(..., rcnn_test_cfg=None)`` decodes one box per proposal and
class, and mmdet's ``multiclass_nms(..., return_inds=True)`` applies the head's
``test_cfg.rcnn`` (score threshold, NMS, ``max_per_img``) and returns the flat
``proposal * C + class`` index of every kept box. mmdet puts the background last, so a
unit's probabilities are its proposal's softmax over ``C + 1`` with background at ``C``, and
``unit_U = proposal * (C + 1) + class``.

Images are never resized by the adapter (``scale_factor`` 1), so the input-image boxes that
mmdet decodes (clipped to ``img_shape``) are already in original-image coordinates.
"""

from __future__ import annotations

from typing import Any

import torch
from mmdet.models.layers import multiclass_nms
from mmdet.models.roi_heads import StandardRoIHead
from mmdet.models.roi_heads.bbox_heads import BBoxHead
from mmdet.structures.bbox import bbox2roi
from torch import Tensor, nn

from taskal.types import Units


def check_roi_head(roi_head: nn.Module) -> None:
    """Raise a ``TypeError`` unless ``roi_head`` scores boxes as ``StandardRoIHead`` does,
    with a ``BBoxHead`` that keeps mmdet's softmax post-processing."""
    bbox_head = getattr(roi_head, "bbox_head", None)
    overrides = [
        f"{type(m).__name__}.{name}"
        for m, base, names in (
            (roi_head, StandardRoIHead, ("_bbox_forward", "predict_bbox")),
            (bbox_head, BBoxHead, ("predict_by_feat", "_predict_by_feat_single")),
        )
        for name in names
        if getattr(type(m), name, None) is not getattr(base, name)
    ]
    if not isinstance(bbox_head, BBoxHead) or overrides:
        raise TypeError(
            f"{type(roi_head).__name__} does not score boxes as StandardRoIHead with a BBoxHead "
            f"does ({', '.join(overrides) or 'no BBoxHead'} differ), so the adapter cannot map "
            "its kept boxes back to their proposals; Faster R-CNN's heads are supported"
        )
    if bbox_head.custom_cls_channels:
        raise TypeError(f"{type(bbox_head).__name__} uses custom class channels; not supported")


def roi_features(det: Any, feats: tuple[Tensor, ...], rois: Tensor) -> Tensor:
    """Pooled RoI features ``[N, ...]`` of ``rois`` ``[N, 5]`` as the RoI head pools them."""
    roi_head = det.roi_head
    extractor = roi_head.bbox_roi_extractor
    pooled = extractor(feats[: extractor.num_inputs], rois)
    if roi_head.with_shared_head:
        pooled = roi_head.shared_head(pooled)
    return pooled


def resample(det: Any, pooled: Tensor) -> Tensor:
    """Softmax ``[N, C + 1]`` of one run of the box head on cached RoI features."""
    return det.roi_head.bbox_head(pooled)[0].softmax(-1)


def two_stage(
    det: Any, feats: tuple[Tensor, ...], samples: list[Any], units: Units | None
) -> tuple[Units, Tensor, Tensor]:
    """Units, their cached RoI features and their softmax ``[U, C + 1]``.

    Without ``units`` the kept boxes of the head's own post-processing fix them. With
    ``units`` that are all this model's own detections (the proposal exists and its decoded
    box matches), those proposals are re-scored; otherwise (another ensemble member fixed
    them) every given box is pooled as a proposal through this model's RoI head.
    """
    proposals = [p.bboxes for p in det.rpn_head.predict(feats, samples, rescale=False)]
    counts = [len(p) for p in proposals]
    rois = bbox2roi(proposals)
    pooled = roi_features(det, feats, rois)
    cls_score, bbox_pred = det.roi_head.bbox_head(pooled)
    metas = [s.metainfo for s in samples]
    decoded = det.roi_head.bbox_head.predict_by_feat(
        rois.split(counts),
        cls_score.split(counts),
        bbox_pred.split(counts),
        metas,
        rcnn_test_cfg=None,
        rescale=False,
    )
    rows: Tensor | None
    if units is None:
        units, rows = _detect(det, decoded, counts, rois.device)
    else:
        rows = _own_rows(det, units, decoded, counts)
    if rows is not None:
        return units, pooled[rows], cls_score[rows].softmax(-1)
    assert units.boxes_U4 is not None
    own = torch.cat([units.owner_U[:, None].to(units.boxes_U4.dtype), units.boxes_U4], 1)
    pooled = roi_features(det, feats, own)  # mmdet's RoI rows: (image, x1, y1, x2, y2)
    return units, pooled, resample(det, pooled)


def _detect(
    det: Any, decoded: list[Any], counts: list[int], device: torch.device
) -> tuple[Units, Tensor]:
    """The head's ``test_cfg.rcnn`` through ``multiclass_nms``, keeping proposal and class."""
    cfg = det.roi_head.test_cfg
    c = det.roi_head.bbox_head.num_classes
    owners, ids, kept, rows = [], [], [], []
    start = 0
    for i, (res, n) in enumerate(zip(decoded, counts, strict=True)):
        if n:
            dets, _, flat = multiclass_nms(
                res.bboxes, res.scores, cfg.score_thr, cfg.nms, cfg.max_per_img, return_inds=True
            )
            proposal = torch.div(flat, c, rounding_mode="floor")
            owners.append(torch.full_like(flat, i))
            ids.append(proposal * (c + 1) + flat % c)
            kept.append(dets[:, :4])
            rows.append(start + proposal)
        start += n
    if not owners:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Units(empty, empty.clone(), torch.zeros(0, 4, device=device)), empty.clone()
    return Units(torch.cat(owners), torch.cat(ids), torch.cat(kept)), torch.cat(rows)


def _own_rows(det: Any, units: Units, decoded: list[Any], counts: list[int]) -> Tensor | None:
    """Rows of the units' proposals when all are this model's detections, else ``None``."""
    assert units.boxes_U4 is not None
    c1 = det.roi_head.bbox_head.num_classes + 1
    device = units.owner_U.device
    count = torch.tensor(counts, device=device)
    proposal = torch.div(units.unit_U, c1, rounding_mode="floor")
    if not len(units):
        return proposal
    label = units.unit_U % c1
    if bool((proposal >= count[units.owner_U]).any() or (label == c1 - 1).any()):
        return None  # a proposal this image lacks, or a background unit: not our detection
    rows = torch.cumsum(count, 0)[units.owner_U] - count[units.owner_U] + proposal
    boxes = torch.cat([res.bboxes for res in decoded if len(res.bboxes)])
    boxes = boxes.reshape(len(boxes), -1, 4)  # one box per class, or one class-agnostic box
    label = label if boxes.shape[1] > 1 else torch.zeros_like(rows)
    same = torch.allclose(boxes[rows, label], units.boxes_U4.to(boxes.dtype), atol=1e-4)
    return rows if same else None
