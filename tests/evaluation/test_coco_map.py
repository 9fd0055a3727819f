"""COCO mAP of an adapter on a synthetic COCO set: known answers from an oracle that reads
the pool's ground truth, and a tiny torchvision RetinaNet end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from taskal.adapters import TorchvisionDetectionAdapter
from taskal.data import CocoDetectionPool, load_coco_detection, make_synthetic_detection
from taskal.evaluation import coco_map
from taskal.types import Batch, Predictions

from ..adapters.test_torchvision_detection import retinanet


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> CocoDetectionPool:
    root = Path(tmp_path_factory.mktemp("shapes"))
    files = make_synthetic_detection(root, num_images=6, image_size=((56, 72), (56, 72)), seed=5)
    return load_coco_detection(files.ann_file, files.img_dir)


class Oracle:
    """Predicts the pool's ground-truth boxes (read from ``pool.target``, not the batch) with
    one-hot probabilities, shifted by ``offset`` pixels; records the data samples it sees.

    ``background=0`` puts a background column first, as a two-stage softmax does."""

    def __init__(self, pool: CocoDetectionPool, offset: float = 0.0, two_stage: bool = False):
        self.pool = pool
        self.offset = offset
        self.background = 0 if two_stage else None
        self.seen: list[Any] = []  # data samples
        self.targets: list[Any] = []  # batch targets

    def predict(self, batch: Batch, n_samples: int = 1) -> Predictions:
        assert n_samples == 1
        self.seen += batch.data_samples or []
        self.targets.append(batch.targets)
        targets = [self.pool.target(i) for i in batch.ids]
        boxes = torch.cat([t["boxes"] for t in targets]) + self.offset
        labels = torch.cat([t["labels"] for t in targets])
        owner = torch.cat([torch.full((len(t["labels"]),), b) for b, t in enumerate(targets)])
        shift = 0 if self.background is None else 1
        probs = torch.zeros(len(labels), len(self.pool.classes) + shift, 1)
        probs[torch.arange(len(labels)), labels + shift, 0] = 1.0
        return Predictions(probs, owner.long(), boxes_U4=boxes)


@pytest.mark.parametrize("two_stage", [False, True])
def test_an_oracle_scores_one(pool: CocoDetectionPool, two_stage: bool) -> None:
    metrics = coco_map(Oracle(pool, two_stage=two_stage), pool, batch_size=4)
    assert metrics == pytest.approx({"mAP": 1.0, "mAP50": 1.0, "mAP75": 1.0})


def test_a_background_column_read_as_a_class_is_refused(pool: CocoDetectionPool) -> None:
    with pytest.raises(ValueError, match="foreground classes"):
        coco_map(Oracle(pool, two_stage=True), pool, background=None)


def test_boxes_far_off_score_zero(pool: CocoDetectionPool) -> None:
    metrics = coco_map(Oracle(pool, offset=500.0), pool)
    assert metrics == pytest.approx({"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0})


def test_restricted_to_the_evaluated_images(pool: CocoDetectionPool) -> None:
    """Images left out of ``ids`` count neither as misses nor as detections."""
    metrics = coco_map(Oracle(pool), pool, ids=pool.ids[:2])
    assert metrics["mAP"] == pytest.approx(1.0)


def test_no_detections_give_zeros(pool: CocoDetectionPool) -> None:
    class Blind:
        def predict(self, batch: Batch, n_samples: int = 1) -> Predictions:
            return Predictions(
                torch.zeros(0, len(pool.classes), 1),
                torch.zeros(0, dtype=torch.long),
                kind="sigmoid",
                boxes_U4=torch.zeros(0, 4),
            )

    assert coco_map(Blind(), pool) == {"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0}


def test_the_adapter_never_sees_labels(pool: CocoDetectionPool) -> None:
    oracle = Oracle(pool)
    coco_map(oracle, pool, batch_size=4)
    assert len(oracle.seen) == len(pool.ids) and oracle.targets == [None, None]
    assert all("boxes" not in s and "labels" not in s for s in oracle.seen)
    assert all(
        s["image_id"] == pool.image_id(i) for s, i in zip(oracle.seen, pool.ids, strict=True)
    )


def test_a_tiny_retinanet_end_to_end(pool: CocoDetectionPool) -> None:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="dropout"):
        adapter = TorchvisionDetectionAdapter(retinanet(num_classes=len(pool.classes)))
    batch = next(pool.batches(pool.ids[:3], 3)).without_labels()
    assert adapter.predict(batch).num_units > 0  # so COCOeval scores real detections
    metrics = coco_map(adapter, pool, batch_size=3)
    assert set(metrics) == {"mAP", "mAP50", "mAP75"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
