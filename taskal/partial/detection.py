"""Training detectors on partially annotated images: each labeled box region is its own crop.

A box query (``Selector(strategy, query="region")``) asks the annotator to label every object
that overlaps the queried box. The rest of that image stays unlabeled, so training on the
whole image would teach the detector that the unlabeled objects are background. Instead,
:class:`PartialDetectionPool` turns every queried box into a training image of its own, with
no change to the model or the training loop (it implements the
:class:`~taskal.training_det.DetectionPool` protocol)::

    state = LabelState(full={"a.png"})
    state.add(box_queries)  # Query(item, region, cost, score, box)
    train_pool = PartialDetectionPool(coco_pool, state)
    train_detector(adapter, train_pool, train_pool.ids, cfg, generator)

The rule (what is shown, what is a target, what is masked), for a partially labeled image:

* **Labeled objects.** The annotator (here: the ground truth of ``oracle``, read only through
  this rule) labels the objects whose box overlaps (with positive area) at least one of the
  image's queried boxes. No other ground-truth object of the image is ever read into a
  target: objects entirely outside every queried box do not leak.
* **Crop.** Each queried box becomes a crop: the box widened by ``context`` times its width
  (height) on the left and right (top and bottom), clipped to the image and rounded outwards
  to whole pixels. The context lets the labeled objects that stick out of the queried box
  fit in the crop.
* **Targets.** A labeled object is a target of a crop when at least ``min_visible`` of its
  box's area lies inside the crop; its box is clipped to the crop and shifted into crop
  coordinates. Labels stay the pool's ``0..C-1``.
* **Masking.** A pixel of the crop is *shown* when it lies inside a target's box, or inside
  one of the image's queried boxes and outside every labeled object that was cut too much
  (less than ``min_visible`` inside). Every other pixel (the unlabeled context, and the
  visible part of cut objects) is filled with the crop's mean colour (computed before
  masking). A pixel is inside a box when its centre is (``x0 <= j + 0.5 < x1``).

Why this rule: a shown pixel outside every target box lies inside a queried box, where the
annotator labeled every object, and outside every labeled object that is not a target, so it
is true background; nothing that is or may be an object is trained as background. Masking
the cut objects (instead of dropping any crop that cuts an object) keeps every crop, hence
every annotation bought; masking the unlabeled context needs no knowledge of where unlabeled
objects are, so the rule is also what a real annotation tool can do. Mean-colour fill keeps
the model's input a plain ``[3, h, w]`` image in ``[0, 1]``, so any detector trains on it.

Fully labeled images are training items as they are.

Limitations: pixels inside a target's box are always shown, so the part of an unlabeled or
cut object that overlaps a target's box (and lies outside every queried box) stays visible
without a target; crowd annotations are not targets (as in
:class:`~taskal.data.CocoDetectionPool`); the fill is a flat patch the detector learns as
background, a domain shift a real image lacks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from taskal.data.coco import CocoDetectionPool
from taskal.queries import LabelState
from taskal.types import Batch, ItemId

Box = tuple[float, float, float, float]
Window = tuple[int, int, int, int]


@dataclass(frozen=True)
class Crop:
    """One training crop of a partially labeled image.

    Attributes:
        item: the source item's id.
        region: the queried box's position in ``LabelState.boxes[item]``.
        query_box: the queried xyxy box in image pixels.
        window: the crop's ``(x0, y0, x1, y1)`` in whole image pixels (x1, y1 exclusive).
    """

    item: ItemId
    region: int
    query_box: Box
    window: Window

    @property
    def id(self) -> str:
        """The crop's stable training id, ``f"{item}#r{region}"``."""
        return crop_id(self.item, self.region)

    @property
    def size(self) -> tuple[int, int]:
        """``(h, w)`` of the crop in pixels."""
        x0, y0, x1, y1 = self.window
        return y1 - y0, x1 - x0


def crop_id(item: ItemId, region: int) -> str:
    """The training id of the crop of ``item``'s ``region``-th queried box."""
    return f"{item}#r{region}"


def crop_window(box: Sequence[float], image_hw: tuple[int, int], context: float = 0.5) -> Window:
    """The crop of a queried box: widened by ``context`` x its size on each side, clipped to
    the image, rounded outwards to whole pixels.

    Args:
        box: xyxy box in image pixels.
        image_hw: ``(H, W)`` of the image.
        context: margin on each side, as a fraction of the box's width (height).

    Returns:
        ``(x0, y0, x1, y1)`` ints with ``0 <= x0 <= x1 <= W`` (``x1`` exclusive); empty when
        the box lies outside the image.

    Raises:
        ValueError: a box that is not four finite numbers with ``x0 <= x1`` and ``y0 <= y1``.
    """
    if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
        raise ValueError(f"a queried box must be four finite numbers xyxy, got {tuple(box)}")
    bx0, by0, bx1, by1 = (float(v) for v in box)
    if bx1 < bx0 or by1 < by0:
        raise ValueError(f"a queried box must be xyxy with x0 <= x1 and y0 <= y1, got {box}")
    h, w = image_hw
    dx, dy = context * (bx1 - bx0), context * (by1 - by0)
    x0 = min(max(math.floor(bx0 - dx), 0), w)
    y0 = min(max(math.floor(by0 - dy), 0), h)
    x1 = max(min(math.ceil(bx1 + dx), w), x0)
    y1 = max(min(math.ceil(by1 + dy), h), y0)
    return x0, y0, x1, y1


def box_mask(boxes: Tensor, hw: tuple[int, int]) -> Tensor:
    """``[h, w]`` bool: the pixels whose centre lies inside one of ``boxes`` (``[n, 4]`` xyxy)."""
    h, w = hw
    mask = torch.zeros(h, w, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes.tolist():
        c0, c1 = max(math.ceil(x0 - 0.5), 0), min(math.ceil(x1 - 0.5), w)
        r0, r1 = max(math.ceil(y0 - 0.5), 0), min(math.ceil(y1 - 0.5), h)
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def _intersection(a: Tensor, b: Tensor) -> Tensor:
    """``[n, m]`` intersection areas of xyxy boxes ``a`` ``[n, 4]`` and ``b`` ``[m, 4]``."""
    lo = torch.maximum(a[:, None, :2], b[None, :, :2])
    hi = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    return (hi - lo).clamp(min=0).prod(-1)


class PartialDetectionPool:
    """Training items from full labels and box queries: whole images and region crops.

    Implements the :class:`~taskal.training_det.DetectionPool` protocol (``ids``, ``take``)
    and ``batches``. Fully labeled items keep their id and their image; the ``j``-th queried
    box of a partially labeled item (``state.boxes[item][j]``) is the crop
    ``f"{item}#r{j}"`` (region indices of box queries change between rounds, positions in
    ``state.boxes`` do not). Targets follow the rule in :mod:`taskal.partial.detection`: a crop's
    targets are the labeled objects (boxes overlapping a queried box) with at least
    ``min_visible`` of their area inside it, and every pixel that might show an object
    without a target is filled with the crop's mean colour.

    Geometry is planned at construction from the queried boxes and the images' sizes; ground
    truth and pixels are read in :meth:`take`, one batch at a time.

    Args:
        oracle: the pool the images and the annotator's answers (its ground truth) come from.
        state: full labels and box queries; a copy is kept.
        context: margin added to each side of a queried box, as a fraction of its width
            (height), before cropping (>= 0).
        min_visible: the least fraction of an object's box inside a crop for it to be a
            target there; objects cut more are masked (in ``(0, 1]``).
        min_size: crops narrower or shorter than this many pixels are not trained: they are
            left out of ``ids`` and listed in :attr:`skipped` (no exception).

    Attributes:
        ids: training ids, in ``oracle.ids`` order: a fully labeled item's id, or a
            partially labeled item's crop ids in region order.
        crops: crop id -> :class:`Crop`.
        skipped: crop id -> ``(h, w)`` of each crop smaller than ``min_size``;
            ``len(skipped)`` is the count left out.

    Raises:
        ValueError: a partially labeled item whose region queries have no boxes (patch or
            superpixel queries, which cannot be cropped), a malformed queried box, a
            labeled item that is not in ``oracle``, or a bad parameter.
    """

    def __init__(
        self,
        oracle: CocoDetectionPool,
        state: LabelState,
        *,
        context: float = 0.5,
        min_visible: float = 0.6,
        min_size: int = 8,
    ) -> None:
        if not (context >= 0 and math.isfinite(context)):
            raise ValueError(f"context must be a finite number >= 0, got {context}")
        if not 0 < min_visible <= 1:
            raise ValueError(f"min_visible must lie in (0, 1], got {min_visible}")
        if min_size < 1:
            raise ValueError(f"min_size must be >= 1 pixel, got {min_size}")
        self.oracle = oracle
        self.state = state.copy()
        self.context = context
        self.min_visible = min_visible
        self.min_size = min_size
        self.ids: list[ItemId] = []
        self.crops: dict[str, Crop] = {}
        self.skipped: dict[str, tuple[int, int]] = {}
        self._full: set[ItemId] = set()
        self._queried: dict[ItemId, Tensor] = {}
        self._plan()

    def _plan(self) -> None:
        state, oracle = self.state, self.oracle
        partial = (set(state.partial) | {i for i, b in state.boxes.items() if b}) - state.full
        known = set(oracle.ids)
        missing = [i for i in sorted(state.full | partial, key=str) if i not in known]
        if missing:
            raise ValueError(
                f"{len(missing)} labeled items are not in the oracle pool, e.g. {missing[:3]}; "
                "build the LabelState from this pool's ids"
            )
        for item in partial:
            boxes = state.boxes.get(item, [])
            if len(boxes) < len(state.regions_of(item)):
                raise ValueError(
                    f"item {item!r} has region queries without a box (regions "
                    f"{sorted(state.regions_of(item))}, {len(boxes)} boxes): only box queries "
                    "(detection boxes, Query.box set) can be cropped; label the item fully or "
                    "query its boxes"
                )
        for item in oracle.ids:
            if item in state.full:
                self._full.add(item)
                self.ids.append(item)
            elif item in partial:
                self._plan_item(item)
        clash = self._full & set(self.crops)
        if clash:
            raise ValueError(f"item ids {sorted(clash, key=str)[:3]} look like crop ids")

    def _plan_item(self, item: ItemId) -> None:
        info = self.oracle.coco.imgs[self.oracle.image_id(item)]
        hw = int(info["height"]), int(info["width"])
        boxes = self.state.boxes[item]
        for region, box in enumerate(boxes):
            query: Box = (float(box[0]), float(box[1]), float(box[2]), float(box[3]))
            crop = Crop(item, region, query, crop_window(box, hw, self.context))
            if min(crop.size) < self.min_size:
                self.skipped[crop.id] = crop.size
                continue
            self.crops[crop.id] = crop
            self.ids.append(crop.id)
        self._queried[item] = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self.ids)

    def labeled_objects(self, item: ItemId) -> Tensor:
        """``[n]`` bool over ``oracle.target(item)``'s boxes: the ones the annotator labeled
        (all for a fully labeled item; those overlapping a queried box otherwise)."""
        gt = self.oracle.target(item)["boxes"]
        if item in self._full:
            return torch.ones(len(gt), dtype=torch.bool)
        return self._labeled(gt, item)

    def _labeled(self, gt: Tensor, item: ItemId) -> Tensor:
        queried = self._queried.get(item, torch.zeros(0, 4))
        return (_intersection(gt.float(), queried) > 0).any(1)

    def take(self, ids: Sequence[ItemId]) -> Batch:
        """The training items ``ids`` as one batch.

        Inputs are float ``[3, h, w]`` images in ``[0, 1]`` (crops with their masked pixels
        filled). Each data sample holds ``"boxes"`` ``[n, 4]`` xyxy in the item's own
        (crop) pixels and ``"labels"`` ``[n]`` in ``0..C-1``, plus metainfo: ``"source"``
        (the image's item id), ``"region"`` (``None`` for a full image), ``"offset"``
        (``(x0, y0)`` of the crop in the image), ``"crop"`` (its window), ``"masked"``
        (``[h, w]`` bool, the filled pixels), ``"img_shape"`` (``(h, w)``), and the source's
        ``"image_id"`` and ``"img_path"``.

        Raises:
            KeyError: an id that is not in :attr:`ids`.
        """
        ids = list(ids)
        unknown = [i for i in ids if i not in self._full and i not in self.crops]
        if unknown:
            raise KeyError(f"{len(unknown)} ids are not training items of this pool: {unknown[:3]}")
        images: dict[ItemId, Tensor] = {}
        targets: dict[ItemId, dict[str, Any]] = {}
        inputs, samples = [], []
        for i in ids:
            crop = None if i in self._full else self.crops[str(i)]
            item = i if crop is None else crop.item
            if item not in images:
                images[item] = self.oracle.read_image(item)
                targets[item] = self.oracle.target(item)
            if crop is None:
                image, sample = self._full_sample(item, images[item], targets[item])
            else:
                image, sample = self._crop_sample(crop, images[item], targets[item])
            inputs.append(image)
            samples.append(sample)
        return Batch(inputs, ids, None, samples)

    def batches(self, ids: Sequence[ItemId], batch_size: int) -> Iterator[Batch]:
        """``ids`` in order, ``batch_size`` at a time; images are read per batch."""
        ids = list(ids)
        for start in range(0, len(ids), batch_size):
            yield self.take(ids[start : start + batch_size])

    @staticmethod
    def _full_sample(
        item: ItemId, image: Tensor, target: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Any]]:
        h, w = image.shape[-2:]
        meta = {
            "source": item,
            "region": None,
            "offset": (0, 0),
            "crop": (0, 0, int(w), int(h)),
            "masked": torch.zeros(int(h), int(w), dtype=torch.bool),
        }
        return image, {**target, **meta}

    def _crop_sample(
        self, crop: Crop, image: Tensor, target: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Any]]:
        x0, y0, x1, y1 = crop.window
        hw = (y1 - y0, x1 - x0)
        pixels = image[:, y0:y1, x0:x1]
        gt, labels = target["boxes"].float().reshape(-1, 4), target["labels"]
        window = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
        clipped = torch.cat([gt[:, :2].maximum(window[:2]), gt[:, 2:].minimum(window[2:])], 1)
        inside = (clipped[:, 2:] - clipped[:, :2]).clamp(min=0).prod(1)
        area = (gt[:, 2:] - gt[:, :2]).prod(1)
        labeled = self._labeled(gt, crop.item)
        keep = labeled & (inside >= self.min_visible * area) & (inside > 0)
        cut = labeled & ~keep & (inside > 0)
        offset = window[:2].repeat(2)
        kept = clipped[keep] - offset
        shown = box_mask(self._queried[crop.item] - offset, hw)
        shown &= ~box_mask(clipped[cut] - offset, hw)
        shown |= box_mask(kept, hw)
        masked = ~shown
        mean = pixels.mean((1, 2), keepdim=True)
        out = torch.where(masked, mean, pixels)
        sample = {
            "boxes": kept,
            "labels": labels[keep],
            "image_id": target["image_id"],
            "img_path": target["img_path"],
            "img_shape": hw,
            "source": crop.item,
            "region": crop.region,
            "offset": (x0, y0),
            "crop": crop.window,
            "masked": masked,
        }
        return out, sample


__all__ = ["Crop", "PartialDetectionPool", "box_mask", "crop_id", "crop_window"]
