"""Label Studio files for a round's queries, and labels read back from Label Studio's export.

Label Studio (LS) is driven by three files; this module writes the first two and reads the third.
It needs numpy and the standard library only; LS itself need not be installed.

**Labeling config** (:func:`labeling_config`): the XML of LS's labeling interface. Every config
has ``<Image name="image" value="$image"/>`` and a control tag named ``"label"`` holding one
entry per class, in class-index order: ``<Choices>`` for classification (``"cls"``),
``<RectangleLabels>`` for detection (``"det"``), ``<BrushLabels>`` for semantic segmentation
(``"seg"``). Detection and segmentation configs have a second control tag named ``"region"``
(``<RectangleLabels>``/``<BrushLabels>`` with the single label :data:`REGION_LABEL`): it shows
the region a region query asks about. It is a marker, never a label: :func:`read_export`
ignores every result drawn with it.

**Tasks** (:func:`tasks`, :func:`write_tasks`): a JSON list with one LS task per query::

    {"data": {"image": "/data/local-files/?d=pool/img_001.png",   # what LS shows
              "item": "pool/img_001.png",   # the campaign's item id, read back from the export
              "score": 0.93, "rank": 0,     # sort by these in LS's data manager
              "region": 4,                  # region id, or null for a whole-image query
              "region_box": [x1, y1, x2, y2],   # pixels; the region's box (seg: the mask's
                                                # tight box, x2/y2 exclusive), or null
              "width": 640, "height": 480},     # image size in pixels
     "predictions": [{"model_version": "...", "score": 0.93, "result": [...]}]}

The prediction's ``score`` is the active-learning score again, so LS's "Prediction score"
column sorts like ``data.score`` (higher = ask first). Its ``result`` pre-annotates the image
with the model's prediction, and for a region query also draws the region with the
``"region"`` tag. Result entries, as LS documents them:

* ``choices``: ``{"value": {"choices": ["cat"]}}`` with the argmax class, ``score`` = its
  probability.
* ``rectanglelabels``: ``{"value": {"x", "y", "width", "height", "rotation": 0,
  "rectanglelabels": ["cat"]}, "original_width", "original_height", "score"}``. ``x``/``y`` are
  the top-left corner and ``width``/``height`` the size, all in percent (0..100) of
  ``original_width``/``original_height``.
* ``brushlabels``: ``{"value": {"format": "rle", "rle": [...], "brushlabels": ["cat"]},
  "original_width", "original_height"}``, one per class present in the predicted mask.

**Brush RLE** (:func:`encode_rle`, :func:`decode_rle`): LS stores a brush mask as the RGBA
image of the mask (``H x W x 4`` bytes, row-major, flattened) compressed with the bit-packed
run-length code of thi.ng's ``rle-pack``, which label-studio-converter's ``brush.py`` also
implements. The bits are read most-significant-bit first out of the byte list ``rle``:

* header: ``num`` (32 bits, the number of values), ``word_size - 1`` (5 bits, bits per value),
  and four counter widths ``size_k - 1`` (4 bits each; LS uses sizes 3, 4, 8 and 16 bits);
* then blocks until ``num`` values are out, each: a flag bit, a 2-bit index ``k``, and a
  ``size_k``-bit count ``n - 1``; flag 1 is a run (one ``word_size``-bit value repeated ``n``
  times), flag 0 a literal block (``n`` values of ``word_size`` bits each, one after another);
* zero bits pad the stream to whole bytes.

A pixel is painted when its alpha byte (the 4th of its 4 values) is > 127; LS paints with 255.
This module writes masks as 0 or 255 in all four channels, like label-studio-converter does.

**Export** (:func:`read_export`): LS's "JSON" export (not "JSON-MIN"): the task list again, each
task with ``"annotations": [{"result": [...], "was_cancelled": false, "updated_at": ...}, ...]``.
Labels come from each task's latest non-cancelled annotation, in the result entries above
drawn with any tag but ``"region"``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

__all__ = [
    "IGNORE_INDEX",
    "REGION_LABEL",
    "TASKS",
    "Label",
    "QueryView",
    "decode_rle",
    "encode_rle",
    "labeling_config",
    "mask_to_rle",
    "read_export",
    "rle_length",
    "rle_to_mask",
    "tasks",
    "write_tasks",
]

TASKS = ("cls", "det", "seg")
"""The task kinds: classification, detection, semantic segmentation."""

IGNORE_INDEX = 255
"""Value of unpainted pixels in the segmentation masks that :func:`read_export` returns."""

REGION_LABEL = "query region"
"""The one label of the ``"region"`` marker tag (det and seg configs)."""

IMAGE_NAME = "image"
LABEL_NAME = "label"
REGION_NAME = "region"

RLE_WORD_SIZE = 8
RLE_SIZES = (3, 4, 8, 16)

_CONTROL = {"cls": "Choices", "det": "RectangleLabels", "seg": "BrushLabels"}
_ITEM = {"cls": "Choice", "det": "Label", "seg": "Label"}
_RESULT_TYPE = {"cls": "choices", "det": "rectanglelabels", "seg": "brushlabels"}
_REGION_COLOR = "#ff00ff"
_PERCENT_TOL = 1e-3  # how far (in percent) a rectangle may poke out of the image; it is clipped

Label: TypeAlias = "int | dict[str, np.ndarray] | np.ndarray"
"""One item's label: cls ``int``; det ``{"boxes": [N, 4] float xyxy px, "labels": [N] int}``;
seg ``[H, W] uint8`` with :data:`IGNORE_INDEX` where nothing was painted."""


@dataclass
class QueryView:
    """One query as an annotator should see it, with the model's prediction to pre-annotate.

    Attributes:
        item: The campaign's stable item id (e.g. the image's relative path).
        image: What LS shows: a path or URL, e.g. ``"/data/local-files/?d=pool/img_001.png"``.
        width: Image width in pixels.
        height: Image height in pixels.
        score: The active-learning score (higher = asked first).
        rank: Position in the round's query order, 0 first.
        region: ``None`` for a whole-image query, else the queried region's id.
        region_box: Detection region query: the region's box, xyxy pixels.
        region_mask: Segmentation region query: bool ``[H, W]``, True inside the region.
        probs: Classification prediction: one probability per class.
        boxes: Detection prediction: ``[N, 4]`` xyxy pixels.
        box_labels: Detection prediction: ``N`` class indices.
        box_scores: Detection prediction: ``N`` confidences (optional).
        mask: Segmentation prediction: ``[H, W]`` uint8 class per pixel
            (:data:`IGNORE_INDEX` = no prediction there).
    """

    item: str
    image: str
    width: int
    height: int
    score: float
    rank: int
    region: int | None = None
    region_box: tuple[float, float, float, float] | None = None
    region_mask: np.ndarray | None = None
    probs: Sequence[float] | None = None
    boxes: np.ndarray | None = None
    box_labels: Sequence[int] | None = None
    box_scores: Sequence[float] | None = None
    mask: np.ndarray | None = None


# --------------------------------------------------------------------------- brush RLE


def encode_rle(
    values: np.ndarray | Sequence[int],
    word_size: int = RLE_WORD_SIZE,
    rle_sizes: Sequence[int] = RLE_SIZES,
) -> list[int]:
    """Encode a flat array of values in LS's brush RLE (see the module docstring).

    Runs of two or more equal values become run blocks; stretches of single values become
    literal blocks. A block's count field uses the narrowest of ``rle_sizes`` that holds it;
    longer stretches are split.

    Args:
        values: Flat non-negative integers, each below ``2 ** word_size``.
        word_size: Bits per value, 1..32.
        rle_sizes: Four count-field widths, 1..16 bits each.

    Returns:
        The encoded stream as a list of byte values (what LS keeps in ``value.rle``).

    Raises:
        ValueError: If a parameter or value is out of range.
    """
    arr = np.asarray(values).ravel()
    sizes = [int(s) for s in rle_sizes]
    if not 1 <= word_size <= 32:
        raise ValueError(f"brush RLE word size must be 1..32 bits, got {word_size}")
    if len(sizes) != 4 or any(not 1 <= s <= 16 for s in sizes):
        raise ValueError(f"brush RLE needs four count widths of 1..16 bits, got {sizes}")
    if arr.size >= 2**32:
        raise ValueError(f"brush RLE holds at most 2**32 - 1 values, got {arr.size}")
    if arr.size and (arr.min() < 0 or int(arr.max()) >= 2**word_size):
        raise ValueError(f"brush RLE values must lie in 0..{2**word_size - 1}")
    arr = arr.astype(np.int64)

    fields: list[int] = [arr.size, word_size - 1, *(s - 1 for s in sizes)]
    widths: list[int] = [32, 5, 4, 4, 4, 4]
    longest = 2 ** max(sizes)

    def block(flag: int, count: int, words: Sequence[int]) -> None:
        k = next(k for k, s in enumerate(sizes) if count <= 2**s)
        fields.extend((flag, k, count - 1, *words))
        widths.extend((1, 2, sizes[k], *([word_size] * len(words))))

    if arr.size:
        starts = np.flatnonzero(np.r_[True, arr[1:] != arr[:-1]])
        lengths = np.diff(np.r_[starts, arr.size]).tolist()
        run_values = arr[starts].tolist()
        singles: list[int] = []  # the pending stretch of values that do not repeat

        def flush() -> None:
            for i in range(0, len(singles), longest):
                chunk = singles[i : i + longest]
                block(0, len(chunk), chunk)
            singles.clear()

        for value, length in zip(run_values, lengths, strict=True):
            if length == 1:
                singles.append(value)
                continue
            flush()
            while length > 0:
                n = min(length, longest)
                block(1, n, [value])
                length -= n
        flush()
    return _pack_bits(fields, widths)


def _pack_bits(fields: Sequence[int], widths: Sequence[int]) -> list[int]:
    """Concatenate ``fields`` (each ``widths[i]`` bits, MSB first) and pad to whole bytes."""
    vals = np.asarray(fields, dtype=np.uint64)
    wids = np.asarray(widths, dtype=np.int64)
    total = int(wids.sum())
    ends = np.cumsum(wids)
    owner = np.repeat(np.arange(len(wids)), wids)  # which field each output bit belongs to
    shift = (ends[owner] - 1 - np.arange(total)).astype(np.uint64)
    bits = ((vals[owner] >> shift) & np.uint64(1)).astype(np.uint8)
    return [int(b) for b in np.packbits(bits)]


class _BitReader:
    """Reads MSB-first bit fields of up to 32 bits from a byte string."""

    def __init__(self, data: bytes) -> None:
        self.data = data + bytes(5)
        self.nbits = 8 * len(data)
        self.pos = 0

    def read(self, n: int) -> int:
        pos = self.pos
        if pos + n > self.nbits:
            raise ValueError("brush RLE stream ends before all its values are decoded")
        chunk = int.from_bytes(self.data[pos >> 3 : (pos >> 3) + 5], "big")
        self.pos = pos + n
        return (chunk >> (40 - (pos & 7) - n)) & ((1 << n) - 1)


def _rle_bytes(rle: bytes | Sequence[int]) -> bytes:
    if isinstance(rle, bytes | bytearray):
        return bytes(rle)
    try:
        return bytes(int(v) for v in rle)
    except (TypeError, ValueError) as err:
        raise ValueError(f"brush RLE must be a list of byte values 0..255 ({err})") from None


def rle_length(rle: bytes | Sequence[int]) -> int:
    """The number of values a brush RLE stream decodes to, read from its header.

    Args:
        rle: The encoded stream (byte values).

    Returns:
        ``num`` from the header.

    Raises:
        ValueError: If the stream is shorter than its header.
    """
    return _BitReader(_rle_bytes(rle)[:4]).read(32)


def decode_rle(rle: bytes | Sequence[int]) -> np.ndarray:
    """Decode LS's brush RLE (see the module docstring) into a flat array.

    Any word size (1..32) and count widths in the header are honoured.

    Args:
        rle: The encoded stream: a list of byte values, as in ``value.rle``, or bytes.

    Returns:
        The ``num`` values, as uint8 (word size <= 8), uint16 (<= 16) or uint32.

    Raises:
        ValueError: If the stream is not byte values, or ends before ``num`` values.
    """
    reader = _BitReader(_rle_bytes(rle))
    num = reader.read(32)
    word_size = reader.read(5) + 1
    sizes = [reader.read(4) + 1 for _ in range(4)]
    if num > (reader.nbits // 4 + 1) * 2**16:  # a block (>= 4 bits) holds <= 2**16 values
        raise ValueError(f"brush RLE header claims {num} values, more than the stream can hold")
    dtype = np.uint8 if word_size <= 8 else np.uint16 if word_size <= 16 else np.uint32
    out = np.zeros(num, dtype=dtype)
    read = reader.read
    i = 0
    while i < num:
        flag = read(1)
        j = min(num, i + 1 + read(sizes[read(2)]))
        if flag:
            out[i:j] = read(word_size)
        else:
            out[i:j] = [read(word_size) for _ in range(j - i)]
        i = j
    return out


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Encode a bool ``[H, W]`` mask as an LS brush RLE (RGBA, painted = 255 in all channels).

    Args:
        mask: 2-D array; nonzero = painted.

    Returns:
        The encoded stream (byte values).
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a brush mask must be 2-D [H, W], got shape {m.shape}")
    rgba = np.repeat(np.where(m.ravel() != 0, 255, 0).astype(np.uint8), 4)
    return encode_rle(rgba)


def rle_to_mask(rle: bytes | Sequence[int], height: int, width: int) -> np.ndarray:
    """Decode an LS brush RLE into a bool ``[height, width]`` mask (alpha > 127 = painted).

    Args:
        rle: The encoded stream (byte values).
        height: Image height in pixels.
        width: Image width in pixels.

    Returns:
        The painted pixels.

    Raises:
        ValueError: If the stream does not hold ``height * width * 4`` values.
    """
    want = height * width * 4
    num = rle_length(rle)
    if num != want:
        raise ValueError(
            f"brush RLE holds {num} values but a {width}x{height} RGBA image needs {want}"
        )
    return decode_rle(rle).reshape(height, width, 4)[:, :, 3] > 127


# --------------------------------------------------------------------------- writing


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")


def _check_classes(classes: Sequence[str]) -> list[str]:
    names = [str(c) for c in classes]
    if not names:
        raise ValueError("classes is empty; pass the class names in class-index order")
    if any(not n.strip() for n in names):
        raise ValueError(f"class names must not be blank: {names}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"class names must be unique; repeated: {dupes}")
    return names


def labeling_config(task: str, classes: Sequence[str]) -> str:
    """The LS labeling-interface XML for ``task`` (see the module docstring for tag names).

    Args:
        task: ``"cls"``, ``"det"`` or ``"seg"``.
        classes: Class names in class-index order (unique, not blank).

    Returns:
        The XML, to paste into LS's "Labeling Interface" code view.

    Raises:
        ValueError: On an unknown task or bad class names.
    """
    _check_task(task)
    names = _check_classes(classes)
    view = ET.Element("View")
    image_attrs = {"name": IMAGE_NAME, "value": "$image"}
    if task != "cls":
        image_attrs.update(zoom="true", zoomControl="true")
    ET.SubElement(view, "Image", image_attrs)
    control_attrs = {"name": LABEL_NAME, "toName": IMAGE_NAME}
    if task == "cls":
        control_attrs.update(choice="single-radio", required="true", showInline="true")
    elif task == "det":
        control_attrs.update(canRotate="false")
    control = ET.SubElement(view, _CONTROL[task], control_attrs)
    for name in names:
        ET.SubElement(control, _ITEM[task], {"value": name})
    if task != "cls":
        region_attrs = {"name": REGION_NAME, "toName": IMAGE_NAME}
        if task == "det":
            region_attrs.update(canRotate="false")
        region = ET.SubElement(view, _CONTROL[task], region_attrs)
        ET.SubElement(region, "Label", {"value": REGION_LABEL, "background": _REGION_COLOR})
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def _where(view: QueryView) -> str:
    return f"query {view.item!r} (rank {view.rank})"


def _percent_rect(box: Any, width: int, height: int, where: str) -> dict[str, float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 < x1 or y2 < y1:
        raise ValueError(f"{where}: box {[x1, y1, x2, y2]} is not a finite xyxy box")
    return {
        "x": x1 / width * 100.0,
        "y": y1 / height * 100.0,
        "width": (x2 - x1) / width * 100.0,
        "height": (y2 - y1) / height * 100.0,
        "rotation": 0,
    }


def _image_result(rid: str, kind: str, from_name: str, view: QueryView) -> dict[str, Any]:
    return {
        "id": rid,
        "type": kind,
        "from_name": from_name,
        "to_name": IMAGE_NAME,
        "original_width": int(view.width),
        "original_height": int(view.height),
        "image_rotation": 0,
    }


def _prediction_results(task: str, names: list[str], view: QueryView) -> list[dict[str, Any]]:
    """The pre-annotation results for one view (model prediction, then the region marker)."""
    where = _where(view)
    n = len(names)
    out: list[dict[str, Any]] = []
    if task == "cls" and view.probs is not None:
        probs = np.asarray(view.probs, dtype=np.float64).ravel()
        if probs.size != n:
            raise ValueError(f"{where}: probs has {probs.size} entries for {n} classes")
        best = int(np.argmax(probs))
        out.append(
            {
                "id": "pred0",
                "type": "choices",
                "from_name": LABEL_NAME,
                "to_name": IMAGE_NAME,
                "value": {"choices": [names[best]]},
                "score": float(probs[best]),
            }
        )
    elif task == "det" and view.boxes is not None:
        boxes = np.asarray(view.boxes, dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(view.box_labels if view.box_labels is not None else [], dtype=np.int64)
        if labels.shape != (len(boxes),):
            raise ValueError(f"{where}: {len(boxes)} boxes but {labels.size} box_labels")
        scores = None
        if view.box_scores is not None:
            scores = np.asarray(view.box_scores, dtype=np.float64).ravel()
            if scores.size != len(boxes):
                raise ValueError(f"{where}: {len(boxes)} boxes but {scores.size} box_scores")
        if labels.size and (labels.min() < 0 or labels.max() >= n):
            raise ValueError(f"{where}: box_labels must lie in 0..{n - 1}")
        for k, (box, label) in enumerate(zip(boxes, labels.tolist(), strict=True)):
            result = _image_result(f"pred{k}", "rectanglelabels", LABEL_NAME, view)
            value = _percent_rect(box, view.width, view.height, where)
            result["value"] = {**value, "rectanglelabels": [names[label]]}
            if scores is not None:
                result["score"] = float(scores[k])
            out.append(result)
    elif task == "seg" and view.mask is not None:
        mask = np.asarray(view.mask)
        if mask.shape != (view.height, view.width):
            raise ValueError(
                f"{where}: mask shape {mask.shape} is not (height, width) = "
                f"{(view.height, view.width)}"
            )
        present = [int(c) for c in np.unique(mask) if int(c) != IGNORE_INDEX]
        if any(c < 0 or c >= n for c in present):
            raise ValueError(f"{where}: mask values must lie in 0..{n - 1} or be {IGNORE_INDEX}")
        for k, cls in enumerate(present):
            result = _image_result(f"pred{k}", "brushlabels", LABEL_NAME, view)
            result["value"] = {
                "format": "rle",
                "rle": mask_to_rle(mask == cls),
                "brushlabels": [names[cls]],
            }
            out.append(result)
    if task == "det" and view.region_box is not None:
        result = _image_result("region", "rectanglelabels", REGION_NAME, view)
        value = _percent_rect(view.region_box, view.width, view.height, where)
        result["value"] = {**value, "rectanglelabels": [REGION_LABEL]}
        out.append(result)
    if task == "seg" and view.region_mask is not None:
        result = _image_result("region", "brushlabels", REGION_NAME, view)
        region_mask = np.asarray(view.region_mask, dtype=bool)
        if region_mask.shape != (view.height, view.width):
            raise ValueError(f"{where}: region_mask shape {region_mask.shape} is not (H, W)")
        result["value"] = {
            "format": "rle",
            "rle": mask_to_rle(region_mask),
            "brushlabels": [REGION_LABEL],
        }
        out.append(result)
    return out


def _region_box(view: QueryView) -> list[float] | None:
    if view.region_box is not None:
        return [float(v) for v in view.region_box]
    if view.region_mask is not None:
        rows = np.flatnonzero(np.asarray(view.region_mask).any(axis=1))
        cols = np.flatnonzero(np.asarray(view.region_mask).any(axis=0))
        if rows.size:
            return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]
    return None


def tasks(
    task: str, classes: Sequence[str], views: Sequence[QueryView], model_version: str
) -> list[dict[str, Any]]:
    """LS tasks, one per view, with the model's prediction as pre-annotation.

    See the module docstring for the layout. A view without a prediction for ``task`` (and
    without a region to mark) gets ``"predictions": []``.

    Args:
        task: ``"cls"``, ``"det"`` or ``"seg"``.
        classes: Class names in class-index order.
        views: The round's queries.
        model_version: Names the model in LS (e.g. ``"round-3"``).

    Returns:
        JSON-ready task dicts (plain Python types only).

    Raises:
        ValueError: On an unknown task, bad class names, or a view whose prediction does not
            fit the classes or the image size.
    """
    _check_task(task)
    names = _check_classes(classes)
    out = []
    for view in views:
        if view.width <= 0 or view.height <= 0:
            raise ValueError(f"{_where(view)}: width and height must be positive")
        data = {
            "image": str(view.image),
            "item": str(view.item),
            "score": float(view.score),
            "rank": int(view.rank),
            "region": None if view.region is None else int(view.region),
            "region_box": _region_box(view),
            "width": int(view.width),
            "height": int(view.height),
        }
        results = _prediction_results(task, names, view)
        predictions = []
        if results:
            predictions.append(
                {"model_version": str(model_version), "score": float(view.score), "result": results}
            )
        out.append({"data": data, "predictions": predictions})
    return out


def write_tasks(
    path: str | os.PathLike[str],
    task: str,
    classes: Sequence[str],
    views: Sequence[QueryView],
    model_version: str,
) -> Path:
    """Write :func:`tasks` as a JSON file for LS's import, atomically (temp file + replace).

    Args:
        path: Destination file (its folder must exist).
        task: ``"cls"``, ``"det"`` or ``"seg"``.
        classes: Class names in class-index order.
        views: The round's queries.
        model_version: Names the model in LS.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    dest = Path(path)
    payload = json.dumps(tasks(task, classes, views, model_version), indent=1)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


# --------------------------------------------------------------------------- reading


def _when(annotation: dict[str, Any]) -> float:
    """Seconds since the epoch of an annotation's last change (``-inf`` if unknown)."""
    for key in ("updated_at", "created_at"):
        stamp = annotation.get(key)
        if isinstance(stamp, str):
            try:
                when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
            except ValueError:
                continue
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            return when.timestamp()
    return -math.inf


def _latest(annotations: Any) -> dict[str, Any] | None:
    """The latest non-cancelled annotation (by time, then id, then position), or None."""
    if not isinstance(annotations, list):
        return None
    live = [
        (i, a)
        for i, a in enumerate(annotations)
        if isinstance(a, dict) and not a.get("was_cancelled", False)
    ]
    if not live:
        return None

    def key(pair: tuple[int, dict[str, Any]]) -> tuple[float, int, int]:
        i, a = pair
        aid = a.get("id")
        return (_when(a), aid if isinstance(aid, int) else -1, i)

    return max(live, key=key)[1]


class _Context:
    """Names a task in error messages."""

    def __init__(self, path: Path, index: int, task: dict[str, Any], item: str | None) -> None:
        tid = task.get("id")
        self.task = f"task {tid if tid is not None else f'#{index}'}"
        if item is not None:
            self.task += f" (item {item!r})"
        self.prefix = f"{path}: {self.task}"

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.prefix}: {message}")


def _class_index(name: Any, names: list[str], ctx: _Context, kind: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        raise ctx.error(
            f"{kind} uses unknown class {name!r}; known classes are {names} "
            "(fix the labeling config in LS or the classes passed to read_export)"
        ) from None


def _labels_of(result: dict[str, Any], kind: str, ctx: _Context) -> list[Any]:
    value = result.get("value")
    labels = value.get(kind) if isinstance(value, dict) else None
    if not isinstance(labels, list) or not labels:
        raise ctx.error(f"a {kind} result has no {kind} list in its value; relabel it in LS")
    return labels


def _image_size(result: dict[str, Any], data: dict[str, Any], ctx: _Context) -> tuple[int, int]:
    """(width, height) of the image a result was drawn on, checked against the task's data."""
    width = result.get("original_width", data.get("width"))
    height = result.get("original_height", data.get("height"))
    if not isinstance(width, int) or not isinstance(height, int) or width <= 0 or height <= 0:
        raise ctx.error(
            "cannot tell the image size: the result has no original_width/original_height "
            "and the task data has no width/height"
        )
    if (data.get("width"), data.get("height")) not in ((None, None), (width, height)):
        raise ctx.error(
            f"LS saw the image as {width}x{height} but the task data says "
            f"{data.get('width')}x{data.get('height')}; fix data.width/height or the image"
        )
    return width, height


def _read_cls(results: list[dict[str, Any]], names: list[str], ctx: _Context) -> int:
    chosen = set()
    for result in results:
        if result.get("type") == "choices" and result.get("from_name") != REGION_NAME:
            for name in _labels_of(result, "choices", ctx):
                chosen.add(_class_index(name, names, ctx, "a choice"))
    if len(chosen) != 1:
        picked = sorted(names[c] for c in chosen)
        raise ctx.error(
            f"the annotation must choose exactly one class, it chose {picked}; fix it in LS"
        )
    return chosen.pop()


def _read_det(
    results: list[dict[str, Any]], names: list[str], data: dict[str, Any], ctx: _Context
) -> dict[str, np.ndarray]:
    boxes: list[list[float]] = []
    labels: list[int] = []
    for result in results:
        if result.get("type") != "rectanglelabels" or result.get("from_name") == REGION_NAME:
            continue
        (name, *more) = _labels_of(result, "rectanglelabels", ctx)
        if more:
            raise ctx.error(f"a rectangle has several labels {[name, *more]}; keep one in LS")
        label = _class_index(name, names, ctx, "a rectangle")
        width, height = _image_size(result, data, ctx)
        value = result["value"]
        try:
            x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
            rotation = float(value.get("rotation", 0) or 0)
        except (KeyError, TypeError, ValueError):
            raise ctx.error(f"rectangle {value} lacks numeric x/y/width/height") from None
        if abs(rotation) > 1e-9:
            raise ctx.error(
                f"rectangle of class {name!r} is rotated by {rotation} degrees; "
                "straighten it in LS (rotated boxes are not supported)"
            )
        tol = _PERCENT_TOL
        inside = (
            all(math.isfinite(v) for v in (x, y, w, h))
            and x >= -tol
            and y >= -tol
            and w >= 0
            and h >= 0
            and x + w <= 100 + tol
            and y + h <= 100 + tol
        )
        if not inside:
            raise ctx.error(
                f"rectangle of class {name!r} (x={x}, y={y}, width={w}, height={h} percent) "
                "lies outside the image; move it inside in LS"
            )
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, 100.0), min(y + h, 100.0)
        boxes.append([x1 * width / 100, y1 * height / 100, x2 * width / 100, y2 * height / 100])
        labels.append(label)
    return {
        "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        "labels": np.asarray(labels, dtype=np.int64),
    }


def _paint(
    canvas: np.ndarray, painted: np.ndarray, cls: int, names: list[str], ctx: _Context, what: str
) -> None:
    """Paint ``cls`` where ``painted``; refuse to overwrite another class."""
    clash = painted & (canvas != IGNORE_INDEX) & (canvas != cls)
    if clash.any():
        row, col = (int(v) for v in np.argwhere(clash)[0])
        other = names[int(canvas[row, col])]
        raise ctx.error(
            f"{what} paint pixel (row {row}, col {col}) and {int(clash.sum())} pixel(s) in all "
            f"with both {other!r} and {names[cls]!r}; erase the overlap from one of them in LS"
        )
    canvas[painted] = cls


def _read_seg(
    results: list[dict[str, Any]], names: list[str], data: dict[str, Any], ctx: _Context
) -> np.ndarray:
    canvas: np.ndarray | None = None
    for result in results:
        if result.get("type") != "brushlabels" or result.get("from_name") == REGION_NAME:
            continue
        (name, *more) = _labels_of(result, "brushlabels", ctx)
        if more:
            raise ctx.error(f"a brush region has several labels {[name, *more]}; keep one in LS")
        cls = _class_index(name, names, ctx, "a brush region")
        width, height = _image_size(result, data, ctx)
        value = result["value"]
        if value.get("format", "rle") != "rle" or "rle" not in value:
            raise ctx.error(f"brush region of class {name!r} is not stored as RLE")
        try:
            painted = rle_to_mask(value["rle"], height, width)
        except ValueError as err:
            raise ctx.error(f"brush region of class {name!r}: {err}; redraw it in LS") from None
        if canvas is None:
            canvas = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)
        elif canvas.shape != (height, width):
            raise ctx.error("brush regions were drawn on images of different sizes")
        _paint(canvas, painted, cls, names, ctx, "two brush regions of the annotation")
    if canvas is None:
        data_w, data_h = data.get("width"), data.get("height")
        if not isinstance(data_w, int) or not isinstance(data_h, int) or data_w <= 0 or data_h <= 0:
            raise ctx.error("nothing is painted and the task data has no width/height")
        canvas = np.full((data_h, data_w), IGNORE_INDEX, dtype=np.uint8)
    return canvas


def _same_label(a: Label, b: Label) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):

        def rows(lab: dict[str, np.ndarray]) -> np.ndarray:
            table = np.column_stack([lab["labels"].astype(np.float64), lab["boxes"]])
            return table[np.lexsort(table.T[::-1])]

        ra, rb = rows(a), rows(b)
        return ra.shape == rb.shape and bool(np.allclose(ra, rb, rtol=0, atol=1e-6))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and bool(np.array_equal(a, b))
    return a == b


def _merge(task: str, old: Label, new: Label, names: list[str], ctx: _Context) -> Label:
    """Merge the labels of two tasks for one item but different regions."""
    if task == "cls":
        assert isinstance(old, int) and isinstance(new, int)
        if old != new:
            raise ctx.error(
                f"is labelled {names[new]!r} but another task of this item says "
                f"{names[old]!r}; make the two tasks agree in LS"
            )
        return old
    if task == "det":
        assert isinstance(old, dict) and isinstance(new, dict)
        boxes, labels = list(old["boxes"]), list(old["labels"])
        for box, label in zip(new["boxes"], new["labels"], strict=True):
            dup = any(
                lab == label and np.allclose(b, box, rtol=0, atol=1e-6)
                for b, lab in zip(boxes, labels, strict=True)
            )
            if not dup:
                boxes.append(box)
                labels.append(label)
        return {
            "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            "labels": np.asarray(labels, dtype=np.int64),
        }
    assert isinstance(old, np.ndarray) and isinstance(new, np.ndarray)
    if old.shape != new.shape:
        raise ctx.error(f"mask size {new.shape} differs from another task's {old.shape}")
    merged = old.copy()
    for cls in np.unique(new[new != IGNORE_INDEX]).tolist():
        _paint(merged, new == cls, int(cls), names, ctx, "this task and another one")
    return merged


def read_export(
    path: str | os.PathLike[str], task: str, classes: Sequence[str]
) -> dict[str, Label]:
    """Read LS's "JSON" export into labels, one per item.

    Each task contributes its latest non-cancelled annotation (latest by ``updated_at``, else
    ``created_at``, else annotation id, else list position). Tasks with no annotation, or with
    cancelled (skipped) ones only, are skipped: the result holds labelled items only. Results
    drawn with the ``"region"`` marker tag, and result types that do not belong to ``task``,
    are ignored.

    Several tasks may carry one item. Tasks with the same ``data.region`` (e.g. the same item
    queried twice) must agree. Tasks for different regions of one item are merged: detection
    boxes are pooled (a box repeated within 1e-6 px with the same class is kept once),
    segmentation masks are overlaid, and a classification must be the same.

    Args:
        path: The export file.
        task: ``"cls"``, ``"det"`` or ``"seg"``.
        classes: Class names in class-index order, as given to :func:`labeling_config`.

    Returns:
        Item id (``data.item``) -> label: cls ``int`` class index; det ``{"boxes": float64
        [N, 4] xyxy pixels, "labels": int64 [N]}``; seg ``uint8 [H, W]`` holding the class
        index of every painted pixel and :data:`IGNORE_INDEX` elsewhere.

    Raises:
        ValueError: One line naming the file and the task/item, saying what to fix: the export
            is not a JSON list; a task has no ``data.item``; a class name is unknown; a
            rectangle lies outside the image; a brush mask does not decode to width*height*4
            values; two brush regions (of one annotation, or of two tasks of one item) paint a
            pixel with different classes; tasks of one item have conflicting labels.
    """
    _check_task(task)
    names = _check_classes(classes)
    src = Path(path)
    try:
        export = json.loads(src.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{src}: not JSON ({err}); export the project from LS as 'JSON'") from None
    if not isinstance(export, list):
        raise ValueError(
            f"{src}: the export is a JSON {type(export).__name__}, not a list of tasks; "
            "export the project from LS with the 'JSON' format"
        )
    labels: dict[str, Label] = {}
    seen: dict[tuple[str, Any], tuple[Label, str]] = {}  # (item, region) -> (label, task)
    for index, entry in enumerate(export):
        if not isinstance(entry, dict):
            raise ValueError(f"{src}: task #{index} is not a JSON object; re-export as 'JSON'")
        data = entry.get("data")
        item = data.get("item") if isinstance(data, dict) else None
        if not isinstance(item, str) or not item:
            raise _Context(src, index, entry, None).error(
                "has no data.item; import the tasks written by write_tasks, and export as "
                "'JSON' (not 'JSON-MIN')"
            )
        assert isinstance(data, dict)
        ctx = _Context(src, index, entry, item)
        annotation = _latest(entry.get("annotations"))
        if annotation is None:
            continue
        results = [r for r in annotation.get("result") or [] if isinstance(r, dict)]
        label: Label
        if task == "cls":
            label = _read_cls(results, names, ctx)
        elif task == "det":
            label = _read_det(results, names, data, ctx)
        else:
            label = _read_seg(results, names, data, ctx)
        key = (item, data.get("region"))
        if key in seen:
            other, other_task = seen[key]
            if not _same_label(other, label):
                raise ctx.error(
                    f"its label conflicts with the one {other_task} gives the same item and "
                    "region; make the two tasks agree in LS"
                )
            continue
        seen[key] = (label, ctx.task)
        labels[item] = (
            label if item not in labels else _merge(task, labels[item], label, names, ctx)
        )
    return labels
