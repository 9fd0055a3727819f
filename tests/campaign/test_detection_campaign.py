"""tools/al_round.py and tools/campaign.py end to end on mmdet's shipped RetinaNet R-18
(inherited through configs/campaign/retinanet_r18_synthetic_shapes.py, only data and sizes
overridden): a round, COCO and Label Studio label round trips into the next round, and bad
input refused in one line with the database unchanged."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from taskal.campaign.demo import make_demo_detection
from taskal.campaign.settings import CampaignSettings, load_campaign_config
from taskal.campaign.store import DB_NAME, Campaign, CampaignError
from taskal.campaign.tasks import task_kit
from taskal.campaign.tasks.detection import boxes_of

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "campaign" / "retinanet_r18_synthetic_shapes.py"
CLASSES = ("circle", "square", "triangle")
BUDGET = 3
NUM_LABELED, NUM_POOL, NUM_EVAL = 6, 20, 4
SIZE = 64


def _tool(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


al_round, campaign_tool = _tool("al_round"), _tool("campaign")


def _subset(coco: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The COCO json of the images named ``names`` only."""
    images = [i for i in coco["images"] if i["file_name"] in set(names)]
    ids = {i["id"] for i in images}
    anns = [a for a in coco["annotations"] if a["image_id"] in ids]
    return {"images": images, "annotations": anns, "categories": coco["categories"]}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("det_campaign")
    files = make_demo_detection(
        root / "data", NUM_LABELED, NUM_POOL, NUM_EVAL, (SIZE, SIZE), CLASSES
    )
    data = (root / "data").as_posix()
    config = root / "campaign.py"
    config.write_text(
        f'_base_ = ["{CONFIG.as_posix()}"]\n'
        f'data_root = "{data}"\n'
        "train_dataloader = dict(dataset=dict(data_root=data_root))\n"
        "al = dict(\n"
        '    pool=dict(img_dir=data_root + "/pool/images"),\n'
        f"    budget={BUDGET}, stop_set=4, gallery=2, batch_size=8,\n"
        '    eval=dict(ann_file=data_root + "/eval/annotations.json",\n'
        '              img_dir=data_root + "/eval/images"),\n'
        "    train=dict(max_epochs=1, batch_size=2, min_epoch_items=4, num_workers=0),\n"
        ")\n"
    )
    first = root / "first"
    assert al_round.run([str(config), "--work-dir", str(first), "--train", "--no-progress"]) == 0
    return {"root": root, "config": config, "oracle": files["oracle"], "first": first}


def _digest(work: Path) -> str:
    return hashlib.sha256((work / DB_NAME).read_bytes()).hexdigest()


def _queried(work: Path, r: int = 0) -> list[str]:
    with Campaign.open(work / DB_NAME) as c:
        return [q.item for q in c.queries(r)]


def _answer(oracle: Path, items: list[str], out: Path) -> Path:
    """The simulated annotator: the true boxes of ``items`` as a COCO json."""
    out.write_text(json.dumps(_subset(json.loads(oracle.read_text()), items)))
    return out


def _xyxy(coco: dict[str, Any], name: str) -> np.ndarray:
    image = next(i for i in coco["images"] if i["file_name"] == name)
    boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == image["id"]]
    xywh = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)


def _import(demo: dict[str, Any], work: Path, labels: Path) -> int:
    argv = ["import", str(work), str(labels), "--config", str(demo["config"])]
    return int(campaign_tool.run(argv))


def test_a_round_records_queries_outputs_and_report(demo: dict[str, Any]) -> None:
    work = demo["first"]
    with Campaign.open(work / DB_NAME) as c:
        rounds, counts, meta = c.rounds(), c.counts(), c.meta()
        queries, stop, labels = c.queries(0), set(c.stop_set()), c.labels()
    assert meta["task"] == "det" and meta["classes"] == list(CLASSES)
    assert [r.state for r in rounds] == ["selected"]
    assert {"mAP", "labeled"} <= set(rounds[0].metrics)
    assert 0.0 <= rounds[0].metrics["mAP"] <= 1.0
    assert rounds[0].stop_predictions is not None
    present = np.load(io.BytesIO(rounds[0].stop_predictions))
    assert present.shape == (len(stop) * len(CLASSES),) and set(present.tolist()) <= {0, 1}
    assert rounds[0].metrics["labeled"] == NUM_LABELED
    expected = {"unlabeled": NUM_POOL - BUDGET, "queried": BUDGET, "partial": 0}
    assert counts == expected | {"labeled": NUM_LABELED, "stop_set": 4}
    assert len(queries) == BUDGET and not {q.item for q in queries} & stop
    truth = json.loads((demo["root"] / "data/labeled/annotations.json").read_text())
    name = truth["images"][0]["file_name"]
    np.testing.assert_allclose(boxes_of(labels[name][-1].value)[0], _xyxy(truth, name))
    out = work / "rounds" / "round_000" / "queries"
    listing = json.loads((out / "queries.json").read_text())
    assert [q["item"] for q in listing] == [q.item for q in queries]
    coco = json.loads((out / "queries_coco.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == [q.item for q in queries]
    assert [c["name"] for c in coco["categories"]] == list(CLASSES)
    assert all(a["score"] >= 0.3 for a in coco["annotations"])
    tasks = json.loads((out / "label_studio_tasks.json").read_text())
    assert [t["data"]["item"] for t in tasks] == [q.item for q in queries]
    assert (out / "config.py").is_file()
    html = (work / "report.html").read_text()
    assert "<img" in html and "http://" not in html


def test_labels_round_trip_into_the_next_round(demo: dict[str, Any], tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(demo["first"], work)
    queried = _queried(work)
    returned = _answer(demo["oracle"], queried, tmp_path / "returned.json")
    data = json.loads(returned.read_text())
    empty = next(i["id"] for i in data["images"] if i["file_name"] == queried[0])
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != empty]
    returned.write_text(json.dumps(data))  # the first image labeled empty: no boxes
    assert _import(demo, work, returned) == 0
    with Campaign.open(work / DB_NAME) as c:
        labels, counts = c.labels(), c.counts()
    assert counts["labeled"] == NUM_LABELED + BUDGET and counts["queried"] == 0
    assert boxes_of(labels[queried[0]][-1].value)[0].shape == (0, 4)
    oracle = json.loads(demo["oracle"].read_text())
    for item in queried[1:]:
        np.testing.assert_allclose(boxes_of(labels[item][-1].value)[0], _xyxy(oracle, item))
    before = _digest(work)
    assert _import(demo, work, returned) == 0  # the same labels again: a no-op
    assert _digest(work) == before
    argv = [str(demo["config"]), "--work-dir", str(work), "--train", "--no-progress"]
    assert al_round.run(argv) == 0
    with Campaign.open(work / DB_NAME) as c:
        second = c.rounds()[1]
        new = set(_queried(work, 1))
    assert second.metrics["labeled"] == NUM_LABELED + BUDGET  # trained on the imported labels
    assert len(new) == BUDGET and not new & set(queried)
    assert "kappa" in second.metrics


def _label_studio(oracle: Path, items: list[str]) -> list[dict[str, Any]]:
    """A Label Studio "JSON" export whose annotations draw the true boxes of ``items``."""
    coco = json.loads(oracle.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    tasks = []
    for item in items:
        image = next(i for i in coco["images"] if i["file_name"] == item)
        results = [
            {
                "type": "rectanglelabels",
                "from_name": "label",
                "to_name": "image",
                "original_width": SIZE,
                "original_height": SIZE,
                "value": {
                    "x": x / SIZE * 100,
                    "y": y / SIZE * 100,
                    "width": w / SIZE * 100,
                    "height": h / SIZE * 100,
                    "rectanglelabels": [names[a["category_id"]]],
                },
            }
            for a in coco["annotations"]
            if a["image_id"] == image["id"]
            for x, y, w, h in [a["bbox"]]
        ]
        annotation = {"result": results, "was_cancelled": False}
        tasks.append({"data": {"item": item, "image": item}, "annotations": [annotation]})
    return tasks


def test_a_label_studio_export_is_imported(demo: dict[str, Any], tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(demo["first"], work)
    queried = _queried(work)
    export = tmp_path / "export.json"
    export.write_text(json.dumps(_label_studio(demo["oracle"], queried)))
    assert _import(demo, work, export) == 0
    with Campaign.open(work / DB_NAME) as c:
        labels = c.labels()
    oracle = json.loads(demo["oracle"].read_text())
    for item in queried:
        stored = boxes_of(labels[item][-1].value)[0]
        np.testing.assert_allclose(stored, _xyxy(oracle, item), atol=1e-3)


def _refused(capsys: pytest.CaptureFixture[str], code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(("al_round: error:", "campaign: error:")), err
    return err[0]


def test_bad_labels_are_one_line_and_change_nothing(
    demo: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    shutil.copytree(demo["first"], work)
    before = _digest(work)
    queried = _queried(work)
    with Campaign.open(work / DB_NAME) as c:
        stop = c.stop_set()
    good = json.loads(_answer(demo["oracle"], queried, tmp_path / "good.json").read_text())
    unknown = json.loads(json.dumps(good))
    unknown["categories"].append({"id": 9, "name": "hexagon"})
    unknown["annotations"][0]["category_id"] = 9
    outside = json.loads(json.dumps(good))
    outside["annotations"][0]["bbox"] = [50, 50, 30, 30]
    stranger = json.loads(json.dumps(good))
    stranger["images"][0]["file_name"] = "not_an_image.png"
    cases: dict[str, Any] = {
        "'hexagon' (id 9) is not a class": unknown,
        "outside its image": outside,
        "'not_an_image.png' (file_name) is no image of the campaign": stranger,
        "was never queried": json.loads(
            _answer(demo["oracle"], stop[:1], tmp_path / "s").read_text()
        ),
        "is not JSON": "{not json",
    }
    for expected, content in cases.items():
        path = tmp_path / "returned.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        line = _refused(capsys, _import(demo, work, path))
        assert expected in line, line
        assert "never queried" in expected or line.endswith("nothing was imported"), line
        assert _digest(work) == before, expected


def test_box_queries_and_ensembles_are_refused(
    demo: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_campaign_config(demo["config"], {"al.query": "region"})
    with pytest.raises(CampaignError, match="box queries are not built yet"):
        task_kit(cfg, CampaignSettings.from_config(cfg.al.to_dict()))
    work = tmp_path / "work"
    argv = [str(demo["config"]), "--work-dir", str(work), "--train", "--no-progress"]
    line = _refused(capsys, al_round.run([*argv, "--cfg-options", "al.query=region"]))
    assert 'al.query = "item"' in line
    line = _refused(capsys, al_round.run([*argv, "--strategy", "vote_entropy"]))
    assert "deep ensemble" in line
    assert not (work / DB_NAME).exists()
