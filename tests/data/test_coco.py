from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from taskal.data import (
    CocoDetectionPool,
    category_counts,
    load_coco_detection,
    make_synthetic_detection,
)
from taskal.registry import DATASETS, build
from taskal.types import Batch


def _tiny(root: Path) -> dict[str, Any]:
    """Two real PNGs (a.png 20x30 HxW, b.png 16x16) and a valid COCO dict describing them."""
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (30, 20), (255, 0, 0)).save(root / "img" / "a.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(root / "img" / "b.png")
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 30, "height": 20},
            {"id": 2, "file_name": "b.png", "width": 16, "height": 16},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 5]},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 30, 20], "area": 50.0},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [4.5, 4, 2, 8]},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }


def _write(root: Path, data: Any) -> Path:
    path = root / "ann.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiny_set_loads_with_contiguous_labels(tmp_path: Path) -> None:
    pool = load_coco_detection(_write(tmp_path, _tiny(tmp_path)), tmp_path / "img")
    assert isinstance(pool, CocoDetectionPool) and pool.ids == ["a.png", "b.png"]
    assert pool.classes == ["cat", "dog"] and pool.label_to_cat_id == [3, 7]
    assert pool.cat_id_to_label == {3: 0, 7: 1}
    target = pool.target("a.png")
    assert target["labels"].tolist() == [1, 0]
    assert target["boxes"].tolist() == [[2, 3, 12, 8], [0, 0, 30, 20]]
    assert pool.coco.anns[1]["area"] == 50.0 and pool.coco.anns[2]["area"] == 50.0
    assert pool.coco.anns[1]["iscrowd"] == 0  # filled in memory for COCOeval
    assert category_counts(pool) == {"cat": 1, "dog": 2}


def _drop(key: str) -> Callable[[dict[str, Any]], Any]:
    def mutate(d: dict[str, Any]) -> Any:
        del d[key]
        return d

    return mutate


def _set(section: str, index: int, **values: Any) -> Callable[[dict[str, Any]], Any]:
    def mutate(d: dict[str, Any]) -> Any:
        d[section][index].update(values)
        return d

    return mutate


def _append(section: str, entry: dict[str, Any]) -> Callable[[dict[str, Any]], Any]:
    def mutate(d: dict[str, Any]) -> Any:
        d[section].append(entry)
        return d

    return mutate


def _remove_file(name: str) -> Callable[[dict[str, Any]], Any]:
    def mutate(d: dict[str, Any]) -> Any:
        d["_remove"] = name
        return d

    return mutate


ERROR_CASES = {
    "malformed_json": (lambda d: '{"images": [', r"ann\.json is not valid json"),
    "not_an_object": (lambda d: "[1, 2]", r"must hold a COCO json object"),
    "missing_images_key": (_drop("images"), r"missing the required key\(s\) \['images'\]"),
    "image_entry_missing_key": (
        lambda d: (d["images"][1].pop("height"), d)[1],
        r"images\[1\] \(id 2\) lacks the required key\(s\) \['height'\]",
    ),
    "annotation_bbox_wrong_type": (
        _set("annotations", 0, bbox=[1, 2, 3]),
        r"annotations\[0\] \(id 1\) has a wrong type for bbox=\[1, 2, 3\]",
    ),
    "missing_image_file": (
        _remove_file("b.png"),
        r"images\[1\] \(id 2\) \(file_name 'b\.png'\): no image file at .*b\.png",
    ),
    "unknown_category_id": (
        _set("annotations", 2, category_id=9),
        r"annotations\[2\] \(id 3\) has category_id 9, which is not in categories \(ids \[3, 7\]\)",
    ),
    "box_outside_image": (
        _set("annotations", 0, bbox=[25, 3, 10, 5]),
        r"annotations\[0\] \(id 1\) has bbox \[25, 3, 10, 5\] .*outside its image 1 \('a\.png'",
    ),
    "box_negative_origin": (
        _set("annotations", 1, bbox=[-3, 0, 5, 5]),
        r"annotations\[1\] \(id 2\) has bbox \[-3, 0, 5, 5\] .*outside its image 1",
    ),
    "box_nan": (
        _set("annotations", 0, bbox=[1, 2, float("nan"), 4]),
        r"annotations\[0\] \(id 1\) has bbox \[1, 2, nan, 4\] with a NaN or infinite value",
    ),
    "box_empty_after_clipping": (
        _set("annotations", 0, bbox=[-1, 2, 0.5, 4]),
        r"annotations\[0\] \(id 1\) has bbox \[-1, 2, 0.5, 4\] .*outside its image 1",
    ),
    "box_zero_width": (
        _set("annotations", 2, bbox=[4, 4, 0, 8]),
        r"annotations\[2\] \(id 3\) has bbox \[4, 4, 0, 8\] with non-positive width or height",
    ),
    "duplicate_image_id": (
        _set("images", 1, id=1),
        r"images\[1\] \(id 1\) \(file_name 'b\.png'\) repeats the image id of images\[0\]",
    ),
    "annotation_without_image": (
        _set("annotations", 1, image_id=42),
        r"annotations\[1\] \(id 2\) points at image_id 42, which is not in images",
    ),
    "duplicate_file_name": (
        _append("images", {"id": 3, "file_name": "a.png", "width": 30, "height": 20}),
        r"images\[2\] \(id 3\) repeats the file_name 'a\.png' of images\[0\]",
    ),
    "duplicate_annotation_id": (
        _set("annotations", 2, id=1),
        r"annotations\[2\] \(id 1\) repeats the annotation id of annotations\[0\]",
    ),
    "duplicate_category_id": (
        _append("categories", {"id": 7, "name": "wolf"}),
        r"categories\[2\] \(id 7\) repeats the category id of categories\[0\]",
    ),
    "no_categories": (lambda d: {**d, "categories": []}, "has no categories; add one entry"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_error_names_the_entry_and_writes_nothing(tmp_path: Path, case: str) -> None:
    mutate, message = ERROR_CASES[case]
    data = mutate(_tiny(tmp_path))
    if isinstance(data, dict) and "_remove" in data:
        (tmp_path / "img" / data.pop("_remove")).unlink()
    ann_file = _write(tmp_path, data)
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=message):
        load_coco_detection(ann_file, tmp_path / "img")
    assert _files(tmp_path) == before


def test_whole_float_sizes_segmentations_and_crowds_are_valid_coco(tmp_path: Path) -> None:
    data = _tiny(tmp_path)
    data["images"][0]["width"] = 30.0  # some tools write floats
    data["annotations"][0]["segmentation"] = [[1, 2, 5, 2, 5, 6]]
    data["annotations"][1]["iscrowd"] = 1
    pool = load_coco_detection(_write(tmp_path, data), tmp_path / "img")
    labels = sum(len(pool.target(i)["labels"]) for i in pool.ids)
    assert labels == len(data["annotations"]) - 1, "crowd boxes stay out of the targets"


def test_all_problems_are_listed_at_once(tmp_path: Path) -> None:
    data = _tiny(tmp_path)
    data["annotations"][0]["category_id"] = 9
    data["annotations"][2]["image_id"] = 5
    with pytest.raises(ValueError, match=r"2 problem\(s\)") as err:
        load_coco_detection(_write(tmp_path, data), tmp_path / "img")
    assert "annotations[0] (id 1)" in str(err.value) and "annotations[2] (id 3)" in str(err.value)


def test_box_within_one_pixel_is_accepted_and_clipped(tmp_path: Path) -> None:
    data = _tiny(tmp_path)
    data["annotations"][0]["bbox"] = [-0.5, 3, 30.8, 5]
    pool = load_coco_detection(_write(tmp_path, data), tmp_path / "img")
    assert pool.target("a.png")["boxes"][0].tolist() == [0.0, 3.0, 30.0, 8.0]


def test_missing_paths_and_size_mismatch(tmp_path: Path) -> None:
    data = _tiny(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_coco_detection(tmp_path / "nope.json", tmp_path / "img")
    with pytest.raises(FileNotFoundError, match="image folder"):
        load_coco_detection(_write(tmp_path, data), tmp_path / "nowhere")
    data["images"][1]["width"] = 17
    pool = load_coco_detection(_write(tmp_path, data), tmp_path / "img")
    with pytest.raises(ValueError, match=r"b\.png is 16x16 .* says 17x16"):
        next(pool.batches(["b.png"], 1))


def test_round_trips_the_synthetic_set(tmp_path: Path) -> None:
    files = make_synthetic_detection(
        tmp_path / "set", num_images=9, image_size=((40, 72), (40, 72)), seed=1
    )
    raw = json.loads(files.ann_file.read_text())
    pool = build(
        DATASETS,
        dict(type="coco_detection", ann_file=str(files.ann_file), img_dir=str(files.img_dir)),
    )
    assert isinstance(pool, CocoDetectionPool)
    assert pool.ids == [img["file_name"] for img in raw["images"]]
    assert pool.classes == [c["name"] for c in raw["categories"]]
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in raw["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    seen_sizes = set()
    for batch in pool.batches(pool.ids, batch_size=4):
        assert isinstance(batch.inputs, list) and len(batch) <= 4
        for image, item, sample in zip(
            batch.inputs, batch.ids, batch.data_samples or [], strict=True
        ):
            info = next(i for i in raw["images"] if i["file_name"] == item)
            assert image.dtype == torch.float32 and image.shape == (
                3,
                info["height"],
                info["width"],
            )
            assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
            assert sample["image_id"] == info["id"]
            assert sample["img_shape"] == (info["height"], info["width"])
            anns = by_image.get(info["id"], [])
            expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
            assert sample["boxes"].tolist() == expected
            assert sample["labels"].tolist() == [a["category_id"] - 1 for a in anns]
            seen_sizes.add(tuple(image.shape))
    assert len(seen_sizes) > 1  # differently sized images in the batches
    labels = torch.cat([pool.target(i)["labels"] for i in pool.ids])
    assert labels.min() >= 0 and labels.max() < len(pool.classes)


def test_samples_are_torchvision_dicts_and_without_labels_strips_them(tmp_path: Path) -> None:
    pool = load_coco_detection(_write(tmp_path, _tiny(tmp_path)), tmp_path / "img")
    batch = next(pool.batches(["b.png", "a.png"], batch_size=2))
    assert isinstance(batch, Batch) and batch.ids == ["b.png", "a.png"]
    assert batch.image_sizes() == [(16, 16), (20, 30)]
    assert batch.targets is None and batch.data_samples is not None
    sample = batch.data_samples[1]
    assert sample["boxes"].dtype == torch.float32 and sample["boxes"].shape == (2, 4)
    assert sample["labels"].dtype == torch.long and sample["labels"].shape == (2,)
    assert sample["img_path"] == str(tmp_path / "img" / "a.png")
    blind = batch.without_labels()
    assert blind.data_samples is not None
    for stripped, full in zip(blind.data_samples, batch.data_samples, strict=True):
        assert "boxes" not in stripped and "labels" not in stripped
        assert stripped["image_id"] == full["image_id"]
        assert stripped["img_shape"] == full["img_shape"]
    assert torch.equal(blind.inputs[0], batch.inputs[0])


def test_subset_and_unlabeled_set(tmp_path: Path) -> None:
    data = _tiny(tmp_path)
    pool = load_coco_detection(_write(tmp_path, data), tmp_path / "img")
    sub = pool.subset(["b.png"])
    assert sub.ids == ["b.png"] and sub.image_ids() == [2] and sub.coco is pool.coco
    with pytest.raises(KeyError, match="not images"):
        pool.subset(["c.png"])
    del data["annotations"]
    unlabeled = load_coco_detection(_write(tmp_path, data), tmp_path / "img")
    assert unlabeled.target("a.png")["boxes"].shape == (0, 4)
