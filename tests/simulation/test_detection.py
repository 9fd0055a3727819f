"""The detection simulation end to end on a tiny synthetic set with a tiny detector."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from taskal.data import load_coco_detection, make_synthetic_detection
from taskal.partial import PartialDetectionPool
from taskal.queries import LabelState, Query
from taskal.registry import MODELS
from taskal.simulation.detection import DetectionSimulation, DetSimulationConfig

from ..adapters.test_torchvision_detection import retinanet


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = Path(tmp_path_factory.mktemp("shapes"))
    files = make_synthetic_detection(root, num_images=12, image_size=(64, 64), seed=1)
    pool = load_coco_detection(files.ann_file, files.img_dir)
    return pool.subset(pool.ids[:8]), pool.subset(pool.ids[8:])


@pytest.fixture
def tiny_detector():  # type: ignore[no-untyped-def]
    @MODELS.register_module(name="tiny_retinanet_for_tests", force=True)
    def build(num_classes: int) -> Any:
        return retinanet(num_classes)

    yield "tiny_retinanet_for_tests"
    MODELS.module_dict.pop("tiny_retinanet_for_tests", None)


def _cfg(detector: str, **kw: Any) -> DetSimulationConfig:
    base: dict[str, Any] = dict(
        strategies=["entropy"],
        initial=2,
        budget=2,
        rounds=2,
        seeds=[0],
        model={"type": detector},
        train={"epochs": 1, "min_epoch_items": 4, "batch_size": 2, "max_grad_norm": 10.0},
        batch_size=4,
        progress=False,
    )
    base.update(kw)
    return DetSimulationConfig(**base)


def test_runs_random_and_entropy_with_map(split, tiny_detector: str) -> None:  # type: ignore[no-untyped-def]
    pool, test = split
    sim = DetectionSimulation(_cfg(tiny_detector), pool, test)
    runs = sim.run()
    assert [r["strategy"] for r in runs] == ["random", "entropy"]
    for run in runs:
        assert [p["labeled"] for p in run["curve"]] == [2, 4, 6]
        assert all(0.0 <= p["metric"] <= 1.0 for p in run["curve"])
    # the same seed: the same initial images and initial model for both strategies
    assert runs[0]["curve"][0]["metric"] == runs[1]["curve"][0]["metric"]


def test_seeds_reproduce(split, tiny_detector: str) -> None:  # type: ignore[no-untyped-def]
    pool, test = split
    cfg = _cfg(tiny_detector, rounds=1, strategies=["random"])
    a = DetectionSimulation(cfg, pool, test).run()
    b = DetectionSimulation(cfg, pool, test).run()
    assert [p["metric"] for p in a[0]["curve"]] == [p["metric"] for p in b[0]["curve"]]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"strategies": ["vote_entropy"]}, "scores a deep ensemble"),
        ({"model": {}}, "MODELS config of a torchvision detector"),
        ({"train": {"stop": 1}}, r"train does not take \['stop'\]"),
        ({"budget": 0}, "budget must be a positive integer"),
    ],
)
def test_bad_configs_fail_before_training(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _cfg("tiny_retinanet_for_tests", **kw)


def test_pool_too_small(split, tiny_detector: str) -> None:  # type: ignore[no-untyped-def]
    pool, test = split
    with pytest.raises(ValueError, match="pool holds only 8"):
        DetectionSimulation(_cfg(tiny_detector, rounds=5), pool, test)


def test_badge_refused_for_a_sigmoid_detector_before_training(split, tiny_detector: str) -> None:  # type: ignore[no-untyped-def]
    pool, test = split
    with pytest.raises(ValueError, match=r"\['badge'\] need an image-level softmax"):
        DetectionSimulation(_cfg(tiny_detector, strategies=["badge"]), pool, test)


def test_box_queries_train_on_crops_and_count_their_cost(
    split, tiny_detector: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    pool, test = split
    boxes = dict(type="entropy", name="entropy_boxes", query="region")
    cfg = _cfg(
        tiny_detector,
        strategies=[boxes],
        region_budget=3,
        queries_dir=str(tmp_path),
        train={"epochs": 2, "min_epoch_items": 8, "batch_size": 2, "max_grad_norm": 10.0},
    )
    sim = DetectionSimulation(cfg, pool, test)
    trained: list[Any] = []
    train = sim.train
    sim.train = lambda s, labeled, seed, r: (trained.append(labeled), train(s, labeled, seed, r))[1]  # type: ignore[method-assign]
    runs = {r["strategy"]: r["curve"] for r in sim.run()}
    curve = runs["entropy_boxes"]
    assert curve[0]["metric"] == runs["random"][0]["metric"]  # the same initial images
    assert curve[0]["regions"] == 0 and "regions" not in runs["random"][0]
    states = trained[-3:]  # the box run's three rounds
    assert all(isinstance(s, LabelState) for s in states)
    regions = [sum(len(b) for b in s.boxes.values()) for s in states]
    assert regions == [p["regions"] for p in curve] and regions[-1] > 0
    assert all(b <= a + 3 for a, b in itertools.pairwise(regions))
    costs = [p["cost"] for p in curve]
    assert costs == sorted(costs) and costs[-1] > costs[0]
    # every round's box queries were written as COCO json with the boxes to check
    written = json.loads((tmp_path / "entropy_boxes_seed0_round0.json").read_text())
    assert written["annotations"] and all("bbox" in a for a in written["annotations"])


def test_box_query_cost(split, tiny_detector: str) -> None:  # type: ignore[no-untyped-def]
    """Opening an image, a verified box per query, and a drawn box per labeled object that
    no queried box matches; whole images cost opening plus their boxes drawn."""
    pool, test = split
    cost = dict(per_image=1.0, per_box_drawn=1.0, per_box_verified=0.25)
    sim = DetectionSimulation(_cfg(tiny_detector, annotation_cost=cost), pool, test)
    full, part = pool.ids[0], next(i for i in pool.ids[1:] if len(pool.target(i)["boxes"]) >= 2)
    gt = pool.target(part)["boxes"]
    n_full = len(pool.target(full)["boxes"])
    assert sim.annotation_cost([full]) == 1.0 + n_full
    state = LabelState(full={full})
    exact = tuple(float(v) for v in gt[0])
    state.add([Query(part, 0, box=exact)])  # type: ignore[arg-type]
    oracle = PartialDetectionPool(pool, state)
    labeled = int(oracle.labeled_objects(part).sum())  # gt[0] and what overlaps it
    want = (1.0 + n_full) + 1.0 + 0.25 + (labeled - 1) * 1.0
    assert sim.annotation_cost(state) == pytest.approx(want)
    default = DetectionSimulation(_cfg(tiny_detector), pool, test)
    assert default.annotation_cost([full]) == n_full  # opening free: boxes drawn


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"strategies": [dict(type="entropy", query="region")]}, "set region_budget"),
        (
            {"strategies": [dict(type="coreset", query="region")], "region_budget": 4},
            "cannot query boxes",
        ),
        ({"strategies": [dict(type="entropy", query="pixels")]}, "query='pixels'; choose"),
        (
            {"strategies": [dict(type="region_impurity", query="region")], "region_budget": 4},
            "a box is a region of one unit",
        ),
        (
            {
                "partial": {"margin": 1},
                "strategies": [dict(type="entropy", query="region")],
                "region_budget": 4,
            },
            "partial does not take",
        ),
    ],
)
def test_bad_box_query_configs(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _cfg("tiny_retinanet_for_tests", **kw)


def test_box_queries_need_a_torchvision_detector() -> None:
    with pytest.raises(ValueError, match="torchvision detectors"):
        DetSimulationConfig(
            strategies=[dict(type="entropy", query="region")],
            region_budget=4,
            mmdet_config="configs/det/retinanet_r18_synthetic.py",
        )


def test_box_and_image_runs_share_round_zero(split, tiny_detector: str) -> None:  # type: ignore[no-untyped-def]
    pool, test = split
    boxes = dict(type="random", name="random_boxes", query="region")
    sim = DetectionSimulation(
        _cfg(tiny_detector, strategies=[boxes], region_budget=2, rounds=0), pool, test
    )
    runs = {r["strategy"]: r["curve"] for r in sim.run()}
    assert runs["random"][0]["metric"] == runs["random_boxes"][0]["metric"]
    assert runs["random"][0]["cost"] == runs["random_boxes"][0]["cost"]
