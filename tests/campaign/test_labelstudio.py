"""Label Studio files: brush RLE, labeling config, tasks, and reading the export back."""

from __future__ import annotations

import copy
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from taskal.campaign.labelstudio import (
    IGNORE_INDEX,
    REGION_LABEL,
    QueryView,
    decode_rle,
    encode_rle,
    labeling_config,
    mask_to_rle,
    read_export,
    rle_length,
    rle_to_mask,
    tasks,
    write_tasks,
)

CLASSES = ["cat", "dog", "bird & <fish>"]


# --------------------------------------------------------------------------- helpers


def _reference_decode(rle: list[int]) -> list[int]:
    """A deliberately naive decoder written straight from the format's definition."""
    bits = "".join(f"{b:08b}" for b in rle)
    pos = 0

    def take(n: int) -> int:
        nonlocal pos
        assert pos + n <= len(bits), "stream too short"
        out = int(bits[pos : pos + n], 2)
        pos += n
        return out

    num = take(32)
    word = take(5) + 1
    sizes = [take(4) + 1 for _ in range(4)]
    out: list[int] = []
    while len(out) < num:
        flag = take(1)
        count = take(sizes[take(2)]) + 1
        if flag:
            out += [take(word)] * count
        else:
            out += [take(word) for _ in range(count)]
    assert len(out) == num
    assert len(bits) - pos < 8, "more than byte padding left over"
    assert set(bits[pos:]) <= {"0"}, "padding must be zero bits"
    return out


def _accept(ls_tasks: list[dict[str, Any]], **extra: Any) -> list[dict[str, Any]]:
    """What LS exports after an annotator accepts every pre-annotation unchanged."""
    out = []
    for i, t in enumerate(ls_tasks):
        result = copy.deepcopy(t["predictions"][0]["result"]) if t["predictions"] else []
        for r in result:
            r.pop("score", None)
            r["origin"] = "prediction"
        annotation = {
            "id": 100 + i,
            "result": result,
            "was_cancelled": False,
            "ground_truth": False,
            "created_at": "2024-05-01T10:00:00.000000Z",
            "updated_at": "2024-05-01T10:00:00.000000Z",
            "completed_by": 1,
            **extra,
        }
        out.append({"id": 1 + i, **copy.deepcopy(t), "annotations": [annotation]})
    return out


def _dump(tmp_path: Path, export: Any) -> Path:
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    return path


def _view(i: int, **kw: Any) -> QueryView:
    base: dict[str, Any] = {
        "item": f"pool/img_{i:03d}.png",
        "image": f"/data/local-files/?d=pool/img_{i:03d}.png",
        "width": 13,
        "height": 7,
        "score": 1.0 - 0.1 * i,
        "rank": i,
    }
    base.update(kw)
    return QueryView(**base)


def _brush(cls: str, mask: np.ndarray, from_name: str = "label") -> dict[str, Any]:
    h, w = mask.shape
    return {
        "type": "brushlabels",
        "from_name": from_name,
        "to_name": "image",
        "original_width": w,
        "original_height": h,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [cls]},
    }


def _export(item: str, results: list[dict[str, Any]], **data: Any) -> dict[str, Any]:
    return {
        "id": 7,
        "data": {"item": item, "image": item, "width": 13, "height": 7, "region": None, **data},
        "annotations": [{"id": 1, "result": results, "was_cancelled": False}],
    }


# --------------------------------------------------------------------------- brush RLE


def test_rle_hand_worked_run_block() -> None:
    # One painted pixel = RGBA 255,255,255,255. Header: num=4 (32 bits), word size 8 -> 00111,
    # count widths 3,4,8,16 -> 0010 0011 0111 1111; one run block: 1, index 00, count-1 = 011,
    # value 11111111; then 5 zero bits of padding:
    # 00111001 00011011 11111100 01111111 11100000 = 57, 27, 252, 127, 224.
    rle = [0, 0, 0, 4, 57, 27, 252, 127, 224]
    assert encode_rle([255, 255, 255, 255]) == rle
    assert decode_rle(rle).tolist() == [255] * 4
    assert rle_to_mask(rle, 1, 1).tolist() == [[True]]


def test_rle_hand_worked_literal_block() -> None:
    # Values 1, 2, 3 (no repeats): num=3, the same 21 header bits as above, then one literal
    # block: 0, index 00, count-1 = 010, and the three 8-bit values; 5 zero bits of padding.
    # 00111001 00011011 11111|000 010|00000 001|00000 010|00000 011|00000
    rle = [0, 0, 0, 3, 57, 27, 0b11111000, 0b01000000, 0b00100000, 0b01000000, 0b01100000]
    assert decode_rle(rle).tolist() == [1, 2, 3]
    assert encode_rle([1, 2, 3]) == rle


def test_rle_decodes_other_header_parameters() -> None:
    # word size 4 (00011), count widths 1,2,3,4 (0000 0001 0010 0011); num = 5.
    # Run block: 1, index 01 (2 bits), count-1 = 10 -> 3 copies of 1001 (=9).
    # Literal block: 0, index 00 (1 bit), count-1 = 1 -> two values 0110 (6), 1111 (15).
    bits = f"{5:032b}" + "00011" + "0000000100100011" + "1" + "01" + "10" + "1001"
    bits += "0" + "00" + "1" + "0110" + "1111"
    bits += "0" * (-len(bits) % 8)
    rle = [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]
    out = decode_rle(rle)
    assert out.tolist() == [9, 9, 9, 6, 15]
    assert encode_rle([9, 9, 9, 6, 15], word_size=4, rle_sizes=[1, 2, 3, 4]) == rle


@pytest.mark.parametrize("shape", [(7, 13), (1, 1), (5, 3), (16, 16), (31, 17)])
@pytest.mark.parametrize("kind", ["random", "zeros", "ones", "blob"])
def test_rle_mask_round_trip(shape: tuple[int, int], kind: str) -> None:
    rng = np.random.default_rng(hash((shape, kind)) % 2**32)
    h, w = shape
    if kind == "random":
        mask = rng.random(shape) < 0.5
    elif kind == "zeros":
        mask = np.zeros(shape, bool)
    elif kind == "ones":
        mask = np.ones(shape, bool)
    else:
        mask = np.zeros(shape, bool)
        mask[h // 3 : h // 3 + max(1, h // 2), w // 4 : w // 4 + max(1, w // 2)] = True
    rle = mask_to_rle(mask)
    assert rle_length(rle) == h * w * 4
    assert np.array_equal(rle_to_mask(rle, h, w), mask)
    flat = np.repeat(np.where(mask.ravel(), 255, 0), 4)
    assert _reference_decode(rle) == flat.tolist()


def test_rle_random_values_and_long_stretches() -> None:
    rng = np.random.default_rng(0)
    runs = np.repeat(rng.integers(0, 256, 300), rng.integers(1, 40, 300))
    noise = rng.integers(0, 256, 500)
    for values in (runs, noise, np.concatenate([runs, noise, runs])):
        rle = encode_rle(values)
        assert decode_rle(rle).tolist() == values.tolist()
        assert _reference_decode(rle) == values.tolist()
    # Longer than one block can hold (2**16 values): a run and a literal stretch are split.
    long_run = np.full(2**16 + 5, 255, np.uint8)
    alternating = np.arange(2**16 + 7) % 2
    for values in (long_run, alternating):
        rle = encode_rle(values)
        assert np.array_equal(decode_rle(rle), values)
    # The all-255 run is a handful of bytes; an empty array is just the header.
    assert len(encode_rle(long_run)) < 20
    assert decode_rle(encode_rle([])).size == 0


def test_rle_alpha_threshold_and_errors() -> None:
    rgba = np.array([[0, 0, 0, 128], [255, 255, 255, 127], [9, 9, 9, 255]], np.uint8)
    assert rle_to_mask(encode_rle(rgba.ravel()), 1, 3).tolist() == [[True, False, True]]
    rle = mask_to_rle(np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="holds 24 values but a 3x3 RGBA image needs 36"):
        rle_to_mask(rle, 3, 3)
    with pytest.raises(ValueError, match="ends before"):
        decode_rle(encode_rle(np.arange(20))[:-3])
    with pytest.raises(ValueError, match="values must lie"):
        encode_rle([256])


# --------------------------------------------------------------------------- config and tasks


@pytest.mark.parametrize(
    ("task", "control", "entry"),
    [
        ("cls", "Choices", "Choice"),
        ("det", "RectangleLabels", "Label"),
        ("seg", "BrushLabels", "Label"),
    ],
)
def test_labeling_config_is_xml_naming_every_class(task: str, control: str, entry: str) -> None:
    root = ET.fromstring(labeling_config(task, CLASSES))
    assert root.tag == "View"
    image = root.find("Image")
    assert image is not None and image.get("name") == "image" and image.get("value") == "$image"
    label = root.find(f"{control}[@name='label']")
    assert label is not None and label.get("toName") == "image"
    assert [e.get("value") for e in label.findall(entry)] == CLASSES
    region = root.find(f"{control}[@name='region']")
    if task == "cls":
        assert region is None
    else:
        assert region is not None
        assert [e.get("value") for e in region.findall("Label")] == [REGION_LABEL]


def test_labeling_config_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        labeling_config("pose", CLASSES)
    with pytest.raises(ValueError, match="unique"):
        labeling_config("cls", ["a", "a"])


def test_tasks_carry_sorting_fields_and_are_json(tmp_path: Path) -> None:
    views = [
        _view(0, probs=[0.1, 0.7, 0.2]),
        _view(1, region=3, region_box=(1.0, 2.0, 5.0, 6.0)),
    ]
    ls = tasks("cls", CLASSES, views, "round-2")
    assert json.loads(json.dumps(ls)) == ls
    for t, v in zip(ls, views, strict=True):
        d = t["data"]
        assert {"image", "item", "score", "rank", "region"} <= set(d)
        assert (d["item"], d["image"], d["score"], d["rank"]) == (v.item, v.image, v.score, v.rank)
    assert ls[1]["data"]["region"] == 3 and ls[1]["data"]["region_box"] == [1.0, 2.0, 5.0, 6.0]
    (pred,) = ls[0]["predictions"]
    assert pred["model_version"] == "round-2" and pred["score"] == views[0].score
    assert pred["result"][0]["value"] == {"choices": ["dog"]}
    assert ls[1]["predictions"] == []

    out = write_tasks(tmp_path / "round-2.json", "cls", CLASSES, views, "round-2")
    assert json.loads(out.read_text()) == ls
    assert [p.name for p in tmp_path.iterdir()] == ["round-2.json"]  # no temp file left


def test_tasks_reject_predictions_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match=r"img_000.*probs has 2 entries for 3 classes"):
        tasks("cls", CLASSES, [_view(0, probs=[0.5, 0.5])], "m")
    with pytest.raises(ValueError, match=r"mask shape \(3, 3\)"):
        tasks("seg", CLASSES, [_view(0, mask=np.zeros((3, 3), np.uint8))], "m")
    with pytest.raises(ValueError, match="box_labels must lie"):
        tasks("det", CLASSES, [_view(0, boxes=np.zeros((1, 4)), box_labels=[3])], "m")


# --------------------------------------------------------------------------- round trips


def test_round_trip_cls(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    views = [_view(i, probs=rng.dirichlet(np.ones(3)).tolist()) for i in range(6)]
    path = _dump(tmp_path, _accept(tasks("cls", CLASSES, views, "m")))
    labels = read_export(path, "cls", CLASSES)
    assert labels == {v.item: int(np.argmax(v.probs)) for v in views}
    assert all(type(x) is int for x in labels.values())


def test_round_trip_det(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    views = []
    for i in range(5):
        n = int(rng.integers(0, 5))
        w, h = 640 + i, 427
        xy = rng.uniform(0, 1, (n, 2)) * [w, h]
        wh = rng.uniform(0, 1, (n, 2)) * ([w, h] - xy)
        boxes = np.concatenate([xy, xy + wh], axis=1)
        if i == 0:
            boxes = np.array([[0.0, 0.0, w, h], [0.5, 1.25, 33.3, 99.9]])  # touches every edge
        views.append(
            _view(
                i,
                width=w,
                height=h,
                boxes=boxes,
                box_labels=rng.integers(0, 3, len(boxes)).tolist(),
                box_scores=rng.random(len(boxes)).tolist(),
                region=i if i % 2 else None,
                region_box=(10.0, 20.0, 30.0, 40.0) if i % 2 else None,
            )
        )
    ls = tasks("det", CLASSES, views, "m")
    marker = [r for r in ls[1]["predictions"][0]["result"] if r["from_name"] == "region"]
    assert marker and marker[0]["value"]["rectanglelabels"] == [REGION_LABEL]
    assert all(
        0 <= r["value"]["x"] <= 100 for t in ls for p in t["predictions"] for r in p["result"]
    )
    labels = read_export(_dump(tmp_path, _accept(ls)), "det", CLASSES)
    assert set(labels) == {v.item for v in views}
    for v in views:
        got = labels[v.item]
        assert isinstance(got, dict)
        assert got["boxes"].shape == (len(v.boxes), 4) and got["boxes"].dtype == np.float64
        np.testing.assert_allclose(got["boxes"], v.boxes, rtol=0, atol=1e-6)
        assert got["labels"].tolist() == list(v.box_labels)


def test_round_trip_seg(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    views = []
    for i, (h, w) in enumerate([(7, 13), (20, 9), (1, 1), (16, 16)]):
        mask = rng.integers(0, 3, (h, w)).astype(np.uint8)
        mask[rng.random((h, w)) < 0.2] = IGNORE_INDEX  # no prediction there
        region = rng.random((h, w)) < 0.5 if i == 1 else None
        views.append(
            _view(i, width=w, height=h, mask=mask, region=1 if i == 1 else None, region_mask=region)
        )
    ls = tasks("seg", CLASSES, views, "m")
    kinds = [r["from_name"] for r in ls[1]["predictions"][0]["result"]]
    assert kinds.count("region") == 1
    assert ls[1]["data"]["region_box"] is not None
    labels = read_export(_dump(tmp_path, _accept(ls)), "seg", CLASSES)
    assert set(labels) == {v.item for v in views}
    for v in views:
        got = labels[v.item]
        assert isinstance(got, np.ndarray) and got.dtype == np.uint8
        assert np.array_equal(got, v.mask)


def test_skips_unlabelled_and_takes_latest_annotation(tmp_path: Path) -> None:
    views = [_view(i, probs=[0.8, 0.1, 0.1]) for i in range(4)]
    export = _accept(tasks("cls", CLASSES, views, "m"))
    export[0]["annotations"] = []
    export[1]["annotations"][0]["was_cancelled"] = True
    newer = {
        "id": 1,  # a lower id, but updated later: time decides
        "result": [
            {
                "type": "choices",
                "from_name": "label",
                "to_name": "image",
                "value": {"choices": ["bird & <fish>"]},
            }
        ],
        "was_cancelled": False,
        "updated_at": "2024-06-01T00:00:00Z",
    }
    cancelled = {**newer, "id": 999, "updated_at": "2025-01-01T00:00:00Z", "was_cancelled": True}
    export[2]["annotations"] += [newer, cancelled]
    labels = read_export(_dump(tmp_path, export), "cls", CLASSES)
    assert labels == {views[2].item: 2, views[3].item: 0}


def test_regions_of_one_item_merge(tmp_path: Path) -> None:
    top, bottom = np.zeros((7, 13), bool), np.zeros((7, 13), bool)
    top[:3] = True
    bottom[4:] = True
    seg = [
        _export("a.png", [_brush("cat", top)], region=0),
        _export("a.png", [_brush("dog", bottom), _brush("cat", top)], region=1),  # agrees on top
        _export("a.png", [_brush("cat", top)], region=0),  # a repeat of region 0
    ]
    labels = read_export(_dump(tmp_path, seg), "seg", CLASSES)
    want = np.full((7, 13), IGNORE_INDEX, np.uint8)
    want[:3], want[4:] = 0, 1
    assert np.array_equal(labels["a.png"], want)

    def rect(x: float, cls: str) -> dict[str, Any]:
        value = {"x": x, "y": 0, "width": 10, "height": 10, "rotation": 0, "rectanglelabels": [cls]}
        return {"type": "rectanglelabels", "from_name": "label", "value": value}

    det = [
        _export("b.png", [rect(0, "cat")], region=0),
        _export("b.png", [rect(0, "cat"), rect(50, "dog")], region=1),
    ]
    got = read_export(_dump(tmp_path, det), "det", CLASSES)["b.png"]
    assert isinstance(got, dict)
    assert got["labels"].tolist() == [0, 1]
    np.testing.assert_allclose(got["boxes"], [[0, 0, 1.3, 0.7], [6.5, 0, 7.8, 0.7]], atol=1e-9)


# --------------------------------------------------------------------------- errors


def _raises(tmp_path: Path, export: Any, task: str, *patterns: str) -> None:
    path = _dump(tmp_path, export)
    with pytest.raises(ValueError) as info:
        read_export(path, task, CLASSES)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)


def test_error_export_not_a_list(tmp_path: Path) -> None:
    _raises(tmp_path, {"tasks": []}, "cls", "not a list of tasks", "'JSON' format")


def test_error_task_without_item(tmp_path: Path) -> None:
    export = _accept(tasks("cls", CLASSES, [_view(0, probs=[1, 0, 0])], "m"))
    del export[0]["data"]["item"]
    _raises(tmp_path, export, "cls", r"task 1: has no data\.item", "JSON-MIN")


def test_error_unknown_class(tmp_path: Path) -> None:
    choice = {"type": "choices", "from_name": "label", "value": {"choices": ["horse"]}}
    _raises(tmp_path, [_export("x.png", [choice])], "cls", r"item 'x.png'", "unknown class 'horse'")
    rect = {
        "type": "rectanglelabels",
        "from_name": "label",
        "value": {"x": 1, "y": 1, "width": 1, "height": 1, "rectanglelabels": ["horse"]},
    }
    _raises(tmp_path, [_export("x.png", [rect])], "det", "a rectangle uses unknown class 'horse'")
    brush = _brush("horse", np.ones((7, 13), bool))
    _raises(tmp_path, [_export("x.png", [brush])], "seg", "brush region uses unknown class")


def test_error_rectangle_outside_image(tmp_path: Path) -> None:
    value = {"x": 95, "y": 10, "width": 10, "height": 10, "rotation": 0, "rectanglelabels": ["dog"]}
    rect = {"type": "rectanglelabels", "from_name": "label", "value": value}
    _raises(tmp_path, [_export("y.png", [rect])], "det", r"item 'y.png'", "outside the image")
    # The same rectangle drawn with the region marker is not a label: no error, no box.
    marker = {**rect, "from_name": "region"}
    got = read_export(_dump(tmp_path, [_export("y.png", [marker])]), "det", CLASSES)["y.png"]
    assert isinstance(got, dict) and got["boxes"].shape == (0, 4)


def test_error_brush_size(tmp_path: Path) -> None:
    brush = _brush("cat", np.ones((7, 13), bool))
    brush["value"]["rle"] = mask_to_rle(np.ones((7, 12), bool))
    _raises(
        tmp_path, [_export("z.png", [brush])], "seg", r"item 'z.png'", "holds 336 values", "364"
    )


def test_error_overlapping_brushes(tmp_path: Path) -> None:
    a, b = np.zeros((7, 13), bool), np.zeros((7, 13), bool)
    a[2:5, 3:6] = True
    b[4:6, 5:9] = True  # overlaps a at rows 4, cols 5
    export = [_export("o.png", [_brush("cat", a), _brush("dog", b)])]
    _raises(tmp_path, export, "seg", r"item 'o.png'", r"pixel \(row 4, col 5\)", "'cat' and 'dog'")
    # Same clash split across two region tasks of the item.
    export = [
        _export("o.png", [_brush("cat", a)], region=0),
        _export("o.png", [_brush("dog", b)], region=1),
    ]
    _raises(
        tmp_path, export, "seg", r"item 'o.png'", "this task and another one", "'cat' and 'dog'"
    )
    # The same class twice is fine.
    got = read_export(
        _dump(tmp_path, [_export("o.png", [_brush("cat", a), _brush("cat", b)])]), "seg", CLASSES
    )
    assert np.array_equal(got["o.png"] == 0, a | b)


def test_error_duplicate_items_conflict(tmp_path: Path) -> None:
    def choice(name: str) -> dict[str, Any]:
        return {"type": "choices", "from_name": "label", "value": {"choices": [name]}}

    agree = [_export("d.png", [choice("dog")]), _export("d.png", [choice("dog")])]
    assert read_export(_dump(tmp_path, agree), "cls", CLASSES) == {"d.png": 1}
    clash = [_export("d.png", [choice("dog")]), _export("d.png", [choice("cat")])]
    _raises(tmp_path, clash, "cls", r"item 'd.png'", "conflicts", "task 7")
    rect = {
        "type": "rectanglelabels",
        "from_name": "label",
        "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["cat"]},
    }
    moved = copy.deepcopy(rect)
    moved["value"]["x"] = 2
    _raises(tmp_path, [_export("d.png", [rect]), _export("d.png", [moved])], "det", "conflicts")
