"""The segmentation simulation end to end on a tiny synthetic medical set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from taskal.data import load_segmentation_folder, make_synthetic_segmentation
from taskal.queries import LabelState, Query
from taskal.selector import build_strategy
from taskal.simulation import (
    SegmentationSimulation,
    SegSimulationConfig,
    format_reference_table,
    summarize,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*has no dropout with p > 0")


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = Path(tmp_path_factory.mktemp("medical"))
    files = make_synthetic_segmentation(root, num_images=10, image_size=(24, 24), seed=1)
    classes = ("background", "liver", "kidney", "lesion")
    pool = load_segmentation_folder(files.img_dir, files.ann_dir, classes)
    return pool.subset(pool.ids[:7]), pool.subset(pool.ids[7:])


def _cfg(**kw: Any) -> SegSimulationConfig:
    base: dict[str, Any] = dict(
        strategies=["entropy", dict(type="entropy", name="entropy_regions", query="region")],
        initial=2,
        budget=1,
        rounds=2,
        seeds=[0],
        model={"type": "small_segmenter", "width": 4},
        regions={"patch": 8},
        train={"epochs": 1, "min_epoch_items": 4, "batch_size": 2},
        batch_size=4,
        progress=False,
    )
    base.update(kw)
    return SegSimulationConfig(**base)


def test_image_and_region_queries_buy_the_same_pixels(split) -> None:  # type: ignore[no-untyped-def]
    pool, test = split
    sim = SegmentationSimulation(_cfg(), pool, test)
    assert sim.region_budget == 24 * 24 and sim.cfg.region_budget is None  # one image
    runs = {r["strategy"]: r["curve"] for r in sim.run()}
    assert list(runs) == ["random", "entropy", "entropy_regions"]
    assert [p["cost"] for p in runs["random"]] == [2 * 576, 3 * 576, 4 * 576]
    regions = runs["entropy_regions"]
    assert regions[0]["metric"] == runs["random"][0]["metric"]  # the same round 0
    assert regions[0]["regions"] == 0 and regions[-1]["regions"] > 0
    # 8x8 patches of a 24x24 image are whole: exactly one image's pixels per round
    assert [p["cost"] for p in regions] == [2 * 576, 3 * 576, 4 * 576]
    assert regions[-1]["labeled"] > 2, "regions spread over more than the initial images"
    assert all(0.0 <= p["metric"] <= 1.0 for c in runs.values() for p in c)


def test_cost_counts_labeled_pixels_of_regions(split) -> None:  # type: ignore[no-untyped-def]
    pool, test = split
    sim = SegmentationSimulation(_cfg(regions={"patch": 16}), pool, test)
    state = LabelState(full={pool.ids[0]})
    state.add([Query(pool.ids[1], 0), Query(pool.ids[1], 3)])  # 16x16 and the 8x8 corner
    assert sim.annotation_cost(state) == 576 + 256 + 64
    assert sim.annotation_cost([pool.ids[0], pool.ids[1]]) == 2 * 576


def test_reference_and_the_fraction_table(split) -> None:  # type: ignore[no-untyped-def]
    pool, test = split
    sim = SegmentationSimulation(_cfg(strategies=[], rounds=1, reference=True), pool, test)
    results = {"task": "seg", "metric": "mIoU", "runs": sim.run()}
    results["reference"] = sim.reference_runs()
    assert [r["seed"] for r in results["reference"]] == [0]
    summarize(results)
    table = format_reference_table(results, sim.total_pixels, fractions=(2 / 7, 0.9))
    assert "| random |" in table and "outside the curve" in table


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"regions": {"cost": "clicks"}}, "counts labeled pixels"),
        ({"strategies": [dict(type="coreset", query="region")]}, "cannot query patches"),
        ({"strategies": ["vote_entropy"]}, "deep ensemble"),
        ({"strategies": ["region_impurity"]}, "add query='region'"),
        ({"region_budget": 0}, "region_budget must be > 0"),
        ({"label": "scribble"}, "label must be"),
        ({"region_caps": {"per_image": 0.1}}, "region_caps does not take"),
        ({"region_caps": {"max_item_share": 2}}, "max_item_share must lie"),
        ({"model": {}}, "give exactly one model"),
        ({"train": {"epochs": 0}}, r"seg_train\.epochs"),
    ],
)
def test_bad_configs_fail_before_training(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


def test_region_caps_reach_the_selector(split) -> None:  # type: ignore[no-untyped-def]
    pool, test = split
    strategies = [dict(type="entropy", name="patches", query="region")]
    cfg = _cfg(strategies=strategies, rounds=1, region_caps={"max_item_share": 0.25})
    sim = SegmentationSimulation(cfg, pool, test)
    seen: list[list[Query]] = []
    sim.record_queries = lambda label, seed, r, queries: seen.append(queries)  # type: ignore[method-assign]
    sim.run()
    spent: dict[str, float] = {}
    for q in seen[-1]:
        spent[str(q.item)] = spent.get(str(q.item), 0.0) + q.cost
    assert max(spent.values()) <= 0.25 * 576 and len(spent) >= 4


def test_an_mmseg_config_trains_through_the_runner(split, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The shipped-UNet config, shrunk: a round trains through mmengine's Runner and is
    scored by MMSegAdapter; region queries train on partial labels there too."""
    from taskal.adapters import MMSegAdapter

    pool, test = split
    root = Path(__file__).resolve().parents[2]
    cfg = SegSimulationConfig(
        strategies=[dict(type="entropy", name="entropy_regions", query="region")],
        initial=2,
        budget=1,
        rounds=1,
        seeds=[0],
        model={},
        mmseg_config=str(root / "configs/seg/unet_s5_synthetic_medical.py"),
        mmseg_cfg_options={
            "model.backbone.base_channels": 4,
            "model.decode_head.in_channels": 4,
            "model.decode_head.channels": 4,
            "model.auxiliary_head.in_channels": 8,
            "model.auxiliary_head.channels": 4,
            "log_level": "WARNING",
        },
        mmseg_train={"max_iters": 2, "batch_size": 2},
        work_dir=str(tmp_path / "runs"),
        regions={"patch": 8},
        batch_size=4,
        progress=False,
    )
    sim = SegmentationSimulation(cfg, pool, test)
    adapter = sim.train(sim.strategies[0][1], pool.ids[:2], seed=0, r=0)
    assert isinstance(adapter, MMSegAdapter)
    runs = {r["strategy"]: r["curve"] for r in sim.run()}
    assert runs["random"][0]["metric"] == runs["entropy_regions"][0]["metric"]
    assert runs["entropy_regions"][1]["regions"] > 0
    assert (tmp_path / "runs" / "entropy_regions_seed0_round1").is_dir()
    with pytest.raises(ValueError, match="give exactly one model"):
        _cfg(mmseg_config=cfg.mmseg_config)
    llal = sim._fit_mmseg(build_strategy("llal"), pool, pool.ids[:2], seed=0, r=0)
    assert llal.loss_predictor is not None
    assert llal.predict_loss(pool.take(pool.ids[:2]).without_labels()).shape == (2,)
    with pytest.raises(ValueError, match="only dropout_p applies"):
        SegSimulationConfig(mmseg_config=cfg.mmseg_config, adapter={"mean": (0.5,) * 3})
