"""tools/al_round.py and tools/campaign.py end to end on mmseg's shipped UNet (inherited
through configs/campaign/unet_s5_synthetic_medical.py, only data and sizes overridden):
rounds, label round trips, kills at every stage with a real signal, and bad input."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from taskal.campaign.demo import answer_queries, make_demo_segmentation
from taskal.campaign.round import KILL_AT_ENV
from taskal.campaign.store import DB_NAME, Campaign
from taskal.masks import item_file

ROOT = Path(__file__).resolve().parents[2]
BUDGET = 3


def _tool(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


al_round, campaign_tool = _tool("al_round"), _tool("campaign")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("campaign_demo")
    folders = make_demo_segmentation(
        root / "data", num_labeled=4, num_pool=16, num_eval=4, image_size=(32, 32)
    )
    data = (root / "data").as_posix()
    config = root / "campaign.py"
    config.write_text(
        f'_base_ = ["{(ROOT / "configs/campaign/unet_s5_synthetic_medical.py").as_posix()}"]\n'
        f'data_root = "{data}"\n'
        "train_dataloader = dict(dataset=dict(dataset=dict(data_root=data_root)))\n"
        "al = dict(\n"
        '    pool=dict(img_dir=data_root + "/pool/images"),\n'
        f"    budget={BUDGET}, stop_set=4, gallery=2, batch_size=8,\n"
        '    eval=dict(img_dir=data_root + "/eval/images", ann_dir=data_root + "/eval/masks"),\n'
        "    train=dict(max_iters=2, batch_size=4, lr=0.01, num_workers=0),\n"
        ")\n"
    )
    first = root / "first"
    assert al_round.run([str(config), "--work-dir", str(first), "--train", "--no-progress"]) == 0
    return {"root": root, "config": config, "folders": folders, "first": first}


@pytest.fixture(scope="module")
def scored(demo: dict[str, Any]) -> list[tuple[str, int]]:
    """Round 0's queries of an uninterrupted run scoring round 0's checkpoint of ``demo``."""
    work = demo["root"] / "scored"
    assert al_round.run(_args(demo, work, "--checkpoint", _checkpoint(demo))) == 0
    return _queries(work)


def _args(demo: dict[str, Any], work: Path, *extra: str) -> list[str]:
    return [str(demo["config"]), "--work-dir", str(work), "--no-progress", *extra]


def _checkpoint(demo: dict[str, Any]) -> str:
    return str(demo["first"] / "rounds" / "round_000" / "model.pth")


def _digest(work: Path) -> str:
    return hashlib.sha256((work / DB_NAME).read_bytes()).hexdigest()


def _queries(work: Path, r: int = 0) -> list[tuple[str, int]]:
    with Campaign.open(work / DB_NAME) as c:
        return [(q.item, q.region) for q in c.queries(r)]


def test_a_round_records_queries_outputs_and_report(demo: dict[str, Any]) -> None:
    work = demo["first"]
    with Campaign.open(work / DB_NAME) as c:
        rounds, counts, meta = c.rounds(), c.counts(), c.meta()
        queries, stop = c.queries(0), set(c.stop_set())
    assert meta["task"] == "seg" and meta["classes"][0] == "background"
    assert [r.state for r in rounds] == ["selected"]
    assert rounds[0].checkpoint == str(work / "rounds" / "round_000" / "model.pth")
    assert {"mIoU", "mDice", "labeled"} <= set(rounds[0].metrics)
    assert rounds[0].metrics["labeled"] == 4
    expected = {"unlabeled": 16 - BUDGET, "queried": BUDGET, "partial": 0, "labeled": 4}
    assert counts == expected | {"stop_set": 4}
    assert len(queries) == BUDGET and not {q.item for q in queries} & stop
    out = work / "rounds" / "round_000" / "queries"
    listing = json.loads((out / "queries.json").read_text())
    assert [q["item"] for q in listing] == [q.item for q in queries]
    coco = json.loads((out / "queries_coco.json").read_text())
    assert sorted(i["file_name"] for i in coco["images"]) == sorted(q.item for q in queries)
    assert "<BrushLabels" in (out / "label_studio_config.xml").read_text()
    tasks = json.loads((out / "label_studio_tasks.json").read_text())
    assert [t["data"]["item"] for t in tasks] == [q.item for q in queries]
    assert sorted(p.name for p in (out / "query_masks").glob("*.png")) == sorted(
        item_file(q.item) for q in queries
    )
    assert (
        "mmseg::unet/unet-s5-d16_fcn_4xb4-40k_drive-64x64.py" not in (out / "config.py").read_text()
    )
    html = (work / "report.html").read_text()
    assert "<img" in html and "http://" not in html


def test_labels_round_trip_into_the_next_round(demo: dict[str, Any], tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(demo["first"], work)
    returned = answer_queries(
        work / "rounds/round_000/queries", demo["folders"]["oracle_masks"], tmp_path / "ret"
    )
    imp = ["import", str(work), str(returned), "--config", str(demo["config"])]
    assert campaign_tool.run(imp) == 0
    with Campaign.open(work / DB_NAME) as c:
        labels, counts = c.labels(), c.counts()
    queried = [item for item, _ in _queries(work)]
    assert counts["labeled"] == 4 + BUDGET and counts["queried"] == 0
    for item in queried:
        truth = np.asarray(Image.open(demo["folders"]["oracle_masks"] / item))
        stored = np.asarray(Image.open(__import__("io").BytesIO(labels[item][-1].value)))
        np.testing.assert_array_equal(stored, truth)
    before = _digest(work)
    assert campaign_tool.run(imp) == 0  # the same labels again: a no-op
    assert _digest(work) == before
    assert al_round.run(_args(demo, work, "--train")) == 0
    with Campaign.open(work / DB_NAME) as c:
        second = c.rounds()[1]
        new = {q.item for q in c.queries(1)}
    assert second.metrics["labeled"] == 4 + BUDGET  # trained on the imported labels
    assert len(new) == BUDGET and not new & set(queried)
    assert "kappa" in second.metrics


@pytest.mark.parametrize("point", ["started", "trained", "exported", "selected"])
def test_a_killed_round_is_unchanged_or_resumable(
    demo: dict[str, Any], scored: list[tuple[str, int]], tmp_path: Path, point: str
) -> None:
    work = tmp_path / "work"
    env = dict(os.environ, **{KILL_AT_ENV: point, "OMP_NUM_THREADS": "1"})
    # killed before its model exists, a --train round retrains: mmseg's training is seeded
    model = ["--train"] if point == "started" else ["--checkpoint", _checkpoint(demo)]
    cmd = [sys.executable, str(ROOT / "tools/al_round.py"), *_args(demo, work, *model)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == -9, done.stderr[-2000:]
    with Campaign.open(work / DB_NAME) as c:
        rounds = c.rounds()
    if point == "selected":
        assert [r.state for r in rounds] == ["selected"]
        assert al_round.run(_args(demo, work, "--resume")) == 2  # nothing to resume
    elif point == "started":  # nothing but the round's row exists: a plain run restarts it
        assert [r.state for r in rounds] == ["started"]
        assert al_round.run(_args(demo, work, "--train")) == 0
        assert _queries(work) == _queries(demo["first"])
        return
    else:
        assert [r.state for r in rounds] == ["trained"]
        before = _digest(work)
        assert al_round.run(_args(demo, work, "--checkpoint", _checkpoint(demo))) == 2
        assert _digest(work) == before  # refused without --resume, unchanged
        assert al_round.run(_args(demo, work, "--checkpoint", _checkpoint(demo), "--resume")) == 0
    queries = _queries(work)
    assert queries == scored
    assert len(set(queries)) == len(queries) == BUDGET
    assert (work / "rounds/round_000/queries/queries.json").is_file()
    assert not (work / "rounds/round_000/.queries.tmp").exists()


def test_an_interrupted_round_restarts_with_other_settings(
    demo: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    env = dict(os.environ, **{KILL_AT_ENV: "trained", "OMP_NUM_THREADS": "1"})
    ckpt = ["--checkpoint", _checkpoint(demo)]
    cmd = [sys.executable, str(ROOT / "tools/al_round.py"), *_args(demo, work, *ckpt)]
    assert subprocess.run(cmd, env=env, capture_output=True, cwd=ROOT).returncode == -9
    before = _digest(work)
    line = _refused(
        capsys, work, al_round.run(_args(demo, work, *ckpt, "--resume", "--budget", "2"))
    )
    assert "--restart" in line and _digest(work) == before
    assert al_round.run(_args(demo, work, *ckpt, "--restart", "--budget", "2")) == 0
    with Campaign.open(work / DB_NAME) as c:
        assert [(r.state, r.budget) for r in c.rounds()] == [("selected", 2.0)]
        assert len(c.queries(0)) == 2


def _refused(capsys: pytest.CaptureFixture[str], work: Path, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(("al_round: error:", "campaign: error:")), err
    return err[0]


def test_bad_input_is_one_line_and_changes_nothing(
    demo: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    shutil.copytree(demo["first"], work)
    before = _digest(work)
    no_al = tmp_path / "no_al.py"
    no_al.write_text(
        f'_base_ = ["{(ROOT / "configs/seg/unet_s5_synthetic_medical.py").as_posix()}"]\n'
    )
    ckpt = ["--checkpoint", _checkpoint(demo)]
    cases = {
        "no `al` block": [str(no_al), "--work-dir", str(work), *ckpt],
        "budget must be > 0": _args(demo, work, *ckpt, "--budget", "0"),
        "larger than the": _args(demo, work, *ckpt, "--budget", "1000"),
        "unknown": _args(demo, work, *ckpt, "--strategy", "no_such_strategy"),
        "does not exist": _args(demo, work, "--checkpoint", str(tmp_path / "none.pth")),
        "--checkpoint CKPT": _args(demo, work),
        "nothing to resume": _args(demo, work, *ckpt, "--resume"),
    }
    for expected, argv in cases.items():
        line = _refused(capsys, work, al_round.run(argv))
        assert expected in line, line
        assert _digest(work) == before, expected
    wrong = tmp_path / "wrong.pth"
    import torch

    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, wrong)
    line = _refused(capsys, work, al_round.run(_args(demo, work, "--checkpoint", str(wrong))))
    assert "does not match the model" in line
    assert _digest(work) == before
    # labels: never queried, wrong shape, a clash with recorded labels, an unknown file
    queried = [item for item, _ in _queries(work)]
    stop = Campaign.open(work / DB_NAME).stop_set()
    returned = tmp_path / "returned"
    for name, mask in (
        ("never queried", {stop[0]: np.zeros((32, 32), np.uint8)}),
        ("shape", {queried[0]: np.zeros((16, 32), np.uint8)}),
        ("outside", {queried[0]: np.full((32, 32), 7, np.uint8)}),
    ):
        shutil.rmtree(returned, ignore_errors=True)
        returned.mkdir()
        for item, m in mask.items():
            Image.fromarray(m).save(returned / item_file(item))
        imp = ["import", str(work), str(returned), "--config", str(demo["config"])]
        line = _refused(capsys, work, campaign_tool.run(imp))
        assert name in line, line
        assert _digest(work) == before
    shutil.rmtree(returned)
    returned.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(returned / "not_an_item.png")
    imp = ["import", str(work), str(returned), "--config", str(demo["config"])]
    assert "matches no image" in _refused(capsys, work, campaign_tool.run(imp))
    # a labeled image given another label
    labeled = next(k for k, s in Campaign.open(work / DB_NAME).statuses().items() if s == "labeled")
    shutil.rmtree(returned)
    returned.mkdir()
    Image.fromarray(np.full((32, 32), 3, np.uint8)).save(returned / item_file(labeled))
    line = _refused(capsys, work, campaign_tool.run(imp))
    assert "already carry another label" in line
    assert _digest(work) == before
    # a pool image gone missing
    pool_image = Path(Campaign.open(work / DB_NAME).items()[queried[0]])
    moved = tmp_path / "moved.png"
    shutil.move(pool_image, moved)
    try:
        line = _refused(capsys, work, al_round.run(_args(demo, work, *ckpt)))
        assert "missing" in line
    finally:
        shutil.move(moved, pool_image)
    assert _digest(work) == before
