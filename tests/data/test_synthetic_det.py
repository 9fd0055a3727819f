from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from taskal.data import make_synthetic_detection
from taskal.registry import DATASETS, build


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_writes_pngs_and_a_json_pycocotools_loads(tmp_path: Path) -> None:
    files = make_synthetic_detection(tmp_path / "set", num_images=12, image_size=(40, 56))
    assert files.ann_file == tmp_path / "set" / "annotations.json"
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(files.ann_file))
    assert len(coco.imgs) == 12 and len(coco.anns) > 12
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [
        "circle",
        "square",
        "triangle",
        "diamond",
        "star",
    ]
    for img in coco.imgs.values():
        with Image.open(files.img_dir / img["file_name"]) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == (img["width"], img["height"]) == (56, 40)
    for ann in coco.anns.values():
        x, y, w, h = ann["bbox"]
        img = coco.imgs[ann["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= img["width"] and y + h <= img["height"]
        assert ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h
        assert ann["category_id"] in coco.cats


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    a = make_synthetic_detection(tmp_path / "a", num_images=6, seed=3)
    b = make_synthetic_detection(tmp_path / "b", num_images=6, seed=3)
    c = make_synthetic_detection(tmp_path / "c", num_images=6, seed=4)
    assert a.ann_file.read_bytes() == b.ann_file.read_bytes()
    for png in sorted(a.img_dir.iterdir()):
        assert png.read_bytes() == (b.img_dir / png.name).read_bytes()
    assert _json(a.ann_file)["annotations"] != _json(c.ann_file)["annotations"]
    assert (a.img_dir / "000000.png").read_bytes() != (c.img_dir / "000000.png").read_bytes()


def test_class_imbalance_shows_in_the_counts(tmp_path: Path) -> None:
    files = make_synthetic_detection(
        tmp_path / "set", num_images=60, imbalance=0.5, objects_per_image=(2, 4)
    )
    counts = Counter(a["category_id"] for a in _json(files.ann_file)["annotations"])
    assert counts[1] > counts[2] > counts[3] and counts[1] >= 4 * max(counts[4], 1)
    balanced = make_synthetic_detection(
        tmp_path / "flat", num_images=60, classes=("circle", "star"), class_weights=(1, 0)
    )
    assert {a["category_id"] for a in _json(balanced.ann_file)["annotations"]} == {1}


def test_scale_variety_and_occlusion_rule(tmp_path: Path) -> None:
    files = make_synthetic_detection(
        tmp_path / "set", num_images=40, image_size=(64, 64), objects_per_image=(3, 6)
    )
    anns = _json(files.ann_file)["annotations"]
    sides = [max(a["bbox"][2:]) for a in anns]
    assert min(sides) <= 10 and max(sides) >= 30
    assert any(a["occluded"] > 0 for a in anns)
    assert all(a["occluded"] <= 0.8 for a in anns)
    strict = make_synthetic_detection(
        tmp_path / "strict",
        num_images=40,
        image_size=(64, 64),
        objects_per_image=(3, 6),
        max_occlusion=0.0,
    )
    strict_anns = _json(strict.ann_file)["annotations"]
    assert all(a["occluded"] == 0 for a in strict_anns) and len(strict_anns) < len(anns)


def test_image_size_range(tmp_path: Path) -> None:
    files = make_synthetic_detection(tmp_path / "set", num_images=10, image_size=((32, 80), 48))
    images = _json(files.ann_file)["images"]
    assert all(32 <= i["height"] <= 80 and i["width"] == 48 for i in images)
    assert len({i["height"] for i in images}) > 1
    with Image.open(files.img_dir / images[0]["file_name"]) as im:
        assert im.size == (images[0]["width"], images[0]["height"])


def test_refuses_to_overwrite_a_non_empty_root(tmp_path: Path) -> None:
    root = tmp_path / "set"
    make_synthetic_detection(root, num_images=4, seed=0)
    (root / "notes.txt").write_text("mine")
    before = (root / "annotations.json").read_bytes()
    with pytest.raises(FileExistsError, match=r"not empty.*overwrite=True"):
        make_synthetic_detection(root, num_images=2, seed=1)
    assert (root / "annotations.json").read_bytes() == before
    assert len(list((root / "images").iterdir())) == 4
    make_synthetic_detection(root, num_images=2, seed=1, overwrite=True)
    assert sorted(p.name for p in (root / "images").iterdir()) == ["000000.png", "000001.png"]
    assert (root / "notes.txt").read_text() == "mine"


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hexagon"):
        make_synthetic_detection(tmp_path / "a", classes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="imbalance"):
        make_synthetic_detection(tmp_path / "b", imbalance=0.0)
    with pytest.raises(ValueError, match="image_size height"):
        make_synthetic_detection(tmp_path / "c", image_size=((64, 32), 64))
    with pytest.raises(ValueError, match=r"image_size must be \(H, W\)"):
        make_synthetic_detection(tmp_path / "d", image_size=(64, 64, 3))
    assert not any(tmp_path.iterdir())


def test_registered_builder_returns_the_paths(tmp_path: Path) -> None:
    assert DATASETS.get("synthetic_detection") is make_synthetic_detection
    files = build(DATASETS, dict(type="synthetic_detection", root=str(tmp_path), num_images=2))
    assert files.ann_file.is_file() and len(list(files.img_dir.iterdir())) == 2
    assert np.asarray(Image.open(files.img_dir / "000001.png")).shape == (64, 64, 3)


def test_ensure_reuses_the_same_set_and_refuses_another(tmp_path: Path) -> None:
    from taskal.data import ensure_synthetic_detection

    root = tmp_path / "set"
    first = ensure_synthetic_detection(root, num_images=3, image_size=(32, 32), seed=4)
    stamp = first.ann_file.stat().st_mtime_ns
    again = ensure_synthetic_detection(root, num_images=3, image_size=(32, 32), seed=4)
    assert again == first and first.ann_file.stat().st_mtime_ns == stamp  # not rewritten
    with pytest.raises(ValueError, match="made with other arguments"):
        ensure_synthetic_detection(root, num_images=4, image_size=(32, 32), seed=4)
    assert first.ann_file.stat().st_mtime_ns == stamp
    with pytest.raises(TypeError, match="unknown synthetic detection arguments"):
        ensure_synthetic_detection(tmp_path / "other", sizes=3)
