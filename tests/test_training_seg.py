"""Training a torchvision segmenter from full and partial labels."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F

from taskal.adapters import TorchvisionSegmentationAdapter
from taskal.llal.module import LossPredictionModule
from taskal.segmenters import small_segmenter
from taskal.training_det import epoch_batches
from taskal.training_seg import SegTrainConfig, _ce, train_segmenter
from taskal.types import Batch, ItemId

pytestmark = pytest.mark.filterwarnings("ignore:.*has no dropout with p > 0")


class Stripes:
    """Images whose left half is dark (class 1) and right half bright (class 2)."""

    def __init__(self, n: int = 6, unlabeled_right: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids: list[ItemId] = [f"{i}.png" for i in range(n)]
        self.images, self.masks = {}, {}
        for i in self.ids:
            x = 0.1 * torch.rand(3, 16, 16, generator=g)
            x[:, :, 8:] += 0.8
            m = torch.ones(16, 16, dtype=torch.long)
            m[:, 8:] = 255 if unlabeled_right else 2
            self.images[i], self.masks[i] = x, m

    def take(self, ids: Sequence[ItemId]) -> Batch:
        samples = [{"gt_sem_seg": self.masks[i].clone()} for i in ids]
        return Batch([self.images[i] for i in ids], list(ids), data_samples=samples)


def _adapter() -> TorchvisionSegmentationAdapter:
    torch.manual_seed(0)
    return TorchvisionSegmentationAdapter(small_segmenter(3, width=4))


CFG = SegTrainConfig(epochs=3, batch_size=3, lr=0.05, min_epoch_items=12, warmup_iters=2)


def test_learns_stripes_and_is_reproducible() -> None:
    pool = Stripes()
    adapter = _adapter()
    before = float(adapter.per_sample_loss(pool.take(pool.ids)).mean())
    stats = train_segmenter(adapter, pool, pool.ids, CFG, torch.Generator().manual_seed(0))
    after = float(adapter.per_sample_loss(pool.take(pool.ids)).mean())
    assert after < 0.5 * before and stats["loss"] > 0 and not adapter.model.training
    again = _adapter()
    train_segmenter(again, pool, pool.ids, CFG, torch.Generator().manual_seed(0))
    for a, b in zip(adapter.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_unlabeled_pixels_give_no_gradient_and_no_loss() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 5, 6), generator=g)
    target[0, :, :3] = 255
    target[1] = 255  # an image with no labeled pixel
    loss = _ce(logits, target)
    loss.backward()
    assert logits.grad is not None
    assert (logits.grad.permute(0, 2, 3, 1)[target == 255] == 0).all()
    assert (logits.grad.permute(0, 2, 3, 1)[target != 255] != 0).any()
    keep = target != 255
    want = F.cross_entropy(logits.detach().permute(0, 2, 3, 1)[keep], target[keep])
    assert torch.allclose(loss.detach(), want)
    none = torch.full_like(target, 255)
    assert _ce(logits, none) == 0.0


def test_refuses_labels_outside_the_classes() -> None:
    pool = Stripes()
    pool.masks["0.png"][0, 0] = 7
    with pytest.raises(ValueError, match=r"labels \[7\] outside the model's 3 classes"):
        train_segmenter(_adapter(), pool, pool.ids, CFG, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"seg_train\.epochs"):
        SegTrainConfig(epochs=0)


def test_llal_trains_a_loss_predictor_on_the_feature_layers() -> None:
    pool = Stripes()
    adapter = _adapter()
    assert [f.num_levels for f in adapter.feature_info] == [3, 1]  # backbone stages, decoder
    llal = LossPredictionModule(adapter.feature_info, hidden=8)
    stats = train_segmenter(
        adapter, pool, pool.ids, CFG, torch.Generator().manual_seed(0), llal=llal
    )
    assert "llal_loss" in stats and adapter.loss_predictor is llal
    predicted = adapter.predict_loss(pool.take(pool.ids))
    assert predicted.shape == (6,) and torch.isfinite(predicted).all()


def test_deeplab_never_trains_on_a_batch_of_one() -> None:
    """7 items in batches of 3: the last image joins the batch before it (DeepLabV3's ASPP
    pools globally, then BatchNorm needs more than one value per channel)."""
    pool = Stripes(n=7)
    torch.manual_seed(0)
    adapter = TorchvisionSegmentationAdapter(small_segmenter(3, arch="deeplabv3", width=4))
    cfg = SegTrainConfig(epochs=1, batch_size=3, lr=0.01, min_epoch_items=0, warmup_iters=0)
    stats = train_segmenter(adapter, pool, pool.ids, cfg, torch.Generator().manual_seed(0))
    assert stats["loss"] > 0
    sizes = [len(b) for b in epoch_batches(pool.ids, cfg, torch.Generator(), min_batch=2)]
    assert sizes == [3, 4] and [
        len(b) for b in epoch_batches(pool.ids, cfg, torch.Generator())
    ] == [3, 3, 1]
