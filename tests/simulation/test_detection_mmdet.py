"""The detection simulation with an mmdet 3.x config: trained through mmengine's Runner,
scored by MMDetAdapter. The detector is the tiny RetinaNet of ``tests/test_training_mmdet.py``
(the repository's RetinaNet R-18 config shrunk to 16 base channels) on 64x64 shapes."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mmengine.config import Config

from taskal.adapters import MMDetAdapter
from taskal.data import CocoDetectionPool, load_coco_detection, make_synthetic_detection
from taskal.simulation.detection import DetectionSimulation, DetSimulationConfig

from ..test_training_mmdet import CLASSES, TINY

pytestmark = pytest.mark.filterwarnings("ignore:.*has no dropout with p > 0")

ROOT = Path(__file__).resolve().parents[2]
#: one step per training: 2 labeled images repeated to 4, 2 per batch, ... one epoch.
SHORT = dict(max_epochs=1, batch_size=2, lr=0.01, min_epoch_items=4)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny maps: a second thread only adds synchronisation on a busy two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[CocoDetectionPool, CocoDetectionPool]:
    files = make_synthetic_detection(
        tmp_path_factory.mktemp("shapes"),
        num_images=12,
        image_size=(64, 64),
        classes=CLASSES,
        objects_per_image=(1, 2),
        object_scale=(0.3, 0.6),
        seed=1,
    )
    pool = load_coco_detection(files.ann_file, files.img_dir)
    return pool.subset(pool.ids[:8]), pool.subset(pool.ids[8:])


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("configs") / "tiny_retinanet.py"
    path.write_text(TINY)
    return str(path)


def _cfg(mmdet_config: str | None, /, **kw: Any) -> DetSimulationConfig:
    base: dict[str, Any] = dict(
        strategies=["entropy"],
        initial=2,
        budget=2,
        rounds=1,
        seeds=[0],
        mmdet_config=mmdet_config,
        mmdet_train=dict(SHORT),
        batch_size=4,
        progress=False,
    )
    base.update(kw)
    return DetSimulationConfig(**base)


def test_runs_random_and_entropy_with_map(split, tiny_config: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pool, test = split
    sim = DetectionSimulation(_cfg(tiny_config, work_dir=str(tmp_path)), pool, test)
    runs = sim.run()
    assert [r["strategy"] for r in runs] == ["random", "entropy"]
    for run in runs:
        assert [p["labeled"] for p in run["curve"]] == [2, 4]
        assert all(0.0 <= p["metric"] <= 1.0 for p in run["curve"])
    # the same seed: the same initial images and initial model for both strategies
    assert runs[0]["curve"][0]["metric"] == runs[1]["curve"][0]["metric"]
    # one Runner folder per (strategy, seed, round), each with the labeled images it trained on
    runs_dirs = sorted(p.name for p in tmp_path.iterdir())
    assert runs_dirs == [f"{s}_seed0_round{r}" for s in ("entropy", "random") for r in (0, 1)]
    labeled = json.loads((tmp_path / "random_seed0_round1" / "labeled_coco.json").read_text())
    assert len(labeled["images"]) == 4


def test_llal_trains_the_loss_predictor_with_the_detector(split, tiny_config: str) -> None:  # type: ignore[no-untyped-def]
    """An llal round trains LLALDetector inside the Runner; the adapter it hands the
    selector predicts a finite loss per image."""
    pool, test = split
    sim = DetectionSimulation(_cfg(tiny_config, strategies=["llal"]), pool, test)
    llal = dict(sim.strategies)["llal"]
    adapter = sim.train(llal, pool.ids[:2], seed=0, r=0)
    assert adapter.loss_predictor is not None
    predicted = adapter.predict_loss(pool.take(pool.ids[2:5]).without_labels())
    assert predicted.shape == (3,) and torch.isfinite(predicted).all()
    runs = sim.run()
    assert [r["strategy"] for r in runs] == ["random", "llal"]


def test_a_round_trains_the_same_weights_for_every_strategy(
    split, tiny_config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Same (seed, round) and labeled set: the same detector whatever the strategy; another
    round starts from another initialisation. Without work_dir, nothing is left behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pool, test = split
    sim = DetectionSimulation(
        _cfg(tiny_config, strategies=[dict(type="difficulty_calibrated")]), pool, test
    )
    (_, random), (_, calibrated) = sim.strategies
    labeled = pool.ids[:2]
    a = sim.train(random, labeled, 0, 0)
    b = sim.train(calibrated, labeled, 0, 0)
    c = sim.train(random, labeled, 0, 1)
    assert isinstance(a, MMDetAdapter) and not a.model.training
    wa, wb, wc = (x.model.state_dict() for x in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    # difficulty-calibrated scores read the class quality measured on the labeled images
    assert a.class_quality is None
    assert b.class_quality is not None and b.class_quality.shape == (len(CLASSES),)
    assert not any(tmp_path.iterdir()), "the temporary Runner folders are removed"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (
            {"model": {"type": "small_detector"}},
            r"exactly one detector.*\['model', 'mmdet_config'\]",
        ),
        ({"mmdet_config": None, "mmdet_train": {}}, "exactly one detector.*neither"),
        ({"train": {"epochs": 1}}, "an mmdet_config trains with its own schedule"),
        ({"mmdet_train": {"work_dir": "x"}}, "mmdet_train does not take work_dir"),
        ({"mmdet_train": {"epochs": 1}}, r"mmdet_train does not take \['epochs'\]"),
        ({"mmdet_train": {"max_epochs": 0}}, "max_epochs must be an int >= 1"),
        ({"mmdet_config": "nope.py"}, "mmdet_config 'nope.py' is not a file"),
    ],
)
def test_bad_configs_fail_before_training(kw: dict[str, Any], match: str, tiny_config: str) -> None:
    with pytest.raises(ValueError, match=match):
        _cfg(tiny_config, **kw)


def test_mmdet_settings_need_an_mmdet_config() -> None:
    with pytest.raises(ValueError, match=r"\['mmdet_train', 'work_dir'\] apply to an mmdet_config"):
        DetSimulationConfig(model={"type": "small_detector"}, mmdet_train={"lr": 0.1}, work_dir="w")


def test_the_configs_classes_must_be_the_pools(split, tiny_config: str) -> None:  # type: ignore[no-untyped-def]
    pool, test = split
    five = _cfg(tiny_config, mmdet_cfg_options={"model": {"bbox_head": {"num_classes": 5}}})
    with pytest.raises(ValueError, match=r"bbox_head\.num_classes=5, but the pool has 3 classes"):
        DetectionSimulation(five, pool, test)


def test_the_shipped_simulation_config() -> None:
    """configs/det/synthetic_retinanet_mmdet.py: the repository's RetinaNet R-18 config, its
    classes those of the data, no strategy that the mmdet path refuses or cannot score."""
    cfg = Config.fromfile(str(ROOT / "configs" / "det" / "synthetic_retinanet_mmdet.py"))
    assert cfg.task == "det" and "model" not in cfg and "train" not in cfg
    mmdet = Config.fromfile(str(ROOT / cfg.mmdet_config))
    assert mmdet.model.bbox_head.num_classes == len(cfg.dataset.classes)
    labels = [s if isinstance(s, str) else s.get("name", s["type"]) for s in cfg.al.strategies]
    assert "llal" in labels and "badge" not in labels  # RetinaNet is sigmoid: no BADGE


def test_simulate_tool_runs_an_mmdet_config(tmp_path: Path, tiny_config: str) -> None:
    """tools/simulate.py --config configs/det/synthetic_retinanet_mmdet.py, shrunk: 12 images,
    the tiny RetinaNet, one step per training."""
    spec = importlib.util.spec_from_file_location("simulate", ROOT / "tools" / "simulate.py")
    assert spec and spec.loader
    simulate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(simulate)
    out = tmp_path / "det"
    args = [
        "--config",
        str(ROOT / "configs" / "det" / "synthetic_retinanet_mmdet.py"),
        "--strategies",
        "entropy",
        "--initial",
        "2",
        "--budget",
        "2",
        "--rounds",
        "1",
        "--seeds",
        "0",
        "--output-dir",
        str(out),
        "--no-progress",
        "--cfg-options",
        f"dataset.root={tmp_path / 'shapes'}",
        "dataset.num_images=12",
        "dataset.image_size=(64,64)",
        "test_fraction=0.25",
        f"mmdet_config={tiny_config}",
        "mmdet_cfg_options.model.bbox_head.feat_channels=32",  # the tiny head's, not 128
        f"work_dir={tmp_path / 'runs'}",
        *(f"mmdet_train.{k}={v}" for k, v in SHORT.items()),
    ]
    results = simulate.main(simulate.get_args_parser().parse_args(args))
    assert results["task"] == "det" and results["metric"] == "mAP"
    assert [r["strategy"] for r in results["runs"]] == ["random", "entropy"]
    for run in results["runs"]:
        assert [p["labeled"] for p in run["curve"]] == [2, 4]
        assert all(0.0 <= p["metric"] <= 1.0 for p in run["curve"])
    assert len(list((tmp_path / "runs").iterdir())) == 4
    resolved = Config.fromfile(str(out / "config.py"))
    assert resolved.mmdet_config == tiny_config and resolved.mmdet_train.max_epochs == 1
    assert resolved.mmdet_cfg_options.model.bbox_head == dict(feat_channels=32, stacked_convs=2)


def test_badge_refused_for_retinanet_before_training(split, tiny_config: str) -> None:  # type: ignore[no-untyped-def]
    pool, test = split
    with pytest.raises(ValueError, match=r"\['badge'\] need an image-level softmax"):
        DetectionSimulation(_cfg(tiny_config, strategies=["badge"]), pool, test)
