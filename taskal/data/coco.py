"""A pool over any COCO-format detection data set, checked before it is used.

:func:`load_coco_detection` validates the json (structure, ids, category references, boxes,
image files) and raises one ``ValueError`` that names every offending entry and what to fix,
before anything is scored or trained; it never writes. The returned
:class:`CocoDetectionPool` reads images lazily, one batch at a time, and gives each item a
torchvision-style target dict (see :meth:`CocoDetectionPool.target`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

from taskal.functional.validation import is_int
from taskal.registry import DATASETS
from taskal.types import Batch, ItemId

#: how far (pixels) a box may reach beyond its image before it is an error; it is clipped.
BOX_TOLERANCE = 1.0
_MAX_LISTED = 10


class CocoDetectionPool:
    """Images of a validated COCO data set, addressed by their ``file_name``.

    Build it with :func:`load_coco_detection`. Labels are contiguous: category ids sorted
    ascending map to ``0..C-1`` (:attr:`cat_id_to_label`, :attr:`label_to_cat_id`), and
    :attr:`classes` holds the category names in label order. Crowd annotations
    (``iscrowd=1``) are left out of the targets, as torchvision's references do; they stay in
    :attr:`coco` for ``COCOeval``.

    Attributes:
        coco: the ``pycocotools.coco.COCO`` object (for ``COCOeval``); restrict an
            evaluation to this pool with ``params.imgIds = pool.image_ids()``.
        ids: the stable ids (image file names) of the pool's items, in json order.
        classes: category names in label order.
        cat_id_to_label: COCO category id -> label index.
        label_to_cat_id: label index -> COCO category id.
        img_dir: the folder image file names are relative to.
        ann_file: the annotation file.
    """

    def __init__(
        self, coco: Any, ann_file: Path, img_dir: Path, ids: Sequence[ItemId] | None = None
    ) -> None:
        self.coco = coco
        self.ann_file = ann_file
        self.img_dir = img_dir
        cat_ids = sorted(int(c) for c in coco.cats)
        self.label_to_cat_id: list[int] = cat_ids
        self.cat_id_to_label: dict[int, int] = {c: i for i, c in enumerate(cat_ids)}
        self.classes: list[str] = [str(coco.cats[c]["name"]) for c in cat_ids]
        self._image_id = {str(img["file_name"]): int(img["id"]) for img in coco.dataset["images"]}
        self.ids: list[ItemId] = list(self._image_id) if ids is None else list(ids)
        missing = [i for i in self.ids if i not in self._image_id]
        if missing:
            raise KeyError(f"{len(missing)} ids are not images of {ann_file}, e.g. {missing[:3]}")

    def __len__(self) -> int:
        return len(self.ids)

    def image_id(self, item: ItemId) -> int:
        """The COCO image id of item ``item`` (a file name)."""
        try:
            return self._image_id[str(item)]
        except KeyError:
            raise KeyError(f"{item!r} is not an image of {self.ann_file}") from None

    def image_ids(self) -> list[int]:
        """COCO image ids of the pool's items, in pool order."""
        return [self.image_id(i) for i in self.ids]

    def target(self, item: ItemId) -> dict[str, Any]:
        """The item's target dict, without reading its pixels.

        ``{"boxes": float [n, 4] xyxy in pixels (clipped to the image), "labels": long [n]
        in 0..C-1, "image_id": int, "img_path": str, "img_shape": (H, W)}``.
        """
        image_id = self.image_id(item)
        info = self.coco.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        labels = torch.tensor(
            [self.cat_id_to_label[int(a["category_id"])] for a in anns], dtype=torch.long
        )
        return {
            "boxes": boxes,
            "labels": labels,
            "image_id": image_id,
            "img_path": str(self.img_dir / str(item)),
            "img_shape": (h, w),
        }

    def read_image(self, item: ItemId) -> torch.Tensor:
        """The item's pixels as a float ``[3, H, W]`` tensor in ``[0, 1]``."""
        info = self.coco.imgs[self.image_id(item)]
        path = self.img_dir / str(item)
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except OSError as err:
            raise OSError(f"cannot read image {path}: {err}") from err
        if pixels.shape[:2] != (int(info["height"]), int(info["width"])):
            raise ValueError(
                f"image {path} is {pixels.shape[1]}x{pixels.shape[0]} (WxH) but {self.ann_file} "
                f"says {info['width']}x{info['height']}; fix its width/height in the json"
            )
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)

    def take(self, ids: Sequence[ItemId]) -> Batch:
        """All of ``ids`` as one batch: a list of ``[3, H_i, W_i]`` images and target dicts."""
        ids = list(ids)
        samples = [self.target(i) for i in ids]
        return Batch([self.read_image(i) for i in ids], ids, None, samples)

    def batches(self, ids: Sequence[ItemId], batch_size: int) -> Iterator[Batch]:
        """``ids`` in order, ``batch_size`` at a time; images are read per batch."""
        ids = list(ids)
        for start in range(0, len(ids), batch_size):
            yield self.take(ids[start : start + batch_size])

    def subset(self, ids: Sequence[ItemId]) -> CocoDetectionPool:
        """A pool over ``ids`` only, sharing this pool's ``coco`` object and label map."""
        return CocoDetectionPool(self.coco, self.ann_file, self.img_dir, ids)


def _entry(section: str, index: int, entry: Any) -> str:
    if isinstance(entry, dict) and "id" in entry:
        return f"{section}[{index}] (id {entry['id']!r})"
    return f"{section}[{index}]"


def _is_whole(x: Any) -> bool:
    """An int, or a float with no fraction (some tools write ``640.0``)."""
    return is_int(x) or (isinstance(x, float) and math.isfinite(x) and x.is_integer())


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_structure(data: Any, ann_file: Path) -> None:
    """Top-level layout; raises at once because nothing below can be checked without it."""
    if not isinstance(data, dict):
        raise ValueError(
            f"{ann_file} must hold a COCO json object with 'images', 'annotations' and "
            f"'categories' lists, got a {type(data).__name__}"
        )
    missing = [k for k in ("images", "categories") if k not in data]
    if missing:
        raise ValueError(
            f"{ann_file} is missing the required key(s) {missing}; a COCO detection file needs "
            "'images', 'annotations' and 'categories' lists"
        )
    data.setdefault("annotations", [])
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise ValueError(f"{ann_file}: '{key}' must be a list, got {type(data[key]).__name__}")
    if not data["categories"]:
        raise ValueError(f"{ann_file} has no categories; add one entry per class")


def _missing_keys(entry: Any, required: dict[str, Any]) -> str | None:
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    absent = [k for k in required if k not in entry]
    if absent:
        return f"lacks the required key(s) {absent}"
    wrong = [k for k, ok in required.items() if not ok(entry[k])]
    if wrong:
        return "has a wrong type for " + ", ".join(f"{k}={entry[k]!r}" for k in wrong)
    return None


_CATEGORY_KEYS = {"id": is_int, "name": lambda v: isinstance(v, str)}
_IMAGE_KEYS = {
    "id": is_int,
    "file_name": lambda v: isinstance(v, str) and bool(v),
    "width": lambda v: _is_whole(v) and v > 0,
    "height": lambda v: _is_whole(v) and v > 0,
}
_ANNOTATION_KEYS = {
    "id": is_int,
    "image_id": is_int,
    "category_id": is_int,
    "bbox": lambda v: isinstance(v, list) and len(v) == 4 and all(_is_number(x) for x in v),
}


def _check_categories(data: dict[str, Any], problems: list[str]) -> set[int]:
    seen: dict[int, int] = {}
    for i, cat in enumerate(data["categories"]):
        where = _entry("categories", i, cat)
        bad = _missing_keys(cat, _CATEGORY_KEYS)
        if bad:
            problems.append(f"{where} {bad}; a category needs an int 'id' and a str 'name'")
        elif cat["id"] in seen:
            problems.append(
                f"{where} repeats the category id of categories[{seen[cat['id']]}]; give every "
                "category its own id"
            )
        else:
            seen[cat["id"]] = i
    return set(seen)


def _check_images(data: dict[str, Any], img_dir: Path, problems: list[str]) -> dict[int, Any]:
    by_id: dict[int, int] = {}
    by_name: dict[str, int] = {}
    for i, img in enumerate(data["images"]):
        where = _entry("images", i, img)
        bad = _missing_keys(img, _IMAGE_KEYS)
        if bad:
            problems.append(
                f"{where} {bad}; an image needs an int 'id', a 'file_name' and positive int "
                "'width' and 'height'"
            )
            continue
        if img["id"] in by_id:
            problems.append(
                f"{where} (file_name {img['file_name']!r}) repeats the image id of "
                f"images[{by_id[img['id']]}]; give every image its own id"
            )
            continue
        by_id[img["id"]] = i
        if img["file_name"] in by_name:
            problems.append(
                f"{where} repeats the file_name {img['file_name']!r} of "
                f"images[{by_name[img['file_name']]}]; file names identify items, so each "
                "image must appear once"
            )
            continue
        by_name[img["file_name"]] = i
        if not (img_dir / img["file_name"]).is_file():
            problems.append(
                f"{where} (file_name {img['file_name']!r}): no image file at "
                f"{img_dir / img['file_name']}; add the file or remove the entry"
            )
    return {k: data["images"][v] for k, v in by_id.items()}


def _check_box(where: str, box: list[float], img: dict[str, Any]) -> str | None:
    x, y, w, h = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return f"{where} has bbox {box} with a NaN or infinite value; boxes are [x, y, w, h]"
    if w <= 0 or h <= 0:
        return f"{where} has bbox {box} with non-positive width or height; boxes are [x, y, w, h]"
    t = BOX_TOLERANCE
    outside = x < -t or y < -t or x + w > img["width"] + t or y + h > img["height"] + t
    # a box within the tolerance but with no area left inside the image after clipping
    empty = x >= img["width"] or y >= img["height"] or x + w <= 0 or y + h <= 0
    if outside or empty:
        return (
            f"{where} has bbox {box} ([x, y, w, h]) outside its image {img['id']} "
            f"({img['file_name']!r}, {img['width']}x{img['height']} WxH, tolerance {t:g} px); "
            "fix the box or the image's width/height"
        )
    return None


def _check_annotations(
    data: dict[str, Any], images: dict[int, Any], cat_ids: set[int], problems: list[str]
) -> None:
    seen: dict[int, int] = {}
    for i, ann in enumerate(data["annotations"]):
        where = _entry("annotations", i, ann)
        bad = _missing_keys(ann, _ANNOTATION_KEYS)
        if bad:
            problems.append(
                f"{where} {bad}; an annotation needs int 'id', 'image_id', 'category_id' and a "
                "'bbox' of four numbers [x, y, w, h]"
            )
            continue
        if ann["id"] in seen:
            problems.append(
                f"{where} repeats the annotation id of annotations[{seen[ann['id']]}]; give "
                "every annotation its own id"
            )
        seen[ann["id"]] = i
        if ann["category_id"] not in cat_ids:
            problems.append(
                f"{where} has category_id {ann['category_id']}, which is not in categories "
                f"(ids {sorted(cat_ids)}); fix the annotation or add the category"
            )
        img = images.get(ann["image_id"])
        if img is None:
            problems.append(
                f"{where} points at image_id {ann['image_id']}, which is not in images; fix "
                "the image_id or add the image"
            )
            continue
        box_problem = _check_box(where, ann["bbox"], img)
        if box_problem:
            problems.append(box_problem)


def validate_coco(data: Any, ann_file: Path, img_dir: Path) -> None:
    """Check a parsed COCO detection json; raise one ``ValueError`` naming every problem.

    Checked: the top-level keys, each entry's required keys and types, unique category,
    image and annotation ids, unique image file names, image files present under
    ``img_dir``, annotations whose ``category_id`` is a category and whose ``image_id`` is
    an image, and boxes with positive size inside their image (within
    :data:`BOX_TOLERANCE` pixels).
    """
    _check_structure(data, ann_file)
    problems: list[str] = []
    cat_ids = _check_categories(data, problems)
    images = _check_images(data, img_dir, problems)
    _check_annotations(data, images, cat_ids, problems)
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = len(problems) - _MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise ValueError(
            f"{ann_file} (images in {img_dir}) has {len(problems)} problem(s):\n  {listed}{tail}"
        )


@DATASETS.register_module(name="coco_detection")
def load_coco_detection(ann_file: str | Path, img_dir: str | Path) -> CocoDetectionPool:
    """A pool over a COCO-format detection set, validated before it is returned.

    Registered in ``DATASETS`` as ``"coco_detection"``. Ids are the images' ``file_name``
    (relative to ``img_dir``); batches hold a list of ``[3, H, W]`` float images in
    ``[0, 1]`` at their own sizes and one target dict per image (:meth:`CocoDetectionPool.
    target`). The json is read once and indexed by ``pycocotools.coco.COCO``; a missing
    ``annotations`` list means an unlabeled set, a missing ``area`` is filled in as the box's
    ``w * h`` and a missing ``iscrowd`` as 0, in memory only (``COCOeval`` needs both).
    Nothing is written.

    Raises:
        FileNotFoundError: ``ann_file`` or ``img_dir`` does not exist.
        ValueError: the json is malformed or inconsistent (see :func:`validate_coco`); the
            message names each offending entry.
    """
    ann_file, img_dir = Path(ann_file), Path(img_dir)
    if not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file {ann_file} does not exist")
    if not img_dir.is_dir():
        raise FileNotFoundError(f"image folder {img_dir} does not exist")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{ann_file} is not valid json ({err}); fix or re-export it") from err
    validate_coco(data, ann_file, img_dir)
    for ann in data["annotations"]:
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return CocoDetectionPool(coco, ann_file, img_dir)


def category_counts(pool: CocoDetectionPool) -> dict[str, int]:
    """Non-crowd annotations per class name over the pool's images (classes with none: 0)."""
    counts: Counter[str] = Counter({c: 0 for c in pool.classes})
    for item in pool.ids:
        for label in pool.target(item)["labels"].tolist():
            counts[pool.classes[label]] += 1
    return dict(counts)
