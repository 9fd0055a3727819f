"""Per-class detection quality on labeled images (PPAL's p^xi * IoU^(1-xi))."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from taskal.data import CocoDetectionPool, load_coco_detection, make_synthetic_detection
from taskal.evaluation import class_quality
from taskal.types import Adapter, Batch, FeatureInfo, Predictions, Units


class FixedBoxes(Adapter):
    """Detections read from a table (item -> boxes and probabilities), for exact checks.

    A stand-in for a detector whose outputs the test must know exactly; the detection
    simulation's tests run the same function on a real torchvision detector.
    """

    task = "det"

    def __init__(
        self,
        table: dict[str, tuple[Tensor, Tensor]],
        num_classes: int,
        background: int | None = None,
    ) -> None:
        self.table = table
        self._c = num_classes
        self.background = background
        self._model = nn.Identity()
        self.seen_targets = False

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def num_classes(self) -> int:
        return self._c

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return []

    def predict(self, batch: Batch, n_samples: int = 1, units: Units | None = None) -> Predictions:
        samples = batch.data_samples or []
        self.seen_targets |= any("boxes" in s or "labels" in s for s in samples)
        boxes, probs, owner = [], [], []
        for i, item in enumerate(batch.ids):
            b, p = self.table[str(item)]
            boxes.append(b)
            probs.append(p)
            owner.append(torch.full((len(b),), i))
        return Predictions(
            torch.cat(probs).unsqueeze(-1),
            torch.cat(owner).long(),
            boxes_U4=torch.cat(boxes),
        )

    def features(self, batch: Batch, names: Sequence[str] | None = None) -> dict:  # type: ignore[type-arg]
        raise NotImplementedError

    def embed(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def per_sample_loss(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def stochastic(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def capture_features(self, names: Sequence[str] | None = None) -> Iterator[dict]:  # type: ignore[type-arg]
        yield {}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> CocoDetectionPool:
    root = Path(tmp_path_factory.mktemp("cq"))
    files = make_synthetic_detection(
        root, num_images=4, image_size=(64, 64), classes=("circle", "square"), seed=3
    )
    return load_coco_detection(files.ann_file, files.img_dir)


def _gt(pool: CocoDetectionPool, item: str) -> tuple[Tensor, Tensor]:
    s = pool.take([item]).data_samples
    assert s is not None
    return torch.as_tensor(s[0]["boxes"]).float(), torch.as_tensor(s[0]["labels"]).long()


def test_exact_boxes_score_their_probability(pool: CocoDetectionPool) -> None:
    """Every ground-truth box detected exactly with p = 0.8 for its class: quality 0.8^0.6
    for each class present; classes never labeled get 0."""
    table = {}
    present = torch.zeros(2, dtype=torch.bool)
    for item in pool.ids:
        boxes, labels = _gt(pool, str(item))
        probs = torch.full((len(labels), 2), 0.2)
        probs[torch.arange(len(labels)), labels] = 0.8
        probs = probs / probs.sum(1, keepdim=True)  # a softmax without background
        table[str(item)] = (boxes, probs)
        present[labels] = True
    adapter = FixedBoxes(table, num_classes=2)
    q = class_quality(adapter, pool, pool.ids)
    expected = torch.where(present, torch.tensor(0.8**0.6), torch.tensor(0.0))
    assert torch.allclose(q, expected, atol=1e-5)
    assert not adapter.seen_targets  # predictions run on the batch without labels


def test_partial_overlap_and_a_background_column(pool: CocoDetectionPool) -> None:
    """A box shifted to IoU 0.7 scores p^0.6 * 0.7^0.4; the background column (last, as in
    mmdet's two-stage heads) is not a class; below iou_thr a detection counts as a miss."""
    table = {}
    present = torch.zeros(2, dtype=torch.bool)
    for item in pool.ids:
        boxes, labels = _gt(pool, str(item))
        w = boxes[:, 2] - boxes[:, 0]
        # shifting a box right by s * w leaves IoU (1 - s) / (1 + s): 0.7 at s = 3/17
        shifted = boxes.clone()
        shifted[:, [0, 2]] += w[:, None] * (3 / 17)
        probs = torch.full((len(labels), 3), 0.1)  # [c0, c1, background]
        probs[torch.arange(len(labels)), labels] = 0.8
        table[str(item)] = (shifted, probs)
        present[labels] = True
    q = class_quality(FixedBoxes(table, num_classes=3, background=2), pool, pool.ids)
    expected = torch.where(present, torch.tensor(0.8**0.6 * 0.7**0.4), torch.tensor(0.0))
    assert torch.allclose(q, expected, atol=1e-4)
    strict = class_quality(
        FixedBoxes(table, num_classes=3, background=2), pool, pool.ids, iou_thr=0.75
    )
    assert torch.equal(strict, torch.zeros(2))


def test_missed_boxes(pool: CocoDetectionPool) -> None:
    """No detection overlapping a box: quality 0."""
    table = {}
    for item in pool.ids:
        boxes, labels = _gt(pool, str(item))
        far = boxes + 1000.0  # overlaps nothing
        table[str(item)] = (far, torch.full((len(labels), 2), 0.5))
    q = class_quality(FixedBoxes(table, num_classes=2), pool, pool.ids)
    assert torch.equal(q, torch.zeros(2))


def test_bad_arguments(pool: CocoDetectionPool) -> None:
    with pytest.raises(ValueError, match="iou_thr"):
        class_quality(FixedBoxes({}, 2), pool, pool.ids, iou_thr=0.0)
