"""mIoU and Dice from a confusion matrix, and over a pool through an adapter."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import pytest
import torch

from taskal.adapters import TorchvisionSegmentationAdapter
from taskal.evaluation.segmentation import (
    confusion_matrix,
    scores_from_confusion,
    segmentation_metrics,
)
from taskal.segmenters import small_segmenter
from taskal.types import Batch, ItemId

pytestmark = pytest.mark.filterwarnings("ignore:.*has no dropout with p > 0")


def test_known_answer() -> None:
    truth = torch.tensor([0, 0, 1, 1, 255, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 1])
    cm = confusion_matrix(pred, truth, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    s = scores_from_confusion(cm)
    # IoU: class 0 1/2, class 1 2/4, class 2 0/1; Dice: 2/3, 4/6, 0
    assert s["IoU"] == pytest.approx([0.5, 0.5, 0.0])
    assert s["Dice"] == pytest.approx([2 / 3, 2 / 3, 0.0])
    assert s["mIoU"] == pytest.approx(1 / 3) and s["accuracy"] == pytest.approx(3 / 5)
    absent = scores_from_confusion(confusion_matrix(torch.tensor([0]), torch.tensor([0]), 3))
    assert absent["mIoU"] == 1.0 and math.isnan(absent["IoU"][2])
    with pytest.raises(ValueError, match=r"labels \[7\] lie outside"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 3)


class Pool:
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids: list[ItemId] = ["a", "b", "c"]
        self.images = {
            i: torch.rand(3, 10, 12 + 2 * k, generator=g) for k, i in enumerate(self.ids)
        }

    def batches(self, ids: Sequence[ItemId], batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(ids), batch_size):
            part = list(ids[start : start + batch_size])
            self.last = part
            yield Batch(
                [self.images[i] for i in part],
                part,
                data_samples=[{"gt_sem_seg": self.truth[i]} for i in part],
            )


def test_metrics_over_a_pool_match_the_adapters_argmax() -> None:
    torch.manual_seed(0)
    adapter = TorchvisionSegmentationAdapter(small_segmenter(3, width=4))
    pool = Pool()
    # ground truth = the adapter's own argmax, except one image wrong everywhere
    pool.truth = {}
    for i in pool.ids:
        pred = adapter.predict(Batch([pool.images[i]], [i]))
        h, w = pool.images[i].shape[-2:]
        pool.truth[i] = pred.probs_UCK[:, :, 0].argmax(1).reshape(h, w)
    assert segmentation_metrics(adapter, pool, batch_size=2)["accuracy"] == 1.0
    pool.truth["c"] = (pool.truth["c"] + 1) % 3
    pool.truth["c"][0] = 255
    got = segmentation_metrics(adapter, pool, batch_size=2)
    right = sum(int(pool.truth[i].numel()) for i in ("a", "b"))
    wrong = int((pool.truth["c"] != 255).sum())
    assert got["accuracy"] == pytest.approx(right / (right + wrong))
    with pytest.raises(ValueError, match="at least one item"):
        segmentation_metrics(adapter, pool, ids=[])
