"""The detection simulation end to end on a tiny synthetic set with a tiny detector."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from taskal.data import load_coco_detection, make_synthetic_detection
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
