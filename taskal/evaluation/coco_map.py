"""COCO box mAP of an adapter's detections, computed by pycocotools' ``COCOeval``.

:func:`coco_map` runs the adapter's deterministic pass over a
:class:`~taskal.data.CocoDetectionPool` (labels stripped, as during selection), turns every
unit (a kept box) into one COCO result ``{image_id, category_id, bbox [x, y, w, h], score}``
with the unit's best *foreground* class, and scores the results against the pool's own
``COCO`` object, restricted to the evaluated images::

    metrics = coco_map(adapter, test_pool)  # {"mAP": ..., "mAP50": ..., "mAP75": ...}
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from taskal.data.coco import CocoDetectionPool
from taskal.functional import foreground
from taskal.types import ItemId, Predictions

#: the metrics :func:`coco_map` returns, as indices into ``COCOeval.stats``.
METRICS = {"mAP": 0, "mAP50": 1, "mAP75": 2}


def default_background(adapter: Any) -> int | None:
    """The background column of ``adapter``'s probabilities, as the adapter declares it
    (``adapter.background``: 0 for torchvision's Faster R-CNN); ``None`` when it declares
    none (sigmoid heads, softmax over foreground classes only)."""
    return getattr(adapter, "background", None)


def detections_to_coco(
    predictions: Predictions,
    image_ids: Sequence[int],
    label_to_cat_id: Sequence[int],
    background: int | None,
) -> list[dict[str, Any]]:
    """COCO results of one batch: one per unit, with its best foreground class.

    Args:
        predictions: units with ``boxes_U4`` (xyxy, original image pixels); the class
            probabilities are averaged over the ``K`` samples.
        image_ids: COCO image id of every batch position (``owner_U`` indexes it).
        label_to_cat_id: label index ``0..C_fg-1`` -> COCO category id.
        background: the column of ``probs_UCK`` that is background, left out before taking
            the best class; the remaining columns, in order, are labels ``0..C_fg-1``.
            ``None``: every column is a foreground label.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``, ``score`` = the
        best foreground probability in ``[0, 1]``.

    Raises:
        ValueError: no boxes, or the foreground columns do not match ``label_to_cat_id``.
    """
    if predictions.boxes_U4 is None:
        raise ValueError("coco_map needs detection units: the predictions carry no boxes_U4")
    probs_UC = predictions.probs_UCK.detach().float().mean(-1).cpu()
    num_columns = probs_UC.shape[1]
    probs_UC = foreground(probs_UC, background)
    if probs_UC.shape[1] != len(label_to_cat_id):
        raise ValueError(
            f"the adapter scores {probs_UC.shape[1]} foreground classes (of {num_columns} "
            f"columns, background={background}) but the pool has {len(label_to_cat_id)}; "
            "pass background= the background column (e.g. 0 for a C + 1 softmax with "
            "background first) or build the detector for the pool's classes"
        )
    if probs_UC.shape[0] == 0:
        return []
    scores_U, labels_U = probs_UC.max(dim=1)
    boxes_U4 = predictions.boxes_U4.detach().float().cpu()
    xywh_U4 = torch.cat([boxes_U4[:, :2], boxes_U4[:, 2:] - boxes_U4[:, :2]], dim=1)
    owners = predictions.owner_U.cpu().tolist()
    return [
        {
            "image_id": int(image_ids[owner]),
            "category_id": int(label_to_cat_id[label]),
            "bbox": [float(v) for v in box],
            "score": float(score),
        }
        for owner, label, box, score in zip(
            owners, labels_U.tolist(), xywh_U4.tolist(), scores_U.tolist(), strict=True
        )
    ]


def coco_map(
    adapter: Any,
    pool: CocoDetectionPool,
    ids: Sequence[ItemId] | None = None,
    batch_size: int = 8,
    progress: bool = False,
    background: int | Literal["auto"] | None = "auto",
) -> dict[str, float]:
    """COCO box mAP of ``adapter``'s detections on ``pool`` (``ids``, all items by default).

    Each batch reaches ``adapter.predict(batch, n_samples=1)`` through
    :meth:`~taskal.types.Batch.without_labels`, so no ground truth reaches the adapter. Every
    unit becomes one detection scored by its best foreground class (see
    :func:`detections_to_coco`); ``COCOeval(iouType="bbox")`` then evaluates them against
    ``pool.coco`` on the evaluated images only (``params.imgIds``), its prints silenced.

    Args:
        adapter: a detection adapter (units are boxes in original-image xyxy pixels).
        pool: the COCO pool whose ground truth is the reference.
        ids: the items to evaluate.
        batch_size: images per ``predict`` call.
        progress: show a progress bar.
        background: the background column of the adapter's probabilities, left out when
            picking a box's class; ``None`` = no background column. ``"auto"`` (default):
            :func:`default_background` (``adapter.background``, else ``None``).
            An mmdet two-stage softmax puts background last: pass ``background=C``.

    Returns:
        ``{"mAP": AP@[.50:.95], "mAP50": AP@.50, "mAP75": AP@.75}`` (area all, 100
        detections per image), each in ``[0, 1]``; all ``0.0`` when the adapter detects
        nothing.

    Raises:
        ValueError: no items, no ground-truth boxes on the evaluated images (mAP is then
            undefined), or class columns that do not match the pool (see
            :func:`detections_to_coco`).
    """
    if isinstance(background, str):
        if background != "auto":
            raise ValueError(f"background must be an int, None or 'auto', got {background!r}")
        background = default_background(adapter)
    ids = list(pool.ids if ids is None else ids)
    if not ids:
        raise ValueError("coco_map needs at least one item to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    img_ids = [pool.image_id(i) for i in ids]
    if not pool.coco.getAnnIds(imgIds=img_ids, iscrowd=False):
        raise ValueError(
            f"the {len(ids)} evaluated images have no ground-truth boxes: mAP is undefined"
        )
    results: list[dict[str, Any]] = []
    total = math.ceil(len(ids) / batch_size)
    batches = pool.batches(ids, batch_size)
    for batch in tqdm(batches, desc="coco mAP", total=total, disable=not progress, leave=False):
        predictions = adapter.predict(batch.without_labels(), n_samples=1)
        batch_img_ids = [pool.image_id(i) for i in batch.ids]
        results += detections_to_coco(predictions, batch_img_ids, pool.label_to_cat_id, background)
    if not results:  # pycocotools' loadRes cannot take an empty list
        return dict.fromkeys(METRICS, 0.0)
    return _evaluate(pool.coco, results, img_ids)


def _evaluate(coco: Any, results: list[dict[str, Any]], img_ids: list[int]) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        detections = coco.loadRes(results)
        evaluator = COCOeval(coco, detections, iouType="bbox")
        evaluator.params.imgIds = img_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(evaluator.stats[i]) for name, i in METRICS.items()}
