"""Learning Loss for an mmdet detector, trained jointly inside mmengine's Runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from taskal.data import CocoDetectionPool, load_coco_detection, make_synthetic_detection
from taskal.llal.openmmlab import LLALDetector, LLALStopGradHook
from taskal.registry import MODELS, build
from taskal.training_mmdet import MMDetTrainConfig, train_mmdet

from ..test_training_mmdet import CLASSES, TINY

pytestmark = pytest.mark.filterwarnings("ignore:.*has no dropout with p > 0")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> CocoDetectionPool:
    root = tmp_path_factory.mktemp("shapes")
    files = make_synthetic_detection(
        root, num_images=4, image_size=(64, 64), classes=CLASSES, objects_per_image=(1, 2), seed=2
    )
    return load_coco_detection(files.ann_file, files.img_dir)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    path = tmp_path_factory.mktemp("configs") / "tiny_retinanet.py"
    path.write_text(TINY)
    return Config.fromfile(str(path))


def test_trains_jointly_and_stops_the_gradient(
    pool: CocoDetectionPool, cfg: Config, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    detector = build(MODELS, dict(cfg.model))
    model = LLALDetector(detector, hidden=8)
    seen: list[bool] = []
    original = model.loss_predictor.forward

    def spy(feats, detach=False):  # type: ignore[no-untyped-def]
        seen.append(detach)
        assert len(feats["neck"]) == 5  # every FPN level of RetinaNet
        return original(feats, detach=detach)

    model.loss_predictor.forward = spy  # type: ignore[method-assign]
    before = [p.detach().clone() for p in model.loss_predictor.parameters()]
    train_cfg = MMDetTrainConfig(
        work_dir=str(tmp_path / "run"), max_epochs=2, batch_size=2, min_epoch_items=4
    )
    trained = train_mmdet(
        cfg, pool, pool.ids, train_cfg, seed=0, model=model, hooks=[LLALStopGradHook(0.5)]
    )
    assert trained is model
    # 4 images per epoch, each its own loss forward: epoch 0 trains through, epoch 1 not
    assert seen == [False] * 4 + [True] * 4
    after = list(model.loss_predictor.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    adapter = model.adapter()
    assert adapter.model is detector and adapter.loss_predictor is model.loss_predictor
    batch = pool.take(pool.ids[:3]).without_labels()
    predicted = adapter.predict_loss(batch)
    assert predicted.shape == (3,) and torch.isfinite(predicted).all()


def test_bad_arguments(cfg: Config) -> None:
    detector = build(MODELS, dict(cfg.model))
    with pytest.raises(ValueError, match="unknown feature layers"):
        LLALDetector(detector, layers=("fpn",))
    with pytest.raises(TypeError, match="expected an mmdet detector"):
        LLALDetector(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="stop_grad_fraction"):
        LLALStopGradHook(1.5)


def test_segmentor_trains_jointly_and_stops_the_gradient_by_iteration(tmp_path: Path) -> None:
    """An mmseg UNet inside LLALSegmentor, trained by train_mmseg's iteration-based loop:
    the module reads the UNet's encoder stages and stops back-propagating at 50 %."""
    from taskal.data import load_segmentation_folder, make_synthetic_segmentation
    from taskal.llal.openmmlab import LLALSegmentor
    from taskal.training_mmseg import SMALL_IMAGE_PIPELINE, MMSegTrainConfig, train_mmseg

    from ..test_training_mmseg import CLASSES as SEG_CLASSES
    from ..test_training_mmseg import TINY as TINY_UNET

    files = make_synthetic_segmentation(tmp_path / "d", num_images=4, image_size=(32, 32))
    seg_pool = load_segmentation_folder(files.img_dir, files.ann_dir, SEG_CLASSES)
    (tmp_path / "unet.py").write_text(TINY_UNET)
    seg_cfg = Config.fromfile(str(tmp_path / "unet.py"))
    torch.manual_seed(0)
    model = LLALSegmentor(build(MODELS, dict(seg_cfg.model)), hidden=4)
    seen: list[bool] = []
    original = model.loss_predictor.forward

    def spy(feats, detach=False):  # type: ignore[no-untyped-def]
        seen.append(detach)
        assert sorted(feats) == [f"encoder{i}" for i in range(5)]
        return original(feats, detach=detach)

    model.loss_predictor.forward = spy  # type: ignore[method-assign]
    train_cfg = MMSegTrainConfig(
        tmp_path / "r", max_iters=2, batch_size=2, num_workers=0, pipeline=SMALL_IMAGE_PIPELINE
    )
    trained = train_mmseg(
        seg_cfg, seg_pool, seg_pool.ids, train_cfg, 0, model, hooks=[LLALStopGradHook(0.5)]
    )
    assert trained is model and seen == [False, False, True, True]  # 2 images x 2 iterations
    adapter = model.adapter()
    predicted = adapter.predict_loss(seg_pool.take(seg_pool.ids[:3]).without_labels())
    assert predicted.shape == (3,) and torch.isfinite(predicted).all()
    with pytest.raises(TypeError, match="expected an mmseg segmentor"):
        LLALSegmentor(torch.nn.Linear(2, 2))
