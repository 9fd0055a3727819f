"""tools/simulate.py end to end on digits and on a real image folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from mmengine.config import Config

ROOT = Path(__file__).resolve().parents[2]

spec = importlib.util.spec_from_file_location("simulate", ROOT / "tools" / "simulate.py")
assert spec and spec.loader
simulate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(simulate)

FAST = ["--cfg-options", "train.epochs=1", "train.min_epoch_items=32", "model.width=4"]


def _run(args: list[str]) -> dict:  # type: ignore[type-arg]
    return simulate.main(simulate.get_args_parser().parse_args(args))


def test_digits_writes_results_plot_summary_config(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(
        [
            "--strategies",
            "entropy",
            "--initial",
            "10",
            "--budget",
            "10",
            "--rounds",
            "1",
            "--num-seeds",
            "2",
            "--output-dir",
            str(out),
            "--no-progress",
            *FAST,
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "cls" and results["metric"] == "accuracy"
    assert [(r["strategy"], r["seed"]) for r in results["runs"]] == [
        ("random", 0),
        ("entropy", 0),
        ("random", 1),
        ("entropy", 1),
    ]
    point = results["runs"][0]["curve"][0]
    assert set(point) == {"labeled", "metric", "select_seconds", "train_seconds"}
    assert (out / "learning_curve.png").stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "| entropy |" in summary and "labels to reach random's final" in summary
    resolved = Config.fromfile(str(out / "config.py"))
    assert resolved.train.epochs == 1 and resolved.al.budget == 10 and resolved.al.initial == 10
    # --summarize rewrites the summary and the plot from results.json alone
    (out / "summary.md").write_text("")
    (out / "learning_curve.png").unlink()
    assert _run(["--summarize", str(out)]) == {}
    assert (out / "summary.md").read_text() == summary
    assert (out / "learning_curve.png").stat().st_size > 10_000

    with pytest.raises(SystemExit, match="already exists"):
        _run(["--output-dir", str(out), "--no-progress"])
    assert json.loads((out / "results.json").read_text()) == results


def test_image_folder_dataset(tmp_path: Path, image_folder) -> None:  # type: ignore[no-untyped-def]
    image_folder(tmp_path / "imgs", per_class=10)
    out = tmp_path / "run"
    _run(
        [
            "--dataset",
            str(tmp_path / "imgs"),
            "--image-size",
            "8",
            "--strategies",
            "margin",
            "--initial",
            "4",
            "--budget",
            "2",
            "--rounds",
            "1",
            "--num-seeds",
            "1",
            "--output-dir",
            str(out),
            "--no-progress",
            *FAST,
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert [p["labeled"] for p in results["runs"][0]["curve"]] == [4, 6]


def test_pick_diagnostics_reports_classes_and_llal_rank() -> None:
    spec = importlib.util.spec_from_file_location("diag", ROOT / "tools" / "pick_diagnostics.py")
    assert spec and spec.loader
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    report = diag.main(
        diag.get_args_parser().parse_args(
            ["--strategies", "llal", "--labeled", "20", "--budget", "5"]
        )
    )
    assert sum(report["llal"]["class_counts"]) == 5 and sum(report["random"]["class_counts"]) == 5
    assert -1.0 <= report["llal"]["spearman"] <= 1.0


def test_image_size_needs_an_image_folder(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="image folder"):
        _run(["--image-size", "16", "--output-dir", str(tmp_path / "x"), "--no-progress"])


def test_detection_task_writes_map_and_box_costs(tmp_path: Path) -> None:
    """--task det: the shipped det config on a tiny synthetic set, COCO mAP and boxes."""
    out = tmp_path / "det"
    results = _run(
        [
            "--task",
            "det",
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
            "test_fraction=0.25",
            "model.width=4",
            "train.epochs=1",
            "train.min_epoch_items=4",
        ]
    )
    assert results["task"] == "det" and results["metric"] == "mAP"
    assert [r["strategy"] for r in results["runs"]] == ["random", "entropy"]
    for run in results["runs"]:
        assert [p["labeled"] for p in run["curve"]] == [2, 4]
        assert all(0.0 <= p["metric"] <= 1.0 for p in run["curve"])
    # both runs of seed 0 start from the same 2 random images: same boxes drawn, and the
    # shapes set puts at least one box in every image
    first = [run["curve"][0]["cost"] for run in results["runs"]]
    assert first[0] == first[1] >= 2
    assert all(run["curve"][1]["cost"] >= run["curve"][0]["cost"] + 2 for run in results["runs"])
    summary = (out / "summary.md").read_text()
    assert "9 pool / 3 test" in summary and "boxes to reach random's final" in summary
    assert (out / "learning_curve.png").stat().st_size > 0
    assert Config.fromfile(str(out / "config.py")).task == "det"
    # each round's queries as COCO json: the 2 picked images, no ground truth copied
    from pycocotools.coco import COCO

    written = sorted(p.name for p in (out / "queries").iterdir())
    assert written == ["entropy_seed0_round0.json", "random_seed0_round0.json"]
    queried = COCO(str(out / "queries" / "entropy_seed0_round0.json"))
    assert len(queried.getImgIds()) == 2 and not queried.getAnnIds()


def test_task_must_match_the_config(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"--task det contradicts .* a cls config"):
        _run(["--task", "det", "--config", str(ROOT / "configs/cls/digits_smallcnn.py")])


SEG_FAST = [
    "--seeds",
    "0",
    "--initial",
    "2",
    "--budget",
    "1",
    "--rounds",
    "1",
    "--no-progress",
]


def test_segmentation_task_writes_miou_pixels_and_the_reference(tmp_path: Path) -> None:
    """--task seg: the shipped seg config on a tiny synthetic set, image and region queries
    at the same pixels, and the full-supervision table."""
    out = tmp_path / "seg"
    results = _run(
        [
            "--task",
            "seg",
            *SEG_FAST,
            "--output-dir",
            str(out),
            "--cfg-options",
            f"dataset.root={tmp_path / 'medical'}",
            "dataset.num_images=10",
            "dataset.image_size=[24,24]",
            "model.width=4",
            "train.epochs=1",
            "train.min_epoch_items=4",
            "al.regions.n_segments=9",
            "al.region_caps.max_item_share=0.5",  # 24x24 images: a superpixel is ~11 %
        ]
    )
    assert results["task"] == "seg" and results["metric"] == "mIoU"
    assert [r["strategy"] for r in results["runs"]] == [
        "random",
        "entropy",
        "random_regions",
        "entropy_regions",
        "ripu_regions",
    ]
    costs = {r["strategy"]: [p["cost"] for p in r["curve"]] for r in results["runs"]}
    assert costs["random"] == [2 * 576, 3 * 576]
    assert all(c[0] == 2 * 576 and 2 * 576 < c[1] <= 3 * 576 for c in costs.values())
    assert [r["seed"] for r in results["reference"]] == [0] and results["pool_cost"] == 8 * 576
    assert all("mDice" in p for r in results["runs"] for p in r["curve"])
    summary = (out / "summary.md").read_text()
    assert "pixels to reach random's final" in summary and "Full supervision" in summary
    assert "mean Dice" in summary and "final mean Dice" in summary


def test_segmentation_on_nifti_slices_splits_by_scan(tmp_path: Path) -> None:
    config = tmp_path / "volumes.py"
    config.write_text(
        f"_base_ = ['{ROOT / 'configs/seg/synthetic_medical_fcn.py'}']\n"
        "dataset = dict(_delete_=True, type='synthetic_volumes', "
        f"root='{tmp_path / 'vol'}', num_volumes=3, shape=(20, 20, 6), axis=2)\n"
        "test_fraction = 1 / 3\n"
        "model = dict(width=4)\n"
        "train = dict(epochs=1, min_epoch_items=4)\n"
        "al = dict(strategies=['entropy'], reference=False, regions=dict(kind='patch', patch=10))\n"
    )
    results = _run(["--config", str(config), *SEG_FAST, "--output-dir", str(tmp_path / "out")])
    assert [r["strategy"] for r in results["runs"]] == ["random", "entropy"]
    assert results["runs"][0]["curve"][0]["cost"] == 2 * 400 and "reference" not in results
    pool, test = simulate.build_segmentation_split(Config.fromfile(str(config)))
    scans = {i.split("#")[0] for i in pool.ids}
    assert (
        len(pool.ids) == 12
        and len(test.ids) == 6
        and not scans & {i.split("#")[0] for i in test.ids}
    )
