"""Active-learning queries written as a COCO json for annotators, with a cost model.

:func:`queries_to_coco` turns a round's queries (:class:`taskal.queries.Query`) over a
:class:`taskal.data.CocoDetectionPool` into a COCO detection dict, and
:func:`write_coco_queries` writes it atomically. Every queried image appears once in
``images`` with its pool ``id``, ``file_name``, ``width`` and ``height`` and four fields of
its own:

* ``al_task``: ``"draw"`` (a whole-image query: draw every object) or ``"verify"`` (a box
  query: check the proposed boxes listed in ``annotations``),
* ``al_score``: the image's best query score (``null`` for random picks),
* ``al_rank``: 1 for the image to annotate first (by ``al_score``, then query order),
* ``al_cost``: the annotation cost it spends (see :class:`AnnotationCost`).

Box queries (``Query.box`` set) give one annotation per proposed box: ``bbox`` in COCO
``[x, y, w, h]``, ``area``, ``iscrowd`` 0, the query's ``score`` and ``al_region``, and
the predicted class as ``category_id`` when the caller passes one; without it
``category_id`` is ``null`` (pycocotools still loads the file; a tool that needs a class
fails loudly instead of guessing) and ``al_task`` is ``"classify"`` instead of ``"verify"``.
Whole-image queries give no annotations. The pool's ground truth is never copied: the
annotations are built from the queries only, and image entries keep only the four keys
above from the pool's json.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import taskal
from taskal.data.coco import BOX_TOLERANCE, CocoDetectionPool
from taskal.functional.validation import is_int
from taskal.queries import Query
from taskal.types import ItemId

#: ``(item, region) -> predicted class index`` (``0..C-1``, the pool's label order).
PredictedLabels = Mapping[tuple[ItemId, int], int]


@dataclass(frozen=True)
class AnnotationCost:
    """What annotating costs: opening an image, drawing a box, verifying a proposed box.

    With this model a budget counts annotation cost, not images: a whole-image query costs
    ``per_image + n * per_box_drawn`` for the ``n`` objects expected in it (the detections
    predicted there, or a count you give), and ``n`` box queries on one image cost
    ``per_image + n * per_box_verified`` (the image is opened once). The values are your
    estimate for your annotators and tool, in any unit (seconds, money); only ratios matter.
    As an illustration, Papadopoulos et al. (2016, "We don't need no bounding-boxes")
    report about 7 s to draw a box and about 1.6 s to verify one, which suggests
    ``per_box_verified`` near a quarter of ``per_box_drawn``; measure your own.

    Attributes:
        per_image: opening an image and looking it over (1.0).
        per_box_drawn: drawing one box from scratch, class included (1.0).
        per_box_verified: checking (and if needed correcting) one proposed box (0.25).
    """

    per_image: float = 1.0
    per_box_drawn: float = 1.0
    per_box_verified: float = 0.25

    def __post_init__(self) -> None:
        values = {k: getattr(self, k) for k in ("per_image", "per_box_drawn", "per_box_verified")}
        bad = {k: v for k, v in values.items() if not (math.isfinite(float(v)) and v >= 0)}
        if bad:
            raise ValueError(f"annotation costs must be finite and >= 0, got {bad}")
        if not any(values.values()):
            raise ValueError("annotation costs are all zero; give at least one a positive cost")

    def image_query(self, n_boxes_expected: int) -> float:
        """Cost of a whole-image query: open the image and draw ``n_boxes_expected`` boxes."""
        return self.per_image + _count(n_boxes_expected, "n_boxes_expected") * self.per_box_drawn

    def box_query(self, n_boxes: int, new_image: bool) -> float:
        """Cost of verifying ``n_boxes`` proposed boxes, opening the image if ``new_image``."""
        opening = self.per_image if new_image else 0.0
        return opening + _count(n_boxes, "n_boxes") * self.per_box_verified


def _count(n: int, name: str) -> int:
    if not is_int(n) or n < 0:
        raise ValueError(f"{name} must be a whole number >= 0, got {n!r}")
    return int(n)


def queries_to_coco(
    queries: Sequence[Query],
    pool: CocoDetectionPool,
    *,
    round_index: int | None = None,
    predictions: PredictedLabels | None = None,
    cost: AnnotationCost | None = None,
    expected_boxes: Mapping[ItemId, int] | None = None,
) -> dict[str, Any]:
    """A COCO detection dict asking annotators for the queried images and boxes.

    Args:
        queries: the round's queries; items are the pool's ids (image file names). A query
            with ``box`` is a box query, one with ``region=None`` and no box a whole-image
            query. Duplicate ``(item, region)`` pairs and items with both kinds are errors.
        pool: the pool the queries were selected from.
        round_index: the active-learning round, written to ``info["al_round"]``.
        predictions: ``(item, region) -> predicted class index`` for box queries; the
            class becomes the annotation's ``category_id``. Missing pairs get ``null``.
        cost: a cost model for ``al_cost``; without it ``al_cost`` is the sum of the
            image's ``Query.cost`` (what the selector's budget counted).
        expected_boxes: ``item -> objects expected`` for whole-image queries under
            ``cost``; by default the number of ``predictions`` keys of that item.

    Returns:
        ``{"info", "images", "categories", "annotations"}`` (see the module docstring).

    Raises:
        ValueError: an item is not in the pool, a box is degenerate or outside its image,
            an ``(item, region)`` is queried twice, a region query has no box, a predicted
            class is out of range, or ``cost`` cannot price a whole-image query.
    """
    by_item = _group(queries, pool)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for item, qs in by_item.items():
        entry = pool.coco.imgs[pool.image_id(item)]
        boxes = [q for q in qs if q.box is not None]
        scores = [q.score for q in qs if not math.isnan(q.score)]
        for q in boxes:
            annotations.append(_annotation(q, entry, len(annotations) + 1, pool, predictions))
        if cost is None:
            spent = sum(q.cost for q in qs)
        elif boxes:
            spent = cost.box_query(len(boxes), new_image=True)
        else:
            spent = cost.image_query(_expected(item, expected_boxes, predictions))
        images.append(
            {
                **{k: entry[k] for k in ("id", "file_name", "width", "height")},
                "al_task": "verify" if boxes else "draw",
                "al_score": max(scores) if scores else None,
                "al_cost": float(spent),
            }
        )
    best = [-math.inf if img["al_score"] is None else img["al_score"] for img in images]
    order = sorted(range(len(images)), key=lambda i: -best[i])  # stable: query order on ties
    for rank, i in enumerate(order, start=1):
        images[i]["al_rank"] = rank
    now = datetime.now(timezone.utc)
    info = {
        "description": "taskal active-learning queries",
        "version": taskal.__version__,
        "al_round": round_index,
        "al_source": str(pool.ann_file),
        "al_total_cost": float(sum(img["al_cost"] for img in images)),
        "date_created": now.isoformat(timespec="seconds"),
        "year": now.year,
    }
    categories = [dict(c) for c in pool.coco.dataset["categories"]]
    images = [images[i] for i in order]
    return {"info": info, "images": images, "categories": categories, "annotations": annotations}


def _group(queries: Sequence[Query], pool: CocoDetectionPool) -> dict[ItemId, list[Query]]:
    """Queries by item in first-seen order, after the checks that need all of them."""
    known = set(pool.ids)
    by_item: dict[ItemId, list[Query]] = {}
    seen: set[tuple[ItemId, int | None]] = set()
    for q in queries:
        if q.item not in known:
            hint = ""
            if isinstance(q.item, int) and q.item in pool.coco.imgs:
                name = pool.coco.imgs[q.item]["file_name"]
                hint = f" (items are file names: COCO image id {q.item} is {name!r})"
            raise ValueError(
                f"query item {q.item!r} is not in the pool ({len(known)} items from "
                f"{pool.ann_file}){hint}; query only the pool's ids"
            )
        if (q.item, q.region) in seen:
            raise ValueError(
                f"item {q.item!r} region {q.region!r} is queried twice; give each "
                "(item, region) one query"
            )
        if q.region is not None and q.box is None:
            raise ValueError(
                f"item {q.item!r} region {q.region} has no box; a COCO detection export takes "
                "whole-image queries (region=None) and box queries only"
            )
        seen.add((q.item, q.region))
        by_item.setdefault(q.item, []).append(q)
    for item, qs in by_item.items():
        kinds = {q.box is None for q in qs}
        if len(kinds) > 1:
            raise ValueError(
                f"item {item!r} has a whole-image query and box queries; the whole-image "
                "query already labels every box, so drop its box queries"
            )
    return by_item


def _annotation(
    q: Query,
    image: Mapping[str, Any],
    ann_id: int,
    pool: CocoDetectionPool,
    predictions: PredictedLabels | None,
) -> dict[str, Any]:
    """One proposed box as a COCO annotation (clipped to the image)."""
    assert q.box is not None
    x1, y1, x2, y2 = (float(v) for v in q.box)
    w, h, t = float(image["width"]), float(image["height"]), BOX_TOLERANCE
    finite = all(math.isfinite(v) for v in (x1, y1, x2, y2))
    inside = finite and x1 >= -t and y1 >= -t and x2 <= w + t and y2 <= h + t
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, w), min(y2, h)
    if not (inside and x2 > x1 and y2 > y1):
        raise ValueError(
            f"item {q.item!r} region {q.region!r} has box {q.box} (xyxy) that is empty or "
            f"outside its {image['width']}x{image['height']} (WxH) image (tolerance {t:g} px)"
        )
    label = None
    if predictions is not None and q.region is not None:
        label = predictions.get((q.item, q.region))
    if label is not None and not (is_int(label) and 0 <= label < len(pool.classes)):
        raise ValueError(
            f"predicted class {label!r} of item {q.item!r} region {q.region!r} is not a class "
            f"index in 0..{len(pool.classes) - 1}; pass indices in the pool's label order"
        )
    return {
        "id": ann_id,
        "image_id": image["id"],
        "category_id": None if label is None else pool.label_to_cat_id[int(label)],
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "area": (x2 - x1) * (y2 - y1),
        "iscrowd": 0,
        "score": None if math.isnan(q.score) else float(q.score),
        "al_region": q.region,
        "al_task": "classify" if label is None else "verify",
    }


def _expected(
    item: ItemId, expected: Mapping[ItemId, int] | None, predictions: PredictedLabels | None
) -> int:
    if expected is not None and item in expected:
        return expected[item]
    if predictions is not None:
        return sum(1 for key in predictions if key[0] == item)
    raise ValueError(
        f"cannot price the whole-image query of {item!r}: pass expected_boxes (objects "
        "expected per image) or predictions (one key per detection) with the cost model"
    )


def write_coco_queries(
    path: str | Path, coco_dict: Mapping[str, Any], overwrite: bool = False
) -> Path:
    """Write ``coco_dict`` as json at ``path`` atomically and return the path.

    The json goes to a temporary file in the same folder (created if needed), which then
    takes ``path``'s place in one step, so readers never see a half-written file. Without
    ``overwrite`` the file is published with a hard link, which fails if another writer
    created ``path`` meanwhile. The file is readable by all (mode 0644).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: the dict holds NaN or infinity (not valid json).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private to its owner
        with os.fdopen(fd, "w") as f:
            try:
                json.dump(coco_dict, f, allow_nan=False, indent=1)
            except ValueError as err:
                raise ValueError(f"cannot write {path}: {err} (NaN or infinity)") from err
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def _link_new(tmp: str, path: Path) -> None:
    """Publish ``tmp`` at ``path`` only if ``path`` is still free (no race with a writer)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)
