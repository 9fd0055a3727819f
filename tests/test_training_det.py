"""Training tiny torchvision detectors on a synthetic COCO set: they fit it, reproducibly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from taskal.adapters import TorchvisionDetectionAdapter
from taskal.data import CocoDetectionPool, load_coco_detection, make_synthetic_detection
from taskal.training_det import DetTrainConfig, train_detector

from .adapters.test_torchvision_detection import faster_rcnn, retinanet

pytestmark = pytest.mark.filterwarnings("ignore:.*has no dropout with p > 0")

#: per family: the learning rate that fits the tiny detector quickly without diverging.
LR = {"retinanet": 3e-3, "faster_rcnn": 0.05}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> CocoDetectionPool:
    root = Path(tmp_path_factory.mktemp("shapes"))
    files = make_synthetic_detection(
        root, num_images=6, image_size=(64, 64), objects_per_image=(0, 3), seed=1
    )
    return load_coco_detection(files.ann_file, files.img_dir)


def _adapter(family: str, pool: CocoDetectionPool, seed: int = 0) -> TorchvisionDetectionAdapter:
    torch.manual_seed(seed)
    if family == "faster_rcnn":  # class 0 is the background
        return TorchvisionDetectionAdapter(faster_rcnn(num_classes=len(pool.classes) + 1))
    return TorchvisionDetectionAdapter(retinanet(num_classes=len(pool.classes)))


def _cfg(family: str, epochs: int) -> DetTrainConfig:
    return DetTrainConfig(
        epochs=epochs,
        batch_size=3,
        lr=LR[family],
        warmup_iters=4,
        min_epoch_items=6,
        max_grad_norm=10.0,
    )


def test_the_set_has_an_image_without_boxes(pool: CocoDetectionPool) -> None:
    """Empty targets are kept in training (background); the fixture must exercise them."""
    counts = [len(pool.target(i)["boxes"]) for i in pool.ids]
    assert 0 in counts and max(counts) > 0


@pytest.mark.parametrize("family", ["retinanet", "faster_rcnn"])
def test_loss_decreases_on_the_labeled_images(pool: CocoDetectionPool, family: str) -> None:
    adapter = _adapter(family, pool)
    batch = pool.take(pool.ids)
    before = float(adapter.per_sample_loss(batch).mean())
    stats = train_detector(adapter, pool, pool.ids, _cfg(family, 8), torch.Generator())
    after = float(adapter.per_sample_loss(batch).mean())
    assert not adapter.model.training
    assert "loss" in stats and all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    parts = sum(v for k, v in stats.items() if k != "loss")
    assert stats["loss"] == pytest.approx(parts, rel=1e-5)
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("family", ["retinanet", "faster_rcnn"])
def test_same_seeds_give_the_same_weights(pool: CocoDetectionPool, family: str) -> None:
    def run(order_seed: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        adapter = _adapter(family, pool)  # torch.manual_seed(0) inside
        g = torch.Generator().manual_seed(order_seed)
        stats = train_detector(adapter, pool, pool.ids[:4], _cfg(family, 2), g)
        return adapter.model.state_dict(), stats

    (a, stats_a), (b, stats_b), (c, _) = run(0), run(0), run(1)
    assert stats_a == stats_b
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the generator drives the order


def test_labeled_set_smaller_than_a_batch_still_trains(pool: CocoDetectionPool) -> None:
    adapter = _adapter("retinanet", pool)
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    cfg = DetTrainConfig(epochs=1, batch_size=4, lr=1e-3, warmup_iters=0, min_epoch_items=4)
    train_detector(adapter, pool, pool.ids[:1], cfg, torch.Generator())
    after = adapter.model.state_dict()
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_errors(pool: CocoDetectionPool) -> None:
    adapter, cfg, g = _adapter("retinanet", pool), _cfg("retinanet", 1), torch.Generator()
    with pytest.raises(ValueError, match="at least one labeled image"):
        train_detector(adapter, pool, [], cfg, g)
    with pytest.raises(ValueError, match=r"not items of the pool.*nope\.png"):
        train_detector(adapter, pool, [pool.ids[0], "nope.png"], cfg, g)
    too_few = TorchvisionDetectionAdapter(faster_rcnn(num_classes=len(pool.classes)))
    with pytest.raises(ValueError, match="C \\+ 1 classes"):
        train_detector(too_few, pool, pool.ids, cfg, g)
    assert not too_few.model.training


def test_a_diverging_loss_stops_with_advice(pool: CocoDetectionPool) -> None:
    adapter = _adapter("retinanet", pool)
    cfg = DetTrainConfig(epochs=3, batch_size=3, lr=1e3, warmup_iters=0, min_epoch_items=6)
    with pytest.raises(FloatingPointError, match=r"lower DetTrainConfig\.lr"):
        train_detector(adapter, pool, pool.ids, cfg, torch.Generator())
    assert not adapter.model.training


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be >= 1"),
        ("batch_size", 0, "batch_size must be >= 1"),
        ("lr", 0.0, "lr must be a finite number > 0"),
        ("lr", float("nan"), "lr must be a finite number > 0"),
        ("momentum", 1.0, "momentum must lie in"),
        ("weight_decay", -1.0, "weight_decay must be >= 0"),
        ("warmup_iters", -1, "warmup_iters must be >= 0"),
        ("min_epoch_items", -1, "min_epoch_items must be >= 0"),
    ],
)
def test_config_is_validated(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DetTrainConfig(**{field: value})  # type: ignore[arg-type]


def test_llal_trains_jointly_and_attaches(pool: CocoDetectionPool) -> None:
    """The loss predictor learns from per-image detection losses, flips to detached after
    stop_grad_fraction of the epochs, and ends attached to the adapter; the detector's own
    steps are the batched ones every other strategy trains with."""
    from taskal.llal import LossPredictionModule
    from taskal.training import LLALConfig

    adapter = _adapter("faster_rcnn", pool)
    fpn = [f for f in adapter.feature_info if f.name == "fpn"]
    llal = LossPredictionModule(fpn, hidden=8)
    detach_flags: list[bool] = []
    original = llal.forward

    def spy(feats, detach=False):  # type: ignore[no-untyped-def]
        detach_flags.append(detach)
        return original(feats, detach=detach)

    llal.forward = spy  # type: ignore[method-assign]
    before = [p.detach().clone() for p in llal.parameters()]
    stats = train_detector(
        adapter,
        pool,
        pool.ids,
        _cfg("faster_rcnn", epochs=2),
        torch.Generator().manual_seed(0),
        llal=llal,
        llal_cfg=LLALConfig(stop_grad_fraction=0.5),
    )
    assert "llal_loss" in stats and torch.isfinite(torch.tensor(stats["loss"]))
    # 6 images per epoch in steps of 3: epoch 0 trains through, epoch 1 is detached
    assert detach_flags == [False, False, True, True]
    assert any(not torch.equal(a, b) for a, b in zip(before, llal.parameters(), strict=True))
    assert adapter.loss_predictor is llal
    batch = pool.take(pool.ids[:3]).without_labels()
    assert adapter.predict_loss(batch).shape == (3,)
