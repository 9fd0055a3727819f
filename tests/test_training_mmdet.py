"""Training mmdet detectors through mmengine's Runner on a pool's labeled images.

The detector is ``configs/det/retinanet_r18_synthetic.py`` (mmdet's shipped RetinaNet R-18,
inherited) shrunk further for a test: 16 base channels, a 32-channel FPN, one head
convolution, no resize of the 64x64 images, a short warm-up and gradient clipping (mmdet's
R-18 from scratch with frozen-BN diverges without it at this learning rate).
"""

from __future__ import annotations

import copy
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from mmdet.registry import DATASETS
from mmengine.config import Config
from mmengine.logging import MessageHub
from mmengine.registry import DefaultScope
from torch import nn
from torchvision.ops import box_iou

from taskal.adapters import MMDetAdapter
from taskal.data import CocoDetectionPool, load_coco_detection, make_synthetic_detection
from taskal.registry import MODELS, build
from taskal.training_mmdet import (
    LABELED_ANN_FILE,
    MMDetTrainConfig,
    resolve_config,
    train_mmdet,
    write_labeled_coco,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*has no dropout with p > 0")

REPO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "det" / "retinanet_r18_synthetic.py"
CLASSES = ("circle", "square", "triangle")

TINY = f"""
_base_ = {str(REPO_CONFIG)!r}
model = dict(
    backbone=dict(base_channels=16),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    bbox_head=dict(in_channels=32, feat_channels=32, stacked_convs=1),
    test_cfg=dict(nms_pre=100, max_per_img=10))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='PackDetInputs')]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
optim_wrapper = dict(clip_grad=dict(max_norm=10, norm_type=2))
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10)]
log_level = 'WARNING'
"""

#: the training every test of the trained model shares: 8 images x 8 repeats / 4 per batch
#: = 16 steps per epoch, 8 epochs.
FIT = dict(max_epochs=8, batch_size=4, lr=0.02, min_epoch_items=64)


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
def pool(tmp_path_factory: pytest.TempPathFactory) -> CocoDetectionPool:
    root = tmp_path_factory.mktemp("shapes")
    files = make_synthetic_detection(
        root,
        num_images=8,
        image_size=(64, 64),
        classes=CLASSES,
        objects_per_image=(1, 2),
        object_scale=(0.3, 0.6),
        seed=1,
    )
    return load_coco_detection(files.ann_file, files.img_dir)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    path = tmp_path_factory.mktemp("configs") / "tiny_retinanet.py"
    path.write_text(TINY)
    return Config.fromfile(str(path))


def _fresh_model(cfg: Config, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return build(MODELS, dict(cfg.model))


def _files(*roots: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for r in roots for p in r.rglob("*") if p.is_file()}


def _rng_states() -> tuple[Any, ...]:
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


class Trained(NamedTuple):
    model: nn.Module
    given: nn.Module
    work_dir: Path
    outside: tuple[dict[Path, int], dict[Path, int]]  # files outside work_dir before, after
    loss_before: torch.Tensor  # per image, adapter.per_sample_loss on the labeled images
    loss_after: torch.Tensor
    logged: np.ndarray  # the runner's loss per iteration
    rng: tuple[tuple[Any, ...], tuple[Any, ...]]  # global RNG states before, after


@pytest.fixture(scope="module")
def trained(
    pool: CocoDetectionPool, cfg: Config, tmp_path_factory: pytest.TempPathFactory
) -> Trained:
    """A fresh detector (initialised by its config) trained in place on all 8 images, run
    from an empty working folder with the work dir elsewhere."""
    model = _fresh_model(cfg)
    model.init_weights()  # the config's init (RetinaNet's prior bias), kept by train_mmdet
    batch = pool.take(pool.ids)
    before = MMDetAdapter(copy.deepcopy(model)).per_sample_loss(batch)
    cwd, work_dir = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("runs") / "r0"
    outside = (cwd, Path(pool.img_dir).parent)
    files_before, rng_before = _files(*outside), _rng_states()
    old_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        out = train_mmdet(
            cfg, pool, pool.ids, MMDetTrainConfig(work_dir, **FIT), seed=0, model=model
        )
    finally:
        os.chdir(old_cwd)
    logged = np.asarray(MessageHub.get_current_instance().get_scalar("train/loss").data[0])
    after = MMDetAdapter(out).per_sample_loss(batch)
    return Trained(
        out,
        model,
        work_dir,
        (files_before, _files(*outside)),
        before,
        after,
        logged,
        (rng_before, _rng_states()),
    )


def test_training_decreases_the_loss(trained: Trained) -> None:
    """Measured: mean per-image loss 1.88 -> 0.62 (adapter), mean logged step loss of the
    first epoch 1.71 -> last epoch 0.72."""
    assert len(trained.logged) == 8 * 16
    first, last = trained.logged[:16].mean(), trained.logged[-16:].mean()
    assert np.isfinite(trained.logged).all()
    assert last < 0.6 * first, (first, last)
    before, after = trained.loss_before.mean(), trained.loss_after.mean()
    assert after < 0.6 * before, (before, after)


def test_the_model_is_trained_in_place_and_returned_in_eval_mode(trained: Trained) -> None:
    assert trained.model is trained.given
    assert not trained.model.training


def test_detections_overlap_the_ground_truth_of_train_images(
    trained: Trained, pool: CocoDetectionPool
) -> None:
    """Through the adapter (RGB [0, 1] tensors -> BGR 0..255, as LoadImageFromFile reads the
    PNGs for training): the top detection of most images is on a ground-truth box (7 of 8
    measured). Which shape it is takes longer to learn: after these 128 steps every
    detection is a circle, the most frequent class."""
    batch = pool.take(pool.ids)
    pred = MMDetAdapter(trained.model).predict(batch)
    assert pred.boxes_U4 is not None
    hits = 0
    for i, target in enumerate(batch.data_samples or []):
        mine = (pred.owner_U == i).nonzero()[:, 0]
        if len(mine) == 0:
            continue
        top = mine[pred.probs_UCK[mine, :, 0].max(1).values.argmax()]
        hits += int(box_iou(pred.boxes_U4[top][None], target["boxes"]).max() >= 0.4)
    assert hits >= 5, f"the top detection is a ground-truth box in {hits} of 8 images"


def test_the_labeled_file_holds_exactly_the_labeled_images(
    trained: Trained, pool: CocoDetectionPool, tmp_path: Path
) -> None:
    written = json.loads((trained.work_dir / LABELED_ANN_FILE).read_text())
    assert [img["file_name"] for img in written["images"]] == pool.ids
    ids = pool.ids[2:5]
    path = write_labeled_coco(pool, ids, tmp_path / "subset.json")
    data = json.loads(path.read_text())
    image_ids = {pool.image_id(i) for i in ids}
    assert [img["file_name"] for img in data["images"]] == ids
    want = [a for a in pool.coco.dataset["annotations"] if a["image_id"] in image_ids]
    assert sorted(data["annotations"], key=lambda a: a["id"]) == want
    assert data["categories"] == pool.coco.dataset["categories"]


def test_nothing_is_written_outside_the_work_dir(trained: Trained) -> None:
    before, after = trained.outside
    assert after == before
    written = {p.relative_to(trained.work_dir).parts[0] for p in trained.work_dir.rglob("*")}
    assert LABELED_ANN_FILE in written
    assert not any(p.suffix == ".pth" for p in trained.work_dir.rglob("*")), "no checkpoint"
    images = [p for p in trained.work_dir.rglob("*") if p.suffix in (".png", ".jpg")]
    assert not images


def test_the_global_rng_states_are_restored(trained: Trained) -> None:
    (py0, np0, torch0), (py1, np1, torch1) = trained.rng
    assert py0 == py1 and np.array_equal(np0, np1) and torch.equal(torch0, torch1)


def _short(work_dir: Path, **kw: Any) -> MMDetTrainConfig:
    """One step: 4 images, one batch."""
    args = dict(max_epochs=1, batch_size=4, lr=0.01, min_epoch_items=0) | kw
    return MMDetTrainConfig(work_dir, **args)


def test_a_fresh_model_from_the_config_is_seeded(
    pool: CocoDetectionPool, cfg: Config, tmp_path: Path
) -> None:
    ids = pool.ids[:4]

    def run(seed: int, name: str, **kw: Any) -> dict[str, torch.Tensor]:
        model = train_mmdet(cfg, pool, ids, _short(tmp_path / name, **kw), seed=seed)
        assert not model.training
        return model.state_dict()

    a, b, c = run(0, "a"), run(0, "b"), run(1, "c", save_checkpoint=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    (saved,) = (tmp_path / "c").glob("*.pth")
    checkpoint = torch.load(saved, weights_only=False)  # written by this test's run
    assert "state_dict" in checkpoint and "optimizer" not in checkpoint
    assert not list((tmp_path / "a").glob("*.pth"))
    bias = a["bbox_head.retina_cls.bias"]  # RetinaNet's prior init, from the config
    assert torch.allclose(bias, torch.full_like(bias, -4.595), atol=0.05)


def test_a_given_model_keeps_its_weights_once_initialised(
    pool: CocoDetectionPool, cfg: Config, tmp_path: Path
) -> None:
    """A trained (``is_init``) model is not re-initialised; a fresh one gets its config's init."""
    fresh, done = _fresh_model(cfg), _fresh_model(cfg, seed=1)
    done.is_init = True
    weights = {k: v.clone() for k, v in done.state_dict().items()}
    tiny = _short(tmp_path / "a", lr=1e-8)
    train_mmdet(cfg, pool, pool.ids[:4], tiny, seed=0, model=done)
    assert all(torch.allclose(weights[k], v, atol=1e-5) for k, v in done.state_dict().items())
    train_mmdet(cfg, pool, pool.ids[:4], _short(tmp_path / "b", lr=1e-8), seed=0, model=fresh)
    bias = fresh.state_dict()["bbox_head.retina_cls.bias"]
    assert torch.allclose(bias, torch.full_like(bias, -4.595), atol=0.05)


def test_labels_follow_the_pools_order_whatever_the_json_order(
    pool: CocoDetectionPool, tmp_path: Path, cfg: Config
) -> None:
    """Category ids 7, 3, 5 listed in that order: the pool's labels (ids sorted) are mmdet's."""
    data = copy.deepcopy(pool.coco.dataset)
    new_id = {1: 7, 2: 3, 3: 5}
    for cat in data["categories"]:
        cat["id"] = new_id[cat["id"]]
    for ann in data["annotations"]:
        ann["category_id"] = new_id[ann["category_id"]]
    (tmp_path / "shuffled.json").write_text(json.dumps(data))
    shuffled = load_coco_detection(tmp_path / "shuffled.json", pool.img_dir)
    assert shuffled.classes == ["square", "triangle", "circle"]
    ann_file = write_labeled_coco(shuffled, shuffled.ids, tmp_path / "labeled.json")
    run_cfg = resolve_config(cfg, shuffled, ann_file, _short(tmp_path / "wd"), seed=0)
    with DefaultScope.overwrite_default_scope("mmdet"):
        dataset = DATASETS.build(run_cfg.train_dataloader.dataset)
    assert len(dataset) == len(shuffled)
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        target = shuffled.target(Path(info["img_path"]).name)
        labels = [inst["bbox_label"] for inst in info["instances"]]
        assert labels == target["labels"].tolist()
        sample = dataset[i]["data_samples"]
        assert sample.gt_instances.labels.tolist() == labels


def test_resolved_config(pool: CocoDetectionPool, cfg: Config, tmp_path: Path) -> None:
    ann_file = write_labeled_coco(pool, pool.ids[:3], tmp_path / "labeled.json")
    train = MMDetTrainConfig(tmp_path / "wd", min_epoch_items=10, save_checkpoint=True)
    out = resolve_config(cfg, pool, ann_file, train, seed=7)
    assert cfg.train_dataloader.dataset.ann_file == "annotations.json", "cfg is not modified"
    assert out.train_cfg.max_epochs == 12 and out.train_dataloader.batch_size == 2
    assert out.optim_wrapper.optimizer.lr == 0.01  # the shipped config's
    dataset = out.train_dataloader.dataset
    assert dataset.type == "RepeatDataset" and dataset.times == 4  # ceil(10 / 3)
    assert dataset.dataset.pipeline == cfg.train_dataloader.dataset.pipeline
    assert dataset.dataset.metainfo == dict(classes=CLASSES)
    assert all(out[k] is None for k in ("val_dataloader", "val_cfg", "test_dataloader"))
    assert out.randomness == dict(seed=7, deterministic=False)
    assert out.default_hooks.checkpoint.save_optimizer is False
    assert "visualization" not in out.default_hooks
    assert out.visualizer.vis_backends == [dict(type="LocalVisBackend")]
    other = resolve_config(cfg, pool, ann_file, train, seed=7)
    assert other.experiment_name != out.experiment_name
    mine = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations"),
        dict(type="PackDetInputs"),
    ]
    custom = MMDetTrainConfig(tmp_path / "wd", min_epoch_items=0, pipeline=mine)
    assert (
        resolve_config(cfg, pool, ann_file, custom, seed=7).train_dataloader.dataset.pipeline
        == mine
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model.backbone.init_cfg", dict(type="Pretrained", checkpoint="https://x/r18.pth")),
        (
            "model.neck.init_cfg",
            [dict(type="Xavier"), dict(type="Pretrained", checkpoint="s3://n")],
        ),
        ("load_from", "http://x/retinanet.pth"),
    ],
)
def test_downloads_are_refused(
    pool: CocoDetectionPool, cfg: Config, tmp_path: Path, key: str, value: Any
) -> None:
    bad = copy.deepcopy(cfg)
    *parents, last = key.split(".")
    node = bad
    for name in parents:
        node = node[name]
    node[last] = value
    with pytest.raises(ValueError, match=rf"asks for a download: {key}.*Set {key}=None"):
        train_mmdet(bad, pool, pool.ids, _short(tmp_path / "wd"), seed=0)
    assert not any(tmp_path.iterdir()), "nothing is written"


def test_the_shipped_config_asks_for_torchvision_weights(
    pool: CocoDetectionPool, tmp_path: Path
) -> None:
    (tmp_path / "shipped.py").write_text("_base_ = 'mmdet::retinanet/retinanet_r18_fpn_1x_coco.py'")
    shipped = Config.fromfile(str(tmp_path / "shipped.py"))
    with pytest.raises(ValueError, match=r"model\.backbone\.init_cfg.*torchvision://resnet18"):
        train_mmdet(shipped, pool, pool.ids, _short(tmp_path / "wd"), seed=0)


def test_a_given_model_that_would_download_is_refused(
    pool: CocoDetectionPool, cfg: Config, tmp_path: Path
) -> None:
    bad = copy.deepcopy(cfg)
    bad.model.backbone.init_cfg = dict(type="Pretrained", checkpoint="torchvision://resnet18")
    with pytest.raises(ValueError, match=r"model\.backbone\.init_cfg"):
        train_mmdet(cfg, pool, pool.ids, _short(tmp_path), seed=0, model=_fresh_model(bad))


def test_errors(pool: CocoDetectionPool, cfg: Config, tmp_path: Path) -> None:
    short = _short(tmp_path)
    with pytest.raises(ValueError, match="at least one labeled image"):
        train_mmdet(cfg, pool, [], short, seed=0)
    with pytest.raises(ValueError, match=r"not items of the pool.*nope\.png"):
        train_mmdet(cfg, pool, [pool.ids[0], "nope.png"], short, seed=0)
    with pytest.raises(ValueError, match="labeled ids repeat"):
        train_mmdet(cfg, pool, [pool.ids[0]] * 2, short, seed=0)
    iters = copy.deepcopy(cfg)
    iters.train_cfg = dict(type="IterBasedTrainLoop", max_iters=10)
    with pytest.raises(ValueError, match="epoch-based train_cfg"):
        train_mmdet(iters, pool, pool.ids, short, seed=0)
    both = copy.deepcopy(cfg)
    both.load_from = str(tmp_path / "local.pth")
    with pytest.raises(ValueError, match="both a model and load_from"):
        train_mmdet(both, pool, pool.ids, short, seed=0, model=_fresh_model(cfg))
    five = copy.deepcopy(cfg)
    five.model.bbox_head.num_classes = 5
    with pytest.raises(ValueError, match=r"bbox_head has num_classes=5 but the pool has 3"):
        train_mmdet(five, pool, pool.ids, short, seed=0)


def test_no_image_left_after_the_configs_filter(
    pool: CocoDetectionPool, cfg: Config, tmp_path: Path
) -> None:
    big = copy.deepcopy(cfg)
    big.train_dataloader.dataset.filter_cfg = dict(filter_empty_gt=True, min_size=100)
    with pytest.raises(ValueError, match=r"no labeled image is left.*filter_cfg"):
        train_mmdet(big, pool, pool.ids, _short(tmp_path), seed=0)


def test_a_diverging_loss_stops_with_advice(
    pool: CocoDetectionPool, cfg: Config, tmp_path: Path
) -> None:
    wild = copy.deepcopy(cfg)
    wild.optim_wrapper.pop("clip_grad")
    train = MMDetTrainConfig(tmp_path, max_epochs=3, batch_size=4, lr=1e4, min_epoch_items=8)
    with pytest.raises(FloatingPointError, match=r"Lower MMDetTrainConfig\.lr"):
        train_mmdet(wild, pool, pool.ids, train, seed=0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("work_dir", "", "work_dir must be a folder path"),
        ("max_epochs", 0, "max_epochs must be an int >= 1 or None"),
        ("batch_size", 1.5, "batch_size must be an int >= 1 or None"),
        ("lr", 0.0, "lr must be a finite number > 0 or None"),
        ("lr", float("inf"), "lr must be a finite number > 0 or None"),
        ("min_epoch_items", -1, "min_epoch_items must be an int >= 0"),
        ("num_workers", -1, "num_workers must be an int >= 0 or None"),
        ("pipeline", [dict(scale=1)], "pipeline must be None or a list of transform dicts"),
    ],
)
def test_config_validation(field: str, value: Any, message: str) -> None:
    args: dict[str, Any] = {"work_dir": "w", field: value}
    with pytest.raises(ValueError, match=message):
        MMDetTrainConfig(**args)


def test_the_repository_config_loads_and_builds() -> None:
    """``configs/det/retinanet_r18_synthetic.py``: mmdet's RetinaNet R-18 schedule and model,
    3 synthetic classes, no download, CPU-sized images."""
    cfg = Config.fromfile(str(REPO_CONFIG))
    assert cfg.model.backbone.init_cfg is None and cfg.model.backbone.depth == 18
    assert cfg.train_cfg.max_epochs == 12 and cfg.optim_wrapper.optimizer.lr == 0.01
    assert tuple(cfg.train_dataloader.dataset.metainfo.classes) == CLASSES
    resize = [t for t in cfg.train_dataloader.dataset.pipeline if t.type == "Resize"]
    assert resize[0].scale == (96, 96)
    model = build(MODELS, dict(cfg.model))
    assert type(model).__name__ == "RetinaNet"
    assert model.bbox_head.num_classes == len(CLASSES)
