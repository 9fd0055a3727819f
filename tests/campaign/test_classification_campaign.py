"""tools/al_round.py and tools/campaign.py end to end on a classification campaign: torchvision's
ResNet-18 over a tiny ImageFolder (the shipped configs/campaign/resnet18_image_folder.py with
its paths and schedule shrunk): rounds, label round trips, checkpoints and bad input."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mmengine.config import Config
from PIL import Image

from taskal.campaign.settings import CampaignSettings, load_campaign_config
from taskal.campaign.store import DB_NAME, Campaign, CampaignError
from taskal.campaign.tasks import task_kit
from taskal.campaign.tasks.classification import ClassificationKit

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "configs" / "campaign" / "resnet18_image_folder.py"
CLASSES = ("blue", "green", "red")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
LABELED, POOL, EVAL, BUDGET, STOP = 6, 40, 15, 6, 8


def _tool(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(
        f"_cls_tool_{name}", ROOT / "tools" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


al_round, campaign_tool = _tool("al_round"), _tool("campaign")


def _image(rng: np.random.Generator, name: str, path: Path) -> None:
    pixels = np.asarray(COLOURS[name], np.float64) + rng.normal(0, 25, (16, 16, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def _make_data(root: Path) -> dict[str, str]:
    """Labeled and eval ImageFolders and a flat pool; returns the pool's true classes."""
    rng = np.random.default_rng(0)
    for split, count in (("labeled", LABELED), ("eval", EVAL // 3)):
        for name in CLASSES:
            for i in range(count):
                _image(rng, name, root / split / name / f"{i:02d}.png")
    truth = {}
    for i in range(POOL):
        truth[f"p{i:03d}.png"] = CLASSES[i % 3]
        _image(rng, truth[f"p{i:03d}.png"], root / "pool" / f"p{i:03d}.png")
    return truth


def _write_config(path: Path, data: Path, **al: Any) -> Path:
    settings = dict(
        pool=dict(img_dir=str(data / "pool")),
        labeled=dict(root=str(data / "labeled")),
        eval=dict(root=str(data / "eval")),
        strategy="entropy",
        budget=BUDGET,
        seed=0,
        stop_set=STOP,
        gallery=2,
        image_size=(16, 16),
        train=dict(epochs=2, batch_size=8, lr=1e-3, min_epoch_items=16),
    )
    settings.update(al)
    path.write_text(f'model = dict(type="torchvision", name="resnet18")\nal = {settings!r}\n')
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cls_campaign")
    truth = _make_data(root / "data")
    config = _write_config(root / "campaign.py", root / "data")
    first = root / "first"
    assert al_round.run([str(config), "--work-dir", str(first), "--train", "--no-progress"]) == 0
    return {"root": root, "data": root / "data", "config": config, "truth": truth, "first": first}


def _round(demo: dict[str, Any], work: Path, *extra: str, config: Path | None = None) -> int:
    cfg = str(config or demo["config"])
    return int(al_round.run([cfg, "--work-dir", str(work), "--no-progress", *extra]))


def _import(demo: dict[str, Any], work: Path, labels: Path) -> int:
    return int(
        campaign_tool.run(["import", str(work), str(labels), "--config", str(demo["config"])])
    )


def _digest(work: Path) -> str:
    return hashlib.sha256((work / DB_NAME).read_bytes()).hexdigest()


def _queried(work: Path, r: int) -> list[str]:
    with Campaign.open(work / DB_NAME) as c:
        return [q.item for q in c.queries(r)]


def _answers(demo: dict[str, Any], work: Path, r: int, path: Path) -> Path:
    path.write_text(json.dumps({k: demo["truth"][k] for k in _queried(work, r)}))
    return path


def _copy(demo: dict[str, Any], tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(demo["first"], work)
    return work


def test_the_shipped_config_is_a_classification_campaign() -> None:
    cfg = Config.fromfile(str(SHIPPED))
    assert "default_scope" not in cfg and cfg.model == dict(type="torchvision", name="resnet18")
    settings = CampaignSettings.from_config(cfg.al.to_dict())
    assert settings.budget == 20 and settings.image_size == (32, 32)
    with pytest.raises(CampaignError, match=r"al\.labeled\.root data/my_labeled is not a folder"):
        task_kit(cfg, settings).classes  # noqa: B018


def test_a_round_records_queries_outputs_and_report(demo: dict[str, Any]) -> None:
    work = demo["first"]
    with Campaign.open(work / DB_NAME) as c:
        rounds, counts, meta = c.rounds(), c.counts(), c.meta()
        queries, stop, labels = c.queries(0), set(c.stop_set()), c.labels()
    assert meta["task"] == "cls" and meta["classes"] == list(CLASSES)
    assert [r.state for r in rounds] == ["selected"]
    assert rounds[0].metrics["labeled"] == 3 * LABELED
    assert 0.0 <= rounds[0].metrics["accuracy"] <= 1.0
    assert labels["red/00.png"][0].value == b"2" and labels["blue/05.png"][0].kind == "class"
    expected = {"unlabeled": POOL - BUDGET, "queried": BUDGET, "partial": 0}
    assert counts == expected | {"labeled": 3 * LABELED, "stop_set": STOP}
    assert len(queries) == BUDGET and not {q.item for q in queries} & stop
    assert all(q.item in demo["truth"] for q in queries)
    out = work / "rounds" / "round_000" / "queries"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.py",
        "label_studio_config.xml",
        "label_studio_tasks.json",
        "queries.json",
        "queries_coco.json",
        "report.html",
        "report_files",
    ]
    listing = json.loads((out / "queries.json").read_text())
    assert [q["item"] for q in listing] == [q.item for q in queries]
    coco = json.loads((out / "queries_coco.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == [q.item for q in queries]
    assert {(i["width"], i["height"]) for i in coco["images"]} == {(16, 16)}
    assert [c["name"] for c in coco["categories"]] == list(CLASSES) and coco["annotations"] == []
    tasks = json.loads((out / "label_studio_tasks.json").read_text())
    assert [t["data"]["item"] for t in tasks] == [q.item for q in queries]
    choice = tasks[0]["predictions"][0]["result"][0]
    assert choice["type"] == "choices" and choice["value"]["choices"][0] in CLASSES
    html = (work / "report.html").read_text()
    assert "<img" in html and "accuracy" in html


def test_labels_round_trip_into_the_next_round(demo: dict[str, Any], tmp_path: Path) -> None:
    work = _copy(demo, tmp_path)
    answers = _answers(demo, work, 0, tmp_path / "answers.json")
    assert _import(demo, work, answers) == 0
    with Campaign.open(work / DB_NAME) as c:
        counts = c.counts()
        recorded = c.labels()
    assert counts["labeled"] == 3 * LABELED + BUDGET and counts["queried"] == 0
    item = _queried(work, 0)[0]
    assert recorded[item][-1].value == str(CLASSES.index(demo["truth"][item])).encode()
    assert recorded[item][-1].round == 0
    before = _digest(work)
    assert _import(demo, work, answers) == 0  # the same labels again: nothing changes
    assert _digest(work) == before

    assert _round(demo, work, "--train") == 0
    with Campaign.open(work / DB_NAME) as c:
        rounds, stop = c.rounds(), set(c.stop_set())
    assert [r.state for r in rounds] == ["selected", "selected"]
    assert rounds[1].metrics["labeled"] == 3 * LABELED + BUDGET
    assert 0.0 <= rounds[1].metrics["accuracy"] <= 1.0
    assert -1.0 <= rounds[1].metrics["kappa"] <= 1.0
    second = _queried(work, 1)
    assert len(set(second)) == BUDGET
    assert not set(second) & (set(_queried(work, 0)) | set(recorded) | stop)


def test_a_label_studio_export_imports(demo: dict[str, Any], tmp_path: Path) -> None:
    work = _copy(demo, tmp_path)
    tasks = json.loads((work / "rounds/round_000/queries/label_studio_tasks.json").read_text())
    for task in tasks[:2]:
        choice = {"choices": [demo["truth"][task["data"]["item"]]]}
        result = {"type": "choices", "from_name": "label", "to_name": "image", "value": choice}
        task["annotations"] = [{"result": [result], "was_cancelled": False}]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    assert _import(demo, work, export) == 0
    with Campaign.open(work / DB_NAME) as c:
        counts, recorded = c.counts(), c.labels()
    assert counts["labeled"] == 3 * LABELED + 2 and counts["queried"] == BUDGET - 2
    item = tasks[1]["data"]["item"]
    assert recorded[item][-1].value == str(CLASSES.index(demo["truth"][item])).encode()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("cat", r"labelled 'cat', not one of the classes"),
        (7, r"give a class name or an index in 0\.\.2"),
        (None, r"'nowhere\.png' is no image of the campaign"),
    ],
)
def test_bad_labels_are_refused_and_nothing_changes(
    demo: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    answer: Any,
    message: str,
) -> None:
    work = demo["first"]
    labels = {k: demo["truth"][k] for k in _queried(work, 0)}
    if answer is None:
        labels["nowhere.png"] = "red"
    else:
        labels[next(iter(labels))] = answer
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(labels))
    before = _digest(work)
    capsys.readouterr()
    assert _import(demo, work, path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("campaign: error: ")
    assert err.rstrip().endswith("; nothing was imported")
    assert re.search(message, err)
    assert _digest(work) == before


def test_a_checkpoint_selects_what_the_trained_round_selected(
    demo: dict[str, Any], tmp_path: Path
) -> None:
    model = demo["first"] / "rounds" / "round_000" / "model.pth"
    assert _round(demo, tmp_path / "ckpt", "--checkpoint", str(model)) == 0
    assert _queried(tmp_path / "ckpt", 0) == _queried(demo["first"], 0)
    with Campaign.open(tmp_path / "ckpt" / DB_NAME) as c:
        (row,) = c.rounds()
    assert row.checkpoint == str(model)
    with Campaign.open(demo["first"] / DB_NAME) as c:
        trained = c.rounds()[0]
    assert row.metrics["accuracy"] == trained.metrics["accuracy"]


def test_training_is_reproducible(demo: dict[str, Any], tmp_path: Path) -> None:
    assert _round(demo, tmp_path / "again", "--train") == 0
    assert _queried(tmp_path / "again", 0) == _queried(demo["first"], 0)
    weights = [
        torch.load(w / "rounds/round_000/model.pth", weights_only=True)["state_dict"]
        for w in (demo["first"], tmp_path / "again")
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_llal_trains_and_reloads_its_loss_predictor(demo: dict[str, Any], tmp_path: Path) -> None:
    assert _round(demo, tmp_path / "llal", "--train", "--strategy", "llal") == 0
    model = tmp_path / "llal" / "rounds" / "round_000" / "model.pth"
    args = ("--checkpoint", str(model), "--strategy", "llal")
    assert _round(demo, tmp_path / "again", *args) == 0
    assert _queried(tmp_path / "again", 0) == _queried(tmp_path / "llal", 0)
    # the checkpoint holds the loss predictor: without it the keys do not match
    assert _round(demo, tmp_path / "plain", "--checkpoint", str(model)) == 2


def test_ensembles_and_missing_classes_are_refused_before_a_round(
    demo: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "w"
    assert _round(demo, work, "--train", "--strategy", "vote_entropy") == 2
    assert "do not support" in capsys.readouterr().err and not work.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = _write_config(tmp_path / "bad.py", demo["data"], labeled=dict(root=str(empty)))
    assert _round(demo, work, "--train", config=bad) == 2
    assert "has no class sub-folders" in capsys.readouterr().err and not work.exists()


def test_given_classes_and_a_mismatched_eval_set(demo: dict[str, Any], tmp_path: Path) -> None:
    names = ["blue", "green", "red", "yellow"]
    cfg_path = _write_config(
        tmp_path / "c.py",
        demo["data"],
        labeled=dict(root=str(demo["data"] / "labeled"), classes=names),
    )
    cfg = load_campaign_config(cfg_path)
    kit = task_kit(cfg, CampaignSettings.from_config(cfg.al.to_dict()))
    assert isinstance(kit, ClassificationKit) and kit.classes == names
    files, labels = kit.initial()
    assert len(files) == 3 * LABELED and {x.value for x in labels} == {b"0", b"1", b"2"}
    (tmp_path / "eval" / "purple").mkdir(parents=True)
    with pytest.raises(CampaignError, match=r"class folders \['purple'\]"):
        kit._eval_set({"root": str(tmp_path / "eval")})


def test_grayscale_images_get_a_one_channel_model(demo: dict[str, Any], tmp_path: Path) -> None:
    labeled = dict(root=str(demo["data"] / "labeled"), grayscale=True)
    cfg = load_campaign_config(_write_config(tmp_path / "g.py", demo["data"], labeled=labeled))
    kit = task_kit(cfg, CampaignSettings.from_config(cfg.al.to_dict()))
    files, _ = kit.initial()
    pool = kit.pool(files)
    batch = pool.take(pool.ids[:2])
    assert isinstance(batch.inputs, torch.Tensor) and batch.inputs.shape == (2, 1, 16, 16)
    probs = kit._adapter().predict(batch).probs_UCK
    assert probs.shape == (2, 3, 1)


# ---- crash safety, concurrency and refusals (the round engine, through a cheap task) ----


@pytest.mark.parametrize("strategy", ["random", "coreset"])
def test_strategies_without_scores_record_their_queries(
    demo: dict[str, Any], tmp_path: Path, strategy: str
) -> None:
    work = tmp_path / "work"
    assert _round(demo, work, "--train", "--strategy", strategy) == 0
    with Campaign.open(work / DB_NAME) as c:
        queries = c.queries(0)
        assert [r.state for r in c.rounds()] == ["selected"]
    assert len(queries) == BUDGET and all(np.isnan(q.score) for q in queries)


def test_a_second_process_is_refused_while_one_holds_the_campaign(
    demo: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from taskal.campaign.store import campaign_lock

    work = _copy(demo, tmp_path)
    before = _digest(work)
    with campaign_lock(work):
        assert _round(demo, work, "--train") == 2
        answers = _answers(demo, work, 0, tmp_path / "answers.json")
        assert _import(demo, work, answers) == 2
    err = capsys.readouterr().err
    assert err.count("another process is working on the campaign") == 2
    assert _digest(work) == before


def test_a_failed_first_run_leaves_no_campaign(demo: dict[str, Any], tmp_path: Path) -> None:
    work = tmp_path / "work"
    assert _round(demo, work, "--train", "--budget", "1000") == 2
    assert _round(demo, work, "--train", "--checkpoint", str(tmp_path / "x.pth")) == 2
    assert not (work / DB_NAME).exists()


def test_the_import_config_must_name_the_campaigns_classes(
    demo: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = _copy(demo, tmp_path)
    before = _digest(work)
    other = _write_config(tmp_path / "other.py", demo["data"])
    text = other.read_text().replace(
        "'labeled': {'root'", "'labeled': {'classes': ['red', 'green', 'blue'], 'root'"
    )
    other.write_text(text)
    answers = _answers(demo, work, 0, tmp_path / "answers.json")
    argv = ["import", str(work), str(answers), "--config", str(other)]
    assert campaign_tool.run(argv) == 2
    assert "classes" in capsys.readouterr().err
    assert _digest(work) == before


def test_overwrite_can_give_a_label_back(demo: dict[str, Any], tmp_path: Path) -> None:
    work = _copy(demo, tmp_path)
    item = _queried(work, 0)[0]
    argv = ["import", str(work), "", "--config", str(demo["config"])]
    for k, name in enumerate(["red", "blue", "red"]):
        labels = tmp_path / f"labels_{k}.json"
        labels.write_text(json.dumps({item: name}))
        argv[2] = str(labels)
        assert campaign_tool.run(argv + (["--overwrite"] if k else [])) == 0
    with Campaign.open(work / DB_NAME) as c:
        history = [row.value for row in c.labels()[item]]
    assert history == [b"2", b"0", b"2"]  # red, blue, red: every label kept, the last current


def test_empty_imports_are_refused(
    demo: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = _copy(demo, tmp_path)
    before = _digest(work)
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    assert _import(demo, work, empty) == 2
    assert "holds no labels" in capsys.readouterr().err
    assert _digest(work) == before


def test_train_and_checkpoint_together_are_refused(
    demo: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = str(demo["first"] / "rounds" / "round_000" / "model.pth")
    assert _round(demo, tmp_path / "w", "--train", "--checkpoint", ckpt) == 2
    assert "not both" in capsys.readouterr().err


def test_resume_is_not_changed_by_new_images_or_imports(
    demo: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import subprocess
    import sys

    from taskal.campaign.round import KILL_AT_ENV

    data = tmp_path / "data"
    shutil.copytree(demo["data"], data)
    config = _write_config(tmp_path / "campaign.py", data)
    reference, work = tmp_path / "reference", tmp_path / "work"
    env = dict(os.environ, **{KILL_AT_ENV: "trained", "OMP_NUM_THREADS": "1"})
    cmd = [sys.executable, str(ROOT / "tools" / "al_round.py"), str(config)]
    cmd += ["--work-dir", str(work), "--train", "--no-progress"]
    assert subprocess.run(cmd, env=env, capture_output=True, cwd=ROOT).returncode == -9
    model = work / "rounds" / "round_000" / "model.pth"
    # what the interrupted round's model selects from the pool it started with
    assert _round(demo, reference, "--checkpoint", str(model), config=config) == 0
    shutil.copyfile(data / "pool" / "p000.png", data / "pool" / "zz_new.png")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"p000.png": "red"}))
    argv = ["import", str(work), str(labels), "--config", str(config)]
    assert campaign_tool.run(argv) == 2  # a round is under way
    assert "under way" in capsys.readouterr().err
    assert _round(demo, work, "--train", "--resume", config=config) == 0
    assert _queried(work, 0) == _queried(reference, 0)
    with Campaign.open(work / DB_NAME) as c:
        assert "zz_new.png" not in c.items()
    assert (work / "rounds" / "round_000" / "queries" / "report.html").is_file()
    assert model.is_file()


def test_resume_loads_its_own_checkpoint_weights_only(
    demo: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import subprocess
    import sys

    from taskal.campaign.round import KILL_AT_ENV

    work = tmp_path / "work"
    env = dict(os.environ, **{KILL_AT_ENV: "trained", "OMP_NUM_THREADS": "1"})
    cmd = [sys.executable, str(ROOT / "tools" / "al_round.py"), str(demo["config"])]
    cmd += ["--work-dir", str(work), "--train", "--no-progress"]
    assert subprocess.run(cmd, env=env, capture_output=True, cwd=ROOT).returncode == -9
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    torch.save(
        {"state_dict": {"x": torch.zeros(1)}, "meta": Payload()},
        work / "rounds" / "round_000" / "model.pth",
    )
    assert _round(demo, work, "--train", "--resume") == 2
    assert "trusted" in capsys.readouterr().err
    assert not marker.exists()


def test_label_studio_tasks_name_images_by_the_given_url(
    demo: dict[str, Any], tmp_path: Path
) -> None:
    work = tmp_path / "work"
    prefix = "/data/local-files/?d=pool/"
    ckpt = str(demo["first"] / "rounds" / "round_000" / "model.pth")
    assert _round(demo, work, "--checkpoint", ckpt, "--cfg-options", f"al.image_url={prefix}") == 0
    out = work / "rounds" / "round_000" / "queries" / "label_studio_tasks.json"
    tasks = json.loads(out.read_text())
    assert [t["data"]["image"] for t in tasks] == [prefix + q for q in _queried(work, 0)]


def test_torchrun_scores_on_two_processes_and_selects_what_one_selects(
    demo: dict[str, Any], tmp_path: Path
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    tool = str(ROOT / "tools" / "al_round.py")
    args = [str(demo["config"]), "--train", "--strategy", "bald", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, tool, *args, "--work-dir", str(one)], check=True, env=env)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run(
        [*launch, tool, *args, "--work-dir", str(two)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("[al_round] round 0:") == 1  # rank 0 alone reports
    listing = "rounds/round_000/queries/queries.json"
    assert json.loads((two / listing).read_text()) == json.loads((one / listing).read_text())
    assert not (two / "rounds" / "round_000" / "scores").exists()  # removed once recorded
    # a user's mistake on rank 0 releases the other rank: one line, no hang
    bad = subprocess.run(
        [*launch, tool, *args, "--work-dir", str(two), "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0
    assert "nothing to resume" in bad.stderr
