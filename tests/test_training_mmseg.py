"""Training mmseg segmentors through mmengine's Runner on a pool's full or partial labels.

The segmentor is mmseg's shipped DRIVE UNet (``unet-s5-d16_fcn_4xb4-40k_drive-64x64.py``),
inherited and shrunk as in the adapter's tests (8 base channels, BN, 4 classes, whole-image
inference), trained on 8 synthetic 32x32 images at their own size
(:data:`~taskal.training_mmseg.SMALL_IMAGE_PIPELINE`).
"""

from __future__ import annotations

import copy
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.logging import MessageHub
from mmengine.registry import DefaultScope
from mmseg.registry import DATASETS
from PIL import Image
from torch import nn

from taskal.adapters import MMSegAdapter
from taskal.adapters._segmentation import PixelRegions
from taskal.data import SegmentationPool, load_segmentation_folder, make_synthetic_segmentation
from taskal.partial import PartialSegmentationPool
from taskal.queries import LabelState
from taskal.registry import MODELS, build
from taskal.training_mmseg import (
    LABELED_DIR,
    SMALL_IMAGE_PIPELINE,
    MMSegTrainConfig,
    resolve_config,
    train_mmseg,
    write_labeled_masks,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*has no dropout with p > 0")

CLASSES = ("background", "liver", "kidney", "lesion")
TINY = """
_base_ = 'mmseg::unet/unet-s5-d16_fcn_4xb4-40k_drive-64x64.py'
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    type='mmseg.EncoderDecoder',
    data_preprocessor=dict(size=None, size_divisor=16),
    backbone=dict(base_channels=8, norm_cfg=norm_cfg),
    decode_head=dict(in_channels=8, channels=8, num_classes=4, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=16, channels=8, num_classes=4, norm_cfg=norm_cfg),
    test_cfg=dict(_delete_=True, mode='whole'))
log_level = 'WARNING'
"""
#: 8x8 patches of the 32x32 images: region ids 0..15, row-major.
REGIONS = PixelRegions(patch=8)
#: the shared training: 40 steps of 4 images.
FIT: dict[str, Any] = dict(
    max_iters=40, batch_size=4, lr=0.01, num_workers=0, pipeline=SMALL_IMAGE_PIPELINE
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny maps: a second thread only adds synchronisation on a busy two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def tmp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh folder with a short path: the Runner writes its config out through yapf,
    whose time grows fast with the length of the paths in it (seconds for pytest's
    test-named folders)."""
    return tmp_path_factory.mktemp("t")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> SegmentationPool:
    files = make_synthetic_segmentation(
        tmp_path_factory.mktemp("organs"), num_images=8, image_size=(32, 32), classes=CLASSES
    )
    return load_segmentation_folder(files.img_dir, files.ann_dir, CLASSES)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    path = tmp_path_factory.mktemp("configs") / "tiny_unet.py"
    path.write_text(TINY)
    return Config.fromfile(str(path))


def _state(pool: SegmentationPool) -> LabelState:
    """Items 0-3 fully labeled; 4-6 in a few patches; 7 unlabeled."""
    ids = pool.ids
    return LabelState(full=set(ids[:4]), partial={ids[4]: {0, 5}, ids[5]: {10}, ids[6]: {3, 12}})


@pytest.fixture(scope="module")
def partial(pool: SegmentationPool) -> PartialSegmentationPool:
    return PartialSegmentationPool(pool, _state(pool), REGIONS)


def _fresh_model(cfg: Config, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return build(MODELS, dict(cfg.model))


def _files(*roots: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for r in roots for p in r.rglob("*") if p.is_file()}


def _rng_states() -> tuple[Any, ...]:
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


def _short(work_dir: Path, **kw: Any) -> MMSegTrainConfig:
    """One step of 4 images, no flip: the same batch whatever the seed."""
    args = dict(FIT, max_iters=1, pipeline=_NO_FLIP) | kw
    return MMSegTrainConfig(work_dir, **args)


_NO_FLIP = [t for t in SMALL_IMAGE_PIPELINE if t["type"] != "RandomFlip"]


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
    pool: SegmentationPool, cfg: Config, tmp_path_factory: pytest.TempPathFactory
) -> Trained:
    """A fresh UNet trained in place on all 8 images, run from an empty working folder."""
    model = _fresh_model(cfg)
    model.init_weights()
    batch = pool.take(pool.ids)
    before = MMSegAdapter(copy.deepcopy(model)).per_sample_loss(batch)
    cwd, work_dir = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("runs") / "r0"
    outside = (cwd, Path(pool.img_dir).parent)
    files_before, rng_before = _files(*outside), _rng_states()
    old_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        out = train_mmseg(cfg, pool, pool.ids, MMSegTrainConfig(work_dir, **FIT), 0, model)
    finally:
        os.chdir(old_cwd)
    logged = np.asarray(MessageHub.get_current_instance().get_scalar("train/loss").data[0])
    after = MMSegAdapter(out).per_sample_loss(batch)
    rng = (rng_before, _rng_states())
    return Trained(
        out, model, work_dir, (files_before, _files(*outside)), before, after, logged, rng
    )


def test_training_decreases_the_loss(trained: Trained) -> None:
    """Measured: logged step loss 1.90 -> 0.91 (means of the first and last 5 of 40 steps);
    mean per-image loss (adapter) 1.94 -> 0.87."""
    assert len(trained.logged) == 40 and np.isfinite(trained.logged).all()
    first, last = trained.logged[:5].mean(), trained.logged[-5:].mean()
    assert last < 0.7 * first, (first, last)
    assert trained.loss_after.mean() < 0.8 * trained.loss_before.mean()


def test_the_model_is_trained_in_place_and_returned_in_eval_mode(trained: Trained) -> None:
    assert trained.model is trained.given
    assert not trained.model.training


def test_nothing_is_written_outside_the_work_dir(trained: Trained) -> None:
    before, after = trained.outside
    assert after == before
    assert (trained.work_dir / LABELED_DIR / "labeled.txt").is_file()
    assert not any(p.suffix == ".pth" for p in trained.work_dir.rglob("*")), "no checkpoint"


def test_the_global_rng_states_are_restored(trained: Trained) -> None:
    (py0, np0, torch0), (py1, np1, torch1) = trained.rng
    assert py0 == py1 and np.array_equal(np0, np1) and torch.equal(torch0, torch1)


def test_a_fresh_model_from_the_config_is_seeded(
    pool: SegmentationPool, cfg: Config, tmp_path: Path
) -> None:
    ids = pool.ids[:4]

    def run(seed: int, name: str, **kw: Any) -> dict[str, torch.Tensor]:
        train = _short(tmp_path / name, max_iters=2, pipeline=SMALL_IMAGE_PIPELINE, **kw)
        model = train_mmseg(cfg, pool, ids, train, seed=seed)
        assert not model.training
        return model.state_dict()

    a, b, c = run(0, "a"), run(0, "b"), run(1, "c", save_checkpoint=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert [p.name for p in (tmp_path / "c").glob("*.pth")] == ["iter_2.pth"]
    assert not list((tmp_path / "a").glob("*.pth"))


def _relabel_unlabeled(
    pool: SegmentationPool, partial: PartialSegmentationPool, ann: Path
) -> SegmentationPool:
    """A copy of ``pool`` whose masks hold another class wherever ``partial`` has no label."""
    ann.mkdir()
    for item in pool.ids:
        truth = pool.target(item)["gt_sem_seg"]
        if item in partial.state.partial:
            masked = partial.mask(item, pool.read_image(item), truth)
            truth = torch.where(masked == 255, (truth + 1) % len(CLASSES), truth)
        Image.fromarray(truth.numpy().astype(np.uint8)).save(ann / str(item))
    return load_segmentation_folder(pool.img_dir, ann, CLASSES)


def test_unlabeled_pixels_do_not_change_training(
    pool: SegmentationPool,
    partial: PartialSegmentationPool,
    cfg: Config,
    tmp_path: Path,
) -> None:
    """One step on the partially labeled items of two pools whose ground truth differs only
    where those items are unlabeled gives identical weights; one step on the changed pools'
    full labels does not."""
    other = _relabel_unlabeled(pool, partial, tmp_path / "ann")
    ids = [*partial.state.partial, pool.ids[0]]
    init = _fresh_model(cfg)
    init.init_weights()

    def run(source: SegmentationPool | PartialSegmentationPool, name: str) -> Any:
        model = copy.deepcopy(init)
        train_mmseg(cfg, source, ids, _short(tmp_path / name), seed=0, model=model)
        return model.state_dict()

    mine = run(partial, "mine")
    theirs = run(PartialSegmentationPool(other, _state(pool), REGIONS), "theirs")
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    full = run(other, "full")  # the changed pixels labeled: training changes
    assert not all(torch.equal(mine[k], full[k]) for k in mine)


def test_the_loss_is_the_mean_over_labeled_pixels(
    partial: PartialSegmentationPool, cfg: Config, tmp_path: Path
) -> None:
    """The decode head's loss on partially labeled images is the cross-entropy averaged over
    their labeled pixels only (taskal's torchvision objective), not over all pixels."""
    ids = list(partial.state.partial)
    labeled = write_labeled_masks(partial, ids, tmp_path / "labeled")
    run_cfg = resolve_config(cfg, partial, labeled, _short(tmp_path / "wd"), seed=0)
    for head in ("decode_head", "auxiliary_head"):
        assert run_cfg.model[head].loss_decode.avg_non_ignore is True
    assert "avg_non_ignore" not in cfg.model.decode_head.loss_decode, "cfg is not modified"
    with DefaultScope.overwrite_default_scope("mmseg"):
        dataset = DATASETS.build(run_cfg.train_dataloader.dataset.dataset)
    model = build(MODELS, dict(run_cfg.model)).eval()
    data = model.data_preprocessor(pseudo_collate([dataset[i] for i in range(len(ids))]), True)
    inputs, samples = data["inputs"], data["data_samples"]
    labels = torch.stack([s.gt_sem_seg.data[0] for s in samples])
    for sample, item in zip(samples, ids, strict=True):
        assert Path(sample.img_path).name == item
    assert 0 < (labels != 255).float().mean() < 0.5
    with torch.no_grad():
        loss = model.loss(inputs, samples)["decode.loss_ce"]
        logits = model.decode_head(model.extract_feat(inputs))
        logits = F.interpolate(logits, labels.shape[-2:], mode="bilinear", align_corners=False)
        want = F.cross_entropy(logits, labels, ignore_index=255)
        model.decode_head.loss_decode.avg_non_ignore = False  # mmseg's default
        diluted = model.loss(inputs, samples)["decode.loss_ce"]
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(diluted, want * (labels != 255).float().mean())


def test_the_labeled_masks(
    pool: SegmentationPool, partial: PartialSegmentationPool, tmp_path: Path
) -> None:
    ids = partial.ids[2:6]  # two full, two partial
    labeled = write_labeled_masks(partial, ids, tmp_path)
    assert labeled.split.read_text().split() == [str(i)[:-4] for i in ids]
    assert labeled.img_dir == Path(pool.img_dir).resolve()
    for item in ids:
        path = labeled.ann_dir / str(item)
        want = partial.take([item]).data_samples[0]["gt_sem_seg"]  # type: ignore[index]
        assert torch.equal(torch.from_numpy(np.asarray(Image.open(path))).long(), want)
        assert path.is_symlink() == (item in partial.state.full)
    write_labeled_masks(pool, pool.ids[:1], tmp_path)  # rewritten: no stale map remains
    assert [p.name for p in labeled.ann_dir.iterdir()] == [pool.ids[0]]
    (tmp_path / "other" / "masks").mkdir(parents=True)
    with pytest.raises(ValueError, match="not written by write_labeled_masks"):
        write_labeled_masks(pool, pool.ids, tmp_path / "other")
    shutil.copytree(Path(pool.ann_dir or ""), tmp_path / "ann")
    lost = load_segmentation_folder(pool.img_dir, tmp_path / "ann", CLASSES)
    (tmp_path / "ann" / str(pool.ids[1])).unlink()
    with pytest.raises(FileNotFoundError, match=r"mask .*000001\.png of labeled item"):
        write_labeled_masks(lost, pool.ids[:2], tmp_path / "lost")


def test_resolved_config(pool: SegmentationPool, cfg: Config, tmp_path: Path) -> None:
    labeled = write_labeled_masks(pool, pool.ids[:3], tmp_path / "labeled")
    train = MMSegTrainConfig(tmp_path / "wd", max_iters=7, save_checkpoint=True)
    out = resolve_config(cfg, pool, labeled, train, seed=7)
    assert cfg.train_cfg.max_iters == 40000, "cfg is not modified"
    assert out.train_cfg.max_iters == 7 and out.train_dataloader.batch_size == 4
    dataset = out.train_dataloader.dataset  # the shipped RepeatDataset wrapper is kept
    assert dataset.type == "RepeatDataset" and dataset.dataset.type == "BaseSegDataset"
    assert dataset.dataset.pipeline == cfg.train_dataloader.dataset.dataset.pipeline
    assert dataset.dataset.metainfo == dict(classes=CLASSES)
    assert Path(dataset.dataset.data_root, dataset.dataset.ann_file) == labeled.split
    assert all(out[k] is None for k in ("val_dataloader", "val_cfg", "test_dataloader"))
    assert out.randomness == dict(seed=7, deterministic=False) and out.default_scope == "mmseg"
    assert out.default_hooks.checkpoint.by_epoch is False
    assert out.default_hooks.checkpoint.interval == 7
    assert out.model.auxiliary_head.loss_decode.avg_non_ignore is True
    with pytest.raises(ValueError, match=r"max_epochs=2 but the config's train_cfg has max_iters"):
        resolve_config(cfg, pool, labeled, MMSegTrainConfig(tmp_path, max_epochs=2), seed=0)
    epochs = copy.deepcopy(cfg)
    epochs.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=3)
    repeated = resolve_config(epochs, pool, labeled, MMSegTrainConfig(tmp_path), 0)
    assert repeated.train_dataloader.dataset.times == 40000, "epochs of 3 x 40000 items: enough"
    epochs.train_dataloader.dataset = epochs.train_dataloader.dataset.dataset
    out = resolve_config(epochs, pool, labeled, MMSegTrainConfig(tmp_path, min_epoch_items=8), 0)
    assert out.train_dataloader.dataset.type == "RepeatDataset"
    assert out.train_dataloader.dataset.times == 3  # ceil(8 / 3)
    with pytest.raises(ValueError, match="needs a train_cfg with max_iters"):
        resolve_config(Config(dict(cfg.to_dict(), train_cfg=None)), pool, labeled, train, 0)


def test_an_epoch_based_loop_trains(pool: SegmentationPool, cfg: Config, tmp_path: Path) -> None:
    epochs = copy.deepcopy(cfg)
    epochs.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=1)
    epochs.train_dataloader.sampler = dict(type="DefaultSampler", shuffle=True)
    epochs.train_dataloader.dataset = epochs.train_dataloader.dataset.dataset  # no 40000x
    train = _short(tmp_path, max_iters=None, min_epoch_items=8)
    train_mmseg(epochs, pool, pool.ids[:4], train, seed=0)
    logged = MessageHub.get_current_instance().get_scalar("train/loss").data[0]
    assert len(logged) == 2  # 4 images x 2 repeats / 4 per batch


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "model.backbone.init_cfg",
            dict(type="Pretrained", checkpoint="https://x/unet.pth"),
            r"asks for a download: model\.backbone\.init_cfg\.checkpoint",
        ),
        ("model.pretrained", "open-mmlab://resnet50_v1c", r"download: model\.pretrained"),
        ("load_from", "http://x/unet.pth", r"download: load_from"),
        ("model.decode_head.num_classes", 5, r"decode_head has num_classes=5 but the pool has 4"),
        ("model.auxiliary_head.num_classes", 2, r"auxiliary_head has num_classes=2"),
        ("model.decode_head.ignore_index", 0, r"decode_head has ignore_index=0"),
    ],
)
def test_bad_configs_are_refused_before_anything_is_written(
    pool: SegmentationPool, cfg: Config, tmp_path: Path, key: str, value: Any, message: str
) -> None:
    bad = copy.deepcopy(cfg)
    *parents, last = key.split(".")
    node = bad
    for name in parents:
        node = node[name]
    node[last] = value
    with pytest.raises(ValueError, match=message):
        train_mmseg(bad, pool, pool.ids, _short(tmp_path / "wd"), seed=0)
    assert not any(tmp_path.iterdir()), "nothing is written"


def test_errors(
    pool: SegmentationPool, partial: PartialSegmentationPool, cfg: Config, tmp_path: Path
) -> None:
    short = _short(tmp_path / "wd")
    with pytest.raises(ValueError, match="at least one labeled image"):
        train_mmseg(cfg, pool, [], short, seed=0)
    with pytest.raises(ValueError, match=r"not items of the pool.*nope\.png"):
        train_mmseg(cfg, pool, [pool.ids[0], "nope.png"], short, seed=0)
    with pytest.raises(ValueError, match=r"not items of the pool.*000007\.png"):
        train_mmseg(cfg, partial, [pool.ids[7]], short, seed=0)  # unlabeled in the state
    five = copy.deepcopy(cfg)
    five.model.decode_head.num_classes = 5
    with pytest.raises(
        ValueError, match=r"model\.decode_head has num_classes=5 but the pool has 4"
    ):
        train_mmseg(cfg, pool, pool.ids, short, seed=0, model=_fresh_model(five))
    both = copy.deepcopy(cfg)
    both.load_from = str(tmp_path / "local.pth")
    with pytest.raises(ValueError, match="both a model and load_from"):
        train_mmseg(both, pool, pool.ids, short, seed=0, model=_fresh_model(cfg))
    unlabeled = load_segmentation_folder(pool.img_dir, None, CLASSES)
    with pytest.raises(ValueError, match="unlabeled"):
        train_mmseg(cfg, unlabeled, unlabeled.ids, short, seed=0)
    zero = _short(tmp_path / "wd", pipeline=[dict(type="LoadAnnotations", reduce_zero_label=True)])
    with pytest.raises(ValueError, match="reduce_zero_label=True"):
        train_mmseg(cfg, pool, pool.ids, zero, seed=0)
    assert not any(tmp_path.rglob("*.log")), "nothing trained"


def test_a_diverging_loss_stops_with_advice(
    pool: SegmentationPool, cfg: Config, tmp_path: Path
) -> None:
    with pytest.raises(FloatingPointError, match=r"Lower MMSegTrainConfig\.lr"):
        train_mmseg(cfg, pool, pool.ids, _short(tmp_path, max_iters=20, lr=1e6), seed=0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_iters", 0, r"mmseg_train\.max_iters must be an int >= 1 or None"),
        ("lr", 0.0, r"mmseg_train\.lr must be a finite number > 0 or None"),
    ],
)
def test_config_validation(field: str, value: Any, message: str) -> None:
    args: dict[str, Any] = {"work_dir": "w", field: value}
    with pytest.raises(ValueError, match=message):
        MMSegTrainConfig(**args)


def test_an_adapters_model_trains_from_its_weights(
    pool: SegmentationPool, cfg: Config, tmp_path: Path
) -> None:
    """A head without dropout gets it injected by the adapter; the adapter's model trains in
    place from its weights (a tiny learning rate leaves them) and the adapter still scores."""
    bare = copy.deepcopy(cfg)
    bare.model.decode_head.dropout_ratio = 0.0
    with pytest.warns(UserWarning, match="no dropout"):
        adapter = MMSegAdapter(_fresh_model(bare))
    adapter.model.init_weights()
    weights = {k: v.detach().clone() for k, v in adapter.model.named_parameters()}
    out = train_mmseg(bare, pool, pool.ids[:4], _short(tmp_path, lr=1e-8), 0, adapter.model)
    assert out is adapter.model
    params = dict(out.named_parameters())
    assert all(torch.allclose(weights[k], params[k], atol=1e-6) for k in weights)
    with adapter.stochastic():
        probs = adapter.predict(pool.take(pool.ids[:1]), n_samples=2).probs_UCK
    assert probs.shape == (32 * 32, 4, 2) and not torch.equal(probs[..., 0], probs[..., 1])
