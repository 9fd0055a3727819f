"""Partial segmentation labels: labeled regions keep their labels, the rest is ignored."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from taskal.adapters._segmentation import PixelRegions
from taskal.partial import PartialSegmentationPool
from taskal.queries import LabelState, Query
from taskal.types import Batch, ItemId


class Masks:
    """Three 12x16 images with known label maps."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids: list[ItemId] = ["a.png", "b.png", "c.png"]
        self.images = {i: torch.rand(3, 12, 16, generator=g) for i in self.ids}
        self.masks = {i: torch.randint(0, 3, (12, 16), generator=g) for i in self.ids}

    def take(self, ids: Sequence[ItemId]) -> Batch:
        samples = [{"gt_sem_seg": self.masks[i].clone(), "img_shape": (12, 16)} for i in ids]
        return Batch([self.images[i] for i in ids], list(ids), data_samples=samples)


def test_labeled_regions_keep_labels_and_the_rest_is_ignored() -> None:
    source = Masks()
    state = LabelState(full={"a.png"})
    state.add([Query("b.png", 0), Query("b.png", 3)])  # 8x8 patches: 2 per row of patches
    pool = PartialSegmentationPool(source, state, PixelRegions(patch=8))
    assert pool.ids == ["a.png", "b.png"]
    batch = pool.take(pool.ids)
    assert batch.data_samples is not None
    assert torch.equal(batch.data_samples[0]["gt_sem_seg"], source.masks["a.png"])
    got, truth = batch.data_samples[1]["gt_sem_seg"], source.masks["b.png"]
    want = torch.full_like(truth, 255)
    want[:8, :8] = truth[:8, :8]  # patch 0
    want[8:, 8:] = truth[8:, 8:]  # patch 3 (the bottom row is cut to 4 pixels)
    assert torch.equal(got, want)
    assert pool.labeled_pixels("b.png") == 64 + 32


def test_dominant_labels_give_each_region_one_class() -> None:
    source = Masks()
    source.masks["b.png"][:8, :8] = 2
    source.masks["b.png"][0, :3] = 1
    state = LabelState()
    state.add([Query("b.png", 0)])
    pool = PartialSegmentationPool(source, state, dict(patch=8), label="dominant")
    got = pool.take(["b.png"]).data_samples[0]["gt_sem_seg"]  # type: ignore[index]
    assert (got[:8, :8] == 2).all() and (got[:, 8:] == 255).all() and (got[8:] == 255).all()


def test_refuses_unknown_items_box_queries_and_modes() -> None:
    source = Masks()
    with pytest.raises(ValueError, match="not in the pool"):
        PartialSegmentationPool(source, LabelState(full={"zzz.png"}))
    state = LabelState()
    state.add([Query("a.png", 0, box=(0.0, 0.0, 4.0, 4.0))])
    with pytest.raises(ValueError, match="box queries"):
        PartialSegmentationPool(source, state)
    with pytest.raises(ValueError, match="label must be one of"):
        PartialSegmentationPool(source, LabelState(), label="scribbles")
