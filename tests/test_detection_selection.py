"""Selection end to end on detection: a synthetic COCO set on disk, read through the
validated COCO pool, scored by tiny torchvision detectors, as images and as boxes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from taskal.adapters import TorchvisionDetectionAdapter
from taskal.data import load_coco_detection, make_synthetic_detection
from taskal.queries import LabelState
from taskal.selector import Selector

from .adapters.test_torchvision_detection import faster_rcnn, retinanet


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = Path(tmp_path_factory.mktemp("shapes"))
    files = make_synthetic_detection(root, num_images=8, image_size=((56, 72), (56, 72)), seed=3)
    return load_coco_detection(files.ann_file, files.img_dir)


@pytest.mark.parametrize("family", ["faster_rcnn", "retinanet"])
@pytest.mark.parametrize("strategy", ["entropy", {"type": "bald", "n_samples": 3}, "random"])
def test_image_and_box_queries(pool, family: str, strategy: object) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    build = faster_rcnn if family == "faster_rcnn" else retinanet
    background = 1 if family == "faster_rcnn" else 0  # torchvision's two-stage class 0
    adapter = TorchvisionDetectionAdapter(build(num_classes=len(pool.classes) + background))
    images = Selector(
        strategy, batch_size=3, progress=False
    ).select(  # type: ignore[arg-type]
        adapter, pool, pool.ids[:2], 3
    )
    assert len({q.item for q in images}) == 3 and not {q.item for q in images} & set(pool.ids[:2])
    state = LabelState(full=set(pool.ids[:2]))
    boxes = Selector(strategy, batch_size=3, progress=False, query="region").select(  # type: ignore[arg-type]
        adapter, pool, state, 4.0
    )
    assert 0 < len(boxes) <= 4 and all(q.box is not None and q.cost == 1.0 for q in boxes)
    state.add(boxes)
    again = Selector(strategy, batch_size=3, progress=False, query="region").select(  # type: ignore[arg-type]
        adapter, pool, state, 2.0
    )
    assert not {(q.item, q.region) for q in again} & {(q.item, q.region) for q in boxes}


def test_faster_rcnn_trains_every_pool_class_as_foreground(pool) -> None:  # type: ignore[no-untyped-def]
    """Pool labels start at 0; Faster R-CNN's class 0 is background, so they are shifted."""
    from taskal.adapters.torchvision_detection import _targets

    batch = next(pool.batches(pool.ids[:2], 2))
    raw = [s["labels"] for s in batch.data_samples]
    shifted = _targets(batch, torch.device("cpu"), first_label=1)
    assert all(torch.equal(t["labels"], r + 1) for t, r in zip(shifted, raw, strict=True))
    torch.manual_seed(0)
    adapter = TorchvisionDetectionAdapter(faster_rcnn(num_classes=len(pool.classes) + 1))
    loss = adapter.per_sample_loss(batch)
    assert loss.shape == (2,) and torch.isfinite(loss).all()


def test_badge_averages_box_softmax_per_image() -> None:
    """Image-level distribution of box units: the mean of the image's boxes, all background
    for an image without boxes; sigmoid scores and background-less boxes are refused."""
    from taskal.selector import _item_probs
    from taskal.strategies import BADGE
    from taskal.types import Predictions

    probs = torch.tensor([[0.1, 0.6, 0.3], [0.3, 0.2, 0.5], [0.5, 0.5, 0.0]]).unsqueeze(-1)
    p = Predictions(probs, torch.tensor([0, 0, 2]))
    out = _item_probs(p, 3, BADGE(), background=0)
    assert torch.allclose(out[0], torch.tensor([0.2, 0.4, 0.4]))
    assert torch.equal(out[1], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(out[2], torch.tensor([0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="background column"):
        _item_probs(p, 3, BADGE(), background=None)
    with pytest.raises(ValueError, match="sigmoid"):
        _item_probs(Predictions(probs, torch.tensor([0, 0, 2]), "sigmoid"), 3, BADGE(), 0)


@pytest.mark.parametrize("strategy", ["badge", "coreset", {"type": "hybrid", "first": "entropy"}])
def test_diversity_strategies_select_detection_images(pool, strategy: object) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    adapter = TorchvisionDetectionAdapter(faster_rcnn(num_classes=len(pool.classes) + 1))
    picks = Selector(
        strategy, batch_size=3, progress=False
    ).select(  # type: ignore[arg-type]
        adapter, pool, pool.ids[:2], 3
    )
    assert len({q.item for q in picks}) == 3 and not {q.item for q in picks} & set(pool.ids[:2])


def test_difficulty_calibrated_needs_class_quality(pool) -> None:  # type: ignore[no-untyped-def]
    from taskal.evaluation import class_quality

    torch.manual_seed(0)
    adapter = TorchvisionDetectionAdapter(faster_rcnn(num_classes=len(pool.classes) + 1))
    selector = Selector("difficulty_calibrated", batch_size=4, progress=False)
    with pytest.raises(ValueError, match="no class_quality"):
        selector.select(adapter, pool, pool.ids[:2], 2)
    adapter.class_quality = class_quality(adapter, pool, pool.ids[:2])
    assert adapter.class_quality.shape == (len(pool.classes),)
    assert ((adapter.class_quality >= 0) & (adapter.class_quality <= 1)).all()
    picks = selector.select(adapter, pool, pool.ids[:2], 2)
    assert len({q.item for q in picks}) == 2


def test_item_classes_of_box_units() -> None:
    """An image's class is the foreground class with the most mass over its boxes; the
    background column never wins; an image without boxes is -1."""
    from taskal.selector import _item_classes
    from taskal.types import Predictions

    probs = torch.tensor(
        [[0.7, 0.2, 0.1], [0.6, 0.1, 0.3], [0.5, 0.1, 0.4], [0.9, 0.05, 0.05]]
    ).unsqueeze(-1)  # background first, as torchvision's Faster R-CNN
    p = Predictions(probs, torch.tensor([0, 0, 0, 2]))
    assert _item_classes(p, 3, background=0).tolist() == [1, -1, 0]
    sig = Predictions(
        torch.tensor([[0.2, 0.9], [0.3, 0.1]]).unsqueeze(-1), torch.tensor([1, 1]), "sigmoid"
    )
    assert _item_classes(sig, 2, background=None).tolist() == [-1, 1]


def test_class_balanced_runs_on_detections(pool) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    adapter = TorchvisionDetectionAdapter(retinanet(num_classes=len(pool.classes)))
    selector = Selector({"type": "class_balanced", "max_share": 0.5}, batch_size=3, progress=False)
    picks = selector.select(adapter, pool, pool.ids[:2], 4)
    assert len({q.item for q in picks}) == 4 and not {q.item for q in picks} & set(pool.ids[:2])
