"""The bundled demo campaigns: synthetic medical images (segmentation) or shapes (detection)
split into what a real campaign has (a few labeled images, an unlabeled pool, a labeled
evaluation set) plus the pool's truth, read only by the simulated annotators
(:func:`answer_queries`, :func:`answer_detection_queries`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from taskal.data.synthetic_det import ensure_synthetic_detection
from taskal.data.synthetic_seg import ensure_synthetic_segmentation
from taskal.masks import UNLABELED, item_file

#: records a demo's settings in its folder, written last
STAMP = "demo.json"


def _made(root: Path, args: dict[str, Any]) -> bool:
    """Whether ``root`` holds a complete demo made with ``args``.

    Raises:
        ValueError: it holds one made with other settings.
    """
    stamp = root / STAMP
    if not stamp.is_file():
        return False
    if json.loads(stamp.read_text()) != args:
        raise ValueError(f"{root} holds a demo made with other settings; choose another folder")
    return True


def make_demo_segmentation(
    root: str | Path,
    num_labeled: int = 8,
    num_pool: int = 120,
    num_eval: int = 40,
    image_size: tuple[int, int] = (64, 64),
    seed: int = 0,
) -> dict[str, Path]:
    """Write (once) ``root/{labeled,pool,eval}/images``, ``labeled/masks``, ``eval/masks`` and
    ``oracle/masks`` (the pool's truth, for :func:`answer_queries` only).

    Returns:
        the folders by name (``labeled_images``, ``pool_images``, ``oracle_masks``, ...).
    """
    root = Path(root)
    args = dict(
        num_labeled=num_labeled,
        num_pool=num_pool,
        num_eval=num_eval,
        image_size=list(image_size),
        seed=seed,
    )
    folders = {
        "labeled_images": root / "labeled" / "images",
        "labeled_masks": root / "labeled" / "masks",
        "pool_images": root / "pool" / "images",
        "oracle_masks": root / "oracle" / "masks",
        "eval_images": root / "eval" / "images",
        "eval_masks": root / "eval" / "masks",
    }
    if _made(root, args):
        return folders
    total = num_labeled + num_pool + num_eval
    source = ensure_synthetic_segmentation(
        root / "source", num_images=total, image_size=tuple(image_size), seed=seed
    )
    names = sorted(p.name for p in Path(source.img_dir).glob("*.png"))
    parts = {
        ("labeled_images", "labeled_masks"): names[:num_labeled],
        ("pool_images", "oracle_masks"): names[num_labeled : num_labeled + num_pool],
        ("eval_images", "eval_masks"): names[num_labeled + num_pool :],
    }
    for (images, masks), chosen in parts.items():
        for key in (images, masks):
            shutil.rmtree(folders[key], ignore_errors=True)
            folders[key].mkdir(parents=True)
        for name in chosen:
            shutil.copyfile(Path(source.img_dir) / name, folders[images] / name)
            shutil.copyfile(Path(source.ann_dir) / name, folders[masks] / name)
    (root / STAMP).write_text(json.dumps(args))
    return folders


def answer_queries(queries_dir: str | Path, oracle_masks: str | Path, out_dir: str | Path) -> Path:
    """The simulated annotator: for every query of a round's ``queries/`` folder, the true
    labels on the asked pixels (``query_masks/<item>.png`` is 1 there) and 255 elsewhere,
    written as ``out_dir/<item>.png`` (what ``tools/campaign.py import`` reads)."""
    queries_dir, out = Path(queries_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    listing: list[dict[str, Any]] = json.loads((queries_dir / "queries.json").read_text())
    for item in dict.fromkeys(str(q["item"]) for q in listing):
        name = item_file(item)
        with Image.open(queries_dir / "query_masks" / name) as asked:
            where = np.asarray(asked) == 1
        with Image.open(Path(oracle_masks) / item) as truth:
            labels = np.asarray(truth)
        Image.fromarray(np.where(where, labels, UNLABELED).astype(np.uint8)).save(out / name)
    return out


def _coco_subset(coco: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The COCO json of the images named ``names`` only."""
    wanted = set(names)
    images = [i for i in coco["images"] if i["file_name"] in wanted]
    ids = {i["id"] for i in images}
    anns = [a for a in coco["annotations"] if a["image_id"] in ids]
    return {"images": images, "annotations": anns, "categories": coco["categories"]}


def make_demo_detection(
    root: str | Path,
    num_labeled: int = 16,
    num_pool: int = 100,
    num_eval: int = 40,
    image_size: tuple[int, int] = (96, 96),
    classes: Sequence[str] = ("circle", "square", "triangle"),
    seed: int = 0,
) -> dict[str, Path]:
    """Write (once) ``root/labeled/{images,annotations.json}``, ``root/pool/images``,
    ``root/eval/{images,annotations.json}`` and ``root/oracle/annotations.json`` (the pool's
    truth, for :func:`answer_detection_queries` only) from synthetic shapes."""
    root = Path(root)
    args = dict(
        num_labeled=num_labeled,
        num_pool=num_pool,
        num_eval=num_eval,
        image_size=list(image_size),
        classes=list(classes),
        seed=seed,
    )
    folders = {
        "labeled_images": root / "labeled" / "images",
        "pool_images": root / "pool" / "images",
        "eval_images": root / "eval" / "images",
        "oracle": root / "oracle" / "annotations.json",
    }
    if _made(root, args):
        return folders
    source = ensure_synthetic_detection(
        root / "source",
        num_images=num_labeled + num_pool + num_eval,
        image_size=tuple(image_size),
        classes=tuple(classes),
        objects_per_image=(1, 4),
        object_scale=(0.15, 0.5),
        seed=seed,
    )
    coco = json.loads(Path(source.ann_file).read_text())
    names = [str(i["file_name"]) for i in coco["images"]]
    parts = {
        "labeled": names[:num_labeled],
        "pool": names[num_labeled : num_labeled + num_pool],
        "eval": names[num_labeled + num_pool :],
    }
    for part, chosen in parts.items():
        shutil.rmtree(root / part, ignore_errors=True)
        (root / part / "images").mkdir(parents=True)
        for name in chosen:
            shutil.copyfile(Path(source.img_dir) / name, root / part / "images" / name)
        if part != "pool":
            subset = _coco_subset(coco, chosen)
            (root / part / "annotations.json").write_text(json.dumps(subset))
    folders["oracle"].parent.mkdir(parents=True, exist_ok=True)
    folders["oracle"].write_text(json.dumps(_coco_subset(coco, parts["pool"])))
    (root / STAMP).write_text(json.dumps(args))
    return folders


def answer_detection_queries(
    queries_dir: str | Path, oracle: str | Path, out_file: str | Path
) -> Path:
    """The simulated annotator for detection: the true boxes of a round's queried images as
    a COCO json (what ``tools/campaign.py import`` reads)."""
    listing = json.loads((Path(queries_dir) / "queries.json").read_text())
    items = list(dict.fromkeys(str(q["item"]) for q in listing))
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_coco_subset(json.loads(Path(oracle).read_text()), items)))
    return out


__all__ = [
    "answer_detection_queries",
    "answer_queries",
    "make_demo_detection",
    "make_demo_segmentation",
]
