"""COCO export of active-learning queries: content, costs, errors, atomic writes, no leaks."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pycocotools.coco import COCO

import taskal
from taskal.data import CocoDetectionPool, load_coco_detection, make_synthetic_detection
from taskal.export import AnnotationCost, queries_to_coco, write_coco_queries
from taskal.queries import Query


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> CocoDetectionPool:
    root = tmp_path_factory.mktemp("shapes")
    files = make_synthetic_detection(root, num_images=6, image_size=(64, 64), seed=0)
    return load_coco_detection(files.ann_file, files.img_dir)


def _box_queries(pool: CocoDetectionPool) -> list[Query]:
    a, b = pool.ids[1], pool.ids[4]
    return [
        Query(a, 0, cost=1.0, score=0.9, box=(2.0, 3.0, 12.0, 23.0)),
        Query(b, 5, cost=1.0, score=0.95, box=(10.5, 10.5, 30.0, 40.0)),
        Query(a, 3, cost=1.0, score=0.4, box=(40.0, 0.0, 64.0, 8.0)),
    ]


# --- the cost model ---------------------------------------------------------------------


def test_cost_defaults_and_formulas() -> None:
    cost = AnnotationCost()
    assert (cost.per_image, cost.per_box_drawn, cost.per_box_verified) == (1.0, 1.0, 0.25)
    assert cost.image_query(3) == 4.0
    assert cost.image_query(0) == 1.0
    assert cost.box_query(4, new_image=True) == 2.0
    assert cost.box_query(4, new_image=False) == 1.0
    seconds = AnnotationCost(per_image=2.0, per_box_drawn=7.0, per_box_verified=1.6)
    assert seconds.image_query(2) == pytest.approx(16.0)
    assert seconds.box_query(2, new_image=True) == pytest.approx(5.2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"per_image": -1.0},
        {"per_box_drawn": math.nan},
        {"per_box_verified": math.inf},
        {"per_image": 0.0, "per_box_drawn": 0.0, "per_box_verified": 0.0},
    ],
)
def test_cost_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="annotation costs"):
        AnnotationCost(**kwargs)


@pytest.mark.parametrize("n", [-1, 1.5, True])
def test_cost_rejects_bad_counts(n: object) -> None:
    with pytest.raises(ValueError, match="whole number"):
        AnnotationCost().image_query(n)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="whole number"):
        AnnotationCost().box_query(n, new_image=True)  # type: ignore[arg-type]


# --- whole-image queries ----------------------------------------------------------------


def test_whole_image_queries(pool: CocoDetectionPool) -> None:
    queries = [
        Query(pool.ids[2], cost=3.0, score=0.2),
        Query(pool.ids[0], cost=2.0, score=0.7),
        Query(pool.ids[5], cost=1.5, score=math.nan),
    ]
    before = datetime.now(timezone.utc).replace(microsecond=0)
    out = queries_to_coco(queries, pool, round_index=3)
    assert set(out) == {"info", "images", "categories", "annotations"}
    assert out["annotations"] == []
    assert out["categories"] == pool.coco.dataset["categories"]
    info = out["info"]
    assert info["version"] == taskal.__version__ and info["al_round"] == 3
    created = datetime.fromisoformat(info["date_created"])
    assert created >= before and created.utcoffset() == timedelta(0)
    assert info["al_total_cost"] == 6.5
    names = [img["file_name"] for img in out["images"]]
    assert names == [pool.ids[0], pool.ids[2], pool.ids[5]]  # by score, NaN last
    assert [img["al_rank"] for img in out["images"]] == [1, 2, 3]
    for img in out["images"]:
        src = pool.coco.imgs[pool.image_id(img["file_name"])]
        assert {k: img[k] for k in ("id", "file_name", "width", "height")} == src
        assert img["al_task"] == "draw"
    assert [img["al_score"] for img in out["images"]] == [0.7, 0.2, None]
    assert [img["al_cost"] for img in out["images"]] == [2.0, 3.0, 1.5]


def test_random_picks_keep_query_order(pool: CocoDetectionPool) -> None:
    queries = [Query(pool.ids[i]) for i in (3, 1, 4)]
    out = queries_to_coco(queries, pool)
    assert [img["file_name"] for img in out["images"]] == [pool.ids[i] for i in (3, 1, 4)]
    assert out["info"]["al_round"] is None
    empty = queries_to_coco([], pool)
    assert empty["images"] == [] and empty["annotations"] == []


def test_whole_image_cost_model(pool: CocoDetectionPool) -> None:
    cost = AnnotationCost(per_image=2.0, per_box_drawn=1.0)
    a, b = pool.ids[0], pool.ids[1]
    queries = [Query(a, score=0.5), Query(b, score=0.4)]
    out = queries_to_coco(queries, pool, cost=cost, expected_boxes={a: 3, b: 0})
    assert [img["al_cost"] for img in out["images"]] == [5.0, 2.0]
    # the expected count defaults to the detections predicted on the image
    predicted = {(a, 0): 1, (a, 7): 2, (b, 2): 0}
    out = queries_to_coco(queries, pool, cost=cost, predictions=predicted)
    assert [img["al_cost"] for img in out["images"]] == [4.0, 3.0]
    with pytest.raises(ValueError, match=re.escape(repr(a)) + ".*expected_boxes"):
        queries_to_coco(queries, pool, cost=cost)


# --- box queries ------------------------------------------------------------------------


def test_box_queries(pool: CocoDetectionPool) -> None:
    a, b = pool.ids[1], pool.ids[4]
    out = queries_to_coco(_box_queries(pool), pool, predictions={(a, 0): 2, (b, 5): 0})
    assert [img["file_name"] for img in out["images"]] == [b, a]  # best score first
    assert all(img["al_task"] == "verify" for img in out["images"])
    assert [img["al_cost"] for img in out["images"]] == [1.0, 2.0]  # Query.cost summed
    assert [img["al_score"] for img in out["images"]] == [0.95, 0.9]
    anns = {
        (pool.coco.imgs[x["image_id"]]["file_name"], x["al_region"]): x for x in out["annotations"]
    }
    assert len({x["id"] for x in out["annotations"]}) == 3
    first = anns[(a, 0)]
    assert first["bbox"] == [2.0, 3.0, 10.0, 20.0] and first["area"] == 200.0
    assert first["image_id"] == pool.image_id(a) and first["iscrowd"] == 0
    assert first["score"] == 0.9 and first["al_task"] == "verify"
    assert first["category_id"] == pool.label_to_cat_id[2]
    assert anns[(b, 5)]["category_id"] == pool.label_to_cat_id[0]
    assert anns[(b, 5)]["bbox"] == [10.5, 10.5, 19.5, 29.5]
    unlabeled = anns[(a, 3)]  # no predicted class: annotators pick it
    assert unlabeled["category_id"] is None and unlabeled["al_task"] == "classify"


def test_box_cost_model_opens_each_image_once(pool: CocoDetectionPool) -> None:
    out = queries_to_coco(_box_queries(pool), pool, cost=AnnotationCost())
    assert [img["al_cost"] for img in out["images"]] == [1.25, 1.5]
    assert out["info"]["al_total_cost"] == 2.75


def test_box_within_tolerance_is_clipped(pool: CocoDetectionPool) -> None:
    q = Query(pool.ids[0], 1, score=0.5, box=(-0.5, 10.0, 64.8, 20.0))
    (ann,) = queries_to_coco([q], pool)["annotations"]
    assert ann["bbox"] == [0.0, 10.0, 64.0, 10.0]


# --- errors -----------------------------------------------------------------------------


def test_item_not_in_pool(pool: CocoDetectionPool) -> None:
    with pytest.raises(ValueError, match=r"'missing\.png' is not in the pool"):
        queries_to_coco([Query("missing.png")], pool)
    with pytest.raises(ValueError, match=r"COCO image id 1 is '000000\.png'"):
        queries_to_coco([Query(1)], pool)
    sub = pool.subset(pool.ids[:2])
    with pytest.raises(ValueError, match=re.escape(f"{pool.ids[3]!r} is not in the pool")):
        queries_to_coco([Query(pool.ids[3])], sub)


@pytest.mark.parametrize(
    "box",
    [(10.0, 10.0, 80.0, 20.0), (-5.0, 0.0, 10.0, 10.0), (10.0, 10.0, 10.0, 20.0),
     (20.0, 10.0, 10.0, 20.0), (math.nan, 0.0, 5.0, 5.0)],
)  # fmt: skip
def test_box_outside_or_empty(pool: CocoDetectionPool, box: tuple[float, ...]) -> None:
    item = pool.ids[2]
    with pytest.raises(ValueError, match="outside") as err:
        queries_to_coco([Query(item, 4, box=box)], pool)  # type: ignore[arg-type]
    assert repr(item) in str(err.value) and str(box) in str(err.value)


def test_duplicates_and_mixed_kinds(pool: CocoDetectionPool) -> None:
    a = pool.ids[0]
    box = (1.0, 1.0, 5.0, 5.0)
    with pytest.raises(ValueError, match="queried twice"):
        queries_to_coco([Query(a, 2, box=box), Query(a, 2, box=box)], pool)
    with pytest.raises(ValueError, match="queried twice"):
        queries_to_coco([Query(a), Query(a)], pool)
    with pytest.raises(ValueError, match="whole-image query and box queries"):
        queries_to_coco([Query(a), Query(a, 2, box=box)], pool)
    with pytest.raises(ValueError, match="has no box"):
        queries_to_coco([Query(a, 2)], pool)


def test_predicted_class_out_of_range(pool: CocoDetectionPool) -> None:
    q = Query(pool.ids[0], 2, box=(1.0, 1.0, 5.0, 5.0))
    with pytest.raises(ValueError, match="not a class index"):
        queries_to_coco([q], pool, predictions={(q.item, 2): len(pool.classes)})


# --- no ground truth in the export ------------------------------------------------------


def test_ground_truth_never_leaks(pool: CocoDetectionPool) -> None:
    dataset = pool.coco.dataset
    before = copy.deepcopy(dataset)
    gt_boxes = {tuple(a["bbox"]) for a in dataset["annotations"]}
    assert gt_boxes
    # mark the pool's labels so any copy of them would show up in the json text
    dataset["images"][1]["gt_secret"] = "LEAK-IMAGE"
    for ann in dataset["annotations"]:
        ann["gt_secret"] = "LEAK-ANNOTATION"
    try:
        queries = [Query(pool.ids[0], score=0.3), *_box_queries(pool)[:1]]
        out = queries_to_coco(queries, pool, predictions={(pool.ids[1], 0): 1})
        text = json.dumps(out)
    finally:
        del dataset["images"][1]["gt_secret"]
        for ann in dataset["annotations"]:
            del ann["gt_secret"]
    assert "LEAK" not in text and "occluded" not in text
    assert len(out["annotations"]) == 1  # only the one box query; the image query adds none
    assert {tuple(a["bbox"]) for a in out["annotations"]}.isdisjoint(gt_boxes)
    assert dataset == before  # the pool is not modified


# --- writing ----------------------------------------------------------------------------


def _load(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_write_round_trip(pool: CocoDetectionPool, tmp_path: Path) -> None:
    queries = [Query(pool.ids[3], score=0.1), *_box_queries(pool)]
    out = queries_to_coco(queries, pool, round_index=0, predictions={(pool.ids[1], 0): 1})
    path = write_coco_queries(tmp_path / "new" / "dir" / "round0.json", out)
    assert path == tmp_path / "new" / "dir" / "round0.json"
    coco = _load(path)
    ids = [pool.image_id(pool.ids[i]) for i in (1, 3, 4)]
    assert sorted(img["id"] for img in coco.loadImgs(ids)) == sorted(ids)
    assert len(coco.getAnnIds()) == 3 and coco.getAnnIds(imgIds=[ids[1]]) == []
    assert json.loads(path.read_text()) == out
    assert [p.name for p in path.parent.iterdir()] == ["round0.json"]  # no temp file left
    assert path.stat().st_mode & 0o777 == 0o644


def test_write_refuses_to_overwrite(pool: CocoDetectionPool, tmp_path: Path) -> None:
    path = tmp_path / "queries.json"
    path.write_text("keep me")
    first = queries_to_coco([Query(pool.ids[0])], pool)
    with pytest.raises(FileExistsError, match=r"queries\.json exists; pass overwrite=True"):
        write_coco_queries(path, first)
    assert path.read_text() == "keep me"
    write_coco_queries(path, first, overwrite=True)
    assert json.loads(path.read_text()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["queries.json"]


def test_write_failure_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    with pytest.raises(ValueError, match=r"cannot write .*bad\.json"):
        write_coco_queries(path, {"images": [], "info": {"x": math.nan}})
    assert list(tmp_path.iterdir()) == []
