"""A synthetic detection data set written to disk as PNG images plus a COCO json.

Filled shapes of several classes on a textured background: objects from a few pixels to
most of the image, several per image, later shapes drawn over earlier ones (occlusion) and
classes drawn with a configurable, by default geometric, frequency (imbalance). The files
are what any COCO-format data set looks like, so the demo and the tests go through the same
loader as real data::

    files = make_synthetic_detection("work_dirs/shapes", num_images=200, seed=0)
    pool = load_coco_detection(files.ann_file, files.img_dir)

Everything is drawn with numpy and PIL from one seed: image ``i`` depends only on
``(seed, i)`` and the drawing parameters, so the same call writes byte-identical files.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from taskal.registry import DATASETS

#: a polygon or ellipse drawer: (draw, x0, y0, side) -> None, filling the shape with 255.
ShapeDrawer = Callable[[ImageDraw.ImageDraw, float, float, float], None]

SizeSpec = int | tuple[int, int]


class SyntheticDetectionFiles(NamedTuple):
    """Paths of a written synthetic set: pass ``ann_file`` and ``img_dir`` to
    :func:`taskal.data.load_coco_detection`."""

    root: Path
    ann_file: Path
    img_dir: Path


def _circle(draw: ImageDraw.ImageDraw, x: float, y: float, s: float) -> None:
    draw.ellipse([x, y, x + s - 1, y + s - 1], fill=255)


def _square(draw: ImageDraw.ImageDraw, x: float, y: float, s: float) -> None:
    draw.rectangle([x, y, x + s - 1, y + s - 1], fill=255)


def _triangle(draw: ImageDraw.ImageDraw, x: float, y: float, s: float) -> None:
    draw.polygon([(x + (s - 1) / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=255)


def _diamond(draw: ImageDraw.ImageDraw, x: float, y: float, s: float) -> None:
    h = (s - 1) / 2
    draw.polygon([(x + h, y), (x + s - 1, y + h), (x + h, y + s - 1), (x, y + h)], fill=255)


def _star(draw: ImageDraw.ImageDraw, x: float, y: float, s: float) -> None:
    r_out, cx, cy = (s - 1) / 2, x + (s - 1) / 2, y + (s - 1) / 2
    points = []
    for k in range(10):
        r = r_out if k % 2 == 0 else 0.45 * r_out
        a = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    draw.polygon(points, fill=255)


#: the shape classes the generator can draw, by name.
SHAPES: dict[str, ShapeDrawer] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "diamond": _diamond,
    "star": _star,
}


def _size_range(spec: SizeSpec, what: str) -> tuple[int, int]:
    pair: tuple[Any, ...] = ()
    if isinstance(spec, int):
        pair = (spec, spec)
    elif isinstance(spec, Sequence):
        pair = tuple(spec)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair) or not 8 <= pair[0] <= pair[1]:
        raise ValueError(
            f"image_size {what} must be an int >= 8 or an inclusive (min, max) pair of such "
            f"ints, got {spec!r}"
        )
    return pair[0], pair[1]


def _class_probabilities(
    classes: Sequence[str], imbalance: float, class_weights: Sequence[float] | None
) -> np.ndarray:
    if class_weights is None:
        if not 0.0 < imbalance <= 1.0:
            raise ValueError(
                f"imbalance must lie in (0, 1] (class k is drawn with weight imbalance**k; "
                f"1 = balanced), got {imbalance}"
            )
        weights = np.array([imbalance**k for k in range(len(classes))], dtype=np.float64)
    else:
        weights = np.asarray(class_weights, dtype=np.float64)
        if weights.shape != (len(classes),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(
                f"class_weights needs one non-negative weight per class ({len(classes)}) with a "
                f"positive sum, got {list(class_weights)}"
            )
    return weights / weights.sum()


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """``[H, W, 3]`` float: a random colour, a smooth blotchy texture and pixel noise."""
    base = rng.uniform(40, 215, size=3)
    coarse = rng.integers(0, 256, size=(max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    blotches = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR))
    noise = rng.normal(0.0, 8.0, size=(h, w, 3))
    return base + (blotches.astype(np.float64) - 127.5) * 0.3 + noise


def _shape_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour at least some distance from the canvas's mean colour (up to 10 redraws)."""
    mean = background.reshape(-1, 3).mean(0)
    colour = rng.uniform(0, 255, size=3)
    for _ in range(10):
        if np.linalg.norm(colour - mean) >= 80:
            break
        colour = rng.uniform(0, 255, size=3)
    return colour


def _draw_image(
    rng: np.random.Generator,
    h: int,
    w: int,
    probs: np.ndarray,
    shape_fns: list[ShapeDrawer],
    objects: tuple[int, int],
    scale: tuple[float, float],
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image ``[H, W, 3]`` uint8 and its shapes in drawing order as (class, mask)."""
    canvas = _background(rng, h, w)
    side = min(h, w)
    lo = max(4.0, scale[0] * side)
    hi = max(lo, scale[1] * side)
    shapes = []
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        cls = int(rng.choice(len(probs), p=probs))
        s = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        s = min(max(s, 4), side)
        x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        layer = Image.new("L", (w, h), 0)
        shape_fns[cls](ImageDraw.Draw(layer), x, y, s)
        mask = np.asarray(layer) > 0
        colour = _shape_colour(rng, canvas)
        canvas[mask] = colour + rng.normal(0.0, 6.0, size=(int(mask.sum()), 3))
        shapes.append((cls, mask))
    return np.clip(canvas, 0, 255).astype(np.uint8), shapes


def _annotations(
    shapes: list[tuple[int, np.ndarray]], max_occlusion: float
) -> list[tuple[int, list[int], int, float]]:
    """(class, full xywh box, full area, covered fraction) of each shape that stays visible.

    A shape's box and area are those of the whole drawn shape; its covered fraction is the
    share of its pixels that later shapes paint over. Shapes covered more than
    ``max_occlusion`` are left out.
    """
    if not shapes:
        return []
    owner = np.full(shapes[0][1].shape, -1, dtype=np.int64)
    for i, (_, mask) in enumerate(shapes):
        owner[mask] = i
    kept = []
    for i, (cls, mask) in enumerate(shapes):
        area = int(mask.sum())
        covered = 1.0 - float((owner == i).sum()) / area
        if covered > max_occlusion:
            continue
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        x0, y0 = int(cols[0]), int(rows[0])
        box = [x0, y0, int(cols[-1]) + 1 - x0, int(rows[-1]) + 1 - y0]
        kept.append((cls, box, area, round(covered, 4)))
    return kept


def _prepare_root(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder; choose another root")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{root} is not empty; choose an empty or new folder, or pass overwrite=True "
                "to replace its images/ and annotations.json"
            )
        if (root / "images").is_dir():
            shutil.rmtree(root / "images")
        (root / "annotations.json").unlink(missing_ok=True)
    (root / "images").mkdir(parents=True)


@DATASETS.register_module(name="synthetic_detection")
def make_synthetic_detection(
    root: str | Path,
    num_images: int = 100,
    image_size: tuple[SizeSpec, SizeSpec] = (64, 64),
    classes: Sequence[str] = ("circle", "square", "triangle", "diamond", "star"),
    seed: int = 0,
    objects_per_image: tuple[int, int] = (1, 5),
    object_scale: tuple[float, float] = (0.1, 0.6),
    imbalance: float = 0.6,
    class_weights: Sequence[float] | None = None,
    max_occlusion: float = 0.8,
    overwrite: bool = False,
) -> SyntheticDetectionFiles:
    """Write a synthetic detection set: ``root/images/<index>.png`` and ``root/annotations.json``.

    Registered in ``DATASETS`` as ``"synthetic_detection"``; it returns the written paths
    (not a pool): load them with :func:`taskal.data.load_coco_detection`.

    Args:
        root: an empty or new folder.
        num_images: how many images.
        image_size: ``(H, W)``; each side an int or an inclusive ``(min, max)`` range drawn
            per image, e.g. ``((48, 96), (48, 96))`` for differently sized images.
        classes: shape names from :data:`SHAPES`; category ids are ``1..C`` in this order.
        seed: the one source of randomness; the same arguments write identical files.
        objects_per_image: inclusive ``(min, max)`` count of shapes drawn per image.
        object_scale: a shape's side as a fraction of the image's shorter side, drawn
            log-uniformly from this range (never under 4 pixels): small to large objects.
        imbalance: class ``k`` is drawn with weight ``imbalance**k`` (geometric; 1 = balanced).
        class_weights: explicit per-class weights instead of ``imbalance``.
        max_occlusion: shapes are drawn in order, later ones over earlier ones. Each drawn
            shape is annotated with the box and area of the *whole* shape, unless more than
            this fraction of its pixels ends up covered, in which case it gets no annotation
            (its visible remainder stays in the image). ``"occluded"`` in each annotation
            records the covered fraction.
        overwrite: replace ``root/images/`` and ``root/annotations.json`` of a non-empty root
            (other files there are left alone); without it a non-empty root is refused.

    Returns:
        The root, the annotation file and the image folder.

    Raises:
        FileExistsError: ``root`` is not empty and ``overwrite`` is False.
        ValueError: an unknown shape name or a parameter out of range.
    """
    unknown = [c for c in classes if c not in SHAPES]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ValueError(
            f"classes must be distinct names from {sorted(SHAPES)}, got {list(classes)}"
        )
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not isinstance(image_size, Sequence) or len(image_size) != 2:
        raise ValueError(
            f"image_size must be (H, W), each an int or a (min, max) pair, got {image_size!r}"
        )
    h_range, w_range = _size_range(image_size[0], "height"), _size_range(image_size[1], "width")
    if not 0 <= objects_per_image[0] <= objects_per_image[1]:
        raise ValueError(
            f"objects_per_image must be (min, max), 0 <= min <= max, got {objects_per_image}"
        )
    if not 0.0 < object_scale[0] <= object_scale[1] <= 1.0:
        raise ValueError(
            f"object_scale must be (min, max) with 0 < min <= max <= 1, got {object_scale}"
        )
    if not 0.0 <= max_occlusion <= 1.0:
        raise ValueError(f"max_occlusion must lie in [0, 1], got {max_occlusion}")
    probs = _class_probabilities(classes, imbalance, class_weights)
    shape_fns = [SHAPES[c] for c in classes]

    root = Path(root)
    _prepare_root(root, overwrite)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        h = int(rng.integers(h_range[0], h_range[1] + 1))
        w = int(rng.integers(w_range[0], w_range[1] + 1))
        pixels, shapes = _draw_image(rng, h, w, probs, shape_fns, objects_per_image, object_scale)
        file_name = f"{i:06d}.png"
        Image.fromarray(pixels).save(root / "images" / file_name)
        images.append({"id": i + 1, "file_name": file_name, "height": h, "width": w})
        for cls, box, area, covered in _annotations(shapes, max_occlusion):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "bbox": box,
                    "area": area,
                    "iscrowd": 0,
                    "occluded": covered,
                }
            )
    dataset = {
        "info": {
            "description": "taskal synthetic shapes",
            "seed": seed,
            "arguments": _arguments(
                num_images=num_images,
                image_size=image_size,
                classes=classes,
                seed=seed,
                objects_per_image=objects_per_image,
                object_scale=object_scale,
                imbalance=imbalance,
                class_weights=class_weights,
                max_occlusion=max_occlusion,
            ),
        },
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(classes)
        ],
    }
    ann_file = root / "annotations.json"
    ann_file.write_text(json.dumps(dataset))
    return SyntheticDetectionFiles(root, ann_file, root / "images")


def _arguments(**kwargs: Any) -> dict[str, Any]:
    """The generator's arguments as JSON stores them (tuples become lists)."""
    return dict(json.loads(json.dumps(kwargs)))


def ensure_synthetic_detection(root: str | Path, **kwargs: Any) -> SyntheticDetectionFiles:
    """The synthetic set in ``root``: generated on the first call, reused on later ones.

    A set is reused only when ``root/annotations.json`` records the same generator
    arguments (:func:`make_synthetic_detection` writes them into its ``info``); a folder
    holding a set made with other arguments is refused, never overwritten.

    Args:
        root: the set's folder.
        **kwargs: :func:`make_synthetic_detection` arguments other than ``root`` and
            ``overwrite``.
    """
    import inspect

    if "overwrite" in kwargs:
        raise ValueError("ensure_synthetic_detection never overwrites; remove 'overwrite'")
    params = inspect.signature(make_synthetic_detection).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(f"unknown synthetic detection arguments {unknown}")
    wanted = _arguments(
        **{n: kwargs.get(n, p.default) for n, p in params.items() if n not in ("root", "overwrite")}
    )
    root = Path(root)
    ann_file = root / "annotations.json"
    if ann_file.exists():
        info = json.loads(ann_file.read_text()).get("info", {})
        if info.get("arguments") != wanted:
            raise ValueError(
                f"{root} holds a synthetic set made with other arguments "
                f"({info.get('arguments')}); pick another root or delete that folder"
            )
        return SyntheticDetectionFiles(root, ann_file, root / "images")
    return make_synthetic_detection(root, **kwargs)
