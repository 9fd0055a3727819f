"""Segmentation training items from full labels and region queries.

A region query (a patch or a superpixel, :class:`~taskal.adapters._segmentation.PixelRegions`)
asks the annotator to label the pixels of one region of an image. The image trains whole:
the pixels of its labeled regions carry their class, every other pixel carries the ignore
index 255, so unlabeled pixels add nothing to the loss (neither as background nor as any
other class). Regions are recomputed from the image with the same :class:`PixelRegions`
the adapter used, so a region id means the same pixels when the query is asked and when it
is trained. Fully labeled items train as they are.

With ``label="dominant"`` the annotator answers a region with one class (a click: the
region's most frequent class in the ground truth), which every pixel of the region gets.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from taskal.adapters._segmentation import PixelRegions
from taskal.queries import LabelState
from taskal.types import Batch, ItemId

IGNORE_INDEX = 255
LABEL_MODES = ("pixels", "dominant")


class SegmentationSource(Protocol):
    """What :class:`PartialSegmentationPool` reads from the pool it answers from."""

    ids: list[ItemId]

    def take(self, ids: Sequence[ItemId]) -> Batch: ...


class PartialSegmentationPool:
    """Training items of a segmentation pool under a :class:`LabelState`.

    Args:
        oracle: the pool whose images and ground truth (``gt_sem_seg`` in its data samples)
            answer the queries.
        state: fully labeled items and the labeled region ids of the others; a copy is kept.
        regions: how the adapter grouped pixels into regions when the queries were asked.
        label: ``"pixels"`` (a labeled region keeps its true label map) or ``"dominant"``
            (the whole region gets its most frequent class: one click per region).

    Attributes:
        ids: training ids in ``oracle.ids`` order: every item with a label.

    Raises:
        ValueError: labeled items that are not in ``oracle``, box queries (they have no
            region ids to mask by), or an unknown ``label``.
    """

    def __init__(
        self,
        oracle: SegmentationSource,
        state: LabelState,
        regions: PixelRegions | Mapping[str, Any] | None = None,
        label: str = "pixels",
    ) -> None:
        if label not in LABEL_MODES:
            raise ValueError(f"label must be one of {LABEL_MODES}, got {label!r}")
        self.oracle = oracle
        self.state = state.copy()
        self.regions = PixelRegions.of(regions)
        self.label = label
        labeled = self.state.items()
        missing = sorted(str(i) for i in labeled - set(oracle.ids))
        if missing:
            raise ValueError(
                f"{len(missing)} labeled items are not in the pool, e.g. {missing[:3]}; build "
                "the LabelState from this pool's ids"
            )
        boxed = sorted(str(i) for i, b in self.state.boxes.items() if b)
        if boxed:
            raise ValueError(
                f"items {boxed[:3]} have box queries; segmentation trains on patch or "
                "superpixel regions (Query.region ids without boxes)"
            )
        self.ids: list[ItemId] = [i for i in oracle.ids if i in labeled]

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, ids: Sequence[ItemId]) -> Batch:
        """The items' images with label maps masked to their labeled regions (255 elsewhere)."""
        batch = self.oracle.take(ids)
        samples = []
        for item, image, sample in zip(
            batch.ids, batch.inputs, batch.data_samples or [{}] * len(batch), strict=True
        ):
            sample = dict(sample)
            if item not in self.state.full:
                sample["gt_sem_seg"] = self.mask(item, image, sample.get("gt_sem_seg"))
            samples.append(sample)
        return Batch(list(batch.inputs), list(batch.ids), data_samples=samples)

    def batches(self, ids: Sequence[ItemId], batch_size: int) -> Iterator[Batch]:
        ids = list(ids)
        for start in range(0, len(ids), batch_size):
            yield self.take(ids[start : start + batch_size])

    def mask(self, item: ItemId, image: Tensor, truth: Tensor | None) -> Tensor:
        """``[H, W]`` labels of ``item``'s labeled regions (the annotator's answer), 255
        everywhere else."""
        if truth is None:
            raise ValueError(f"the pool gave no gt_sem_seg for {item!r}: it cannot answer")
        truth = torch.as_tensor(truth).long()
        region_map = self.regions.region_map(image).to(truth.device)
        if region_map.shape != truth.shape:
            raise ValueError(
                f"{item!r}: label map {tuple(truth.shape)} and image "
                f"{tuple(region_map.shape)} differ in size"
            )
        wanted = torch.tensor(sorted(self.state.regions_of(item)), dtype=torch.long)
        labeled = torch.isin(region_map, wanted.to(truth.device))
        out = torch.full_like(truth, IGNORE_INDEX)
        if self.label == "pixels":
            out[labeled] = truth[labeled]
            return out
        for r in wanted.tolist():
            inside = region_map == r
            classes = truth[inside & (truth != IGNORE_INDEX)]
            if len(classes):
                out[inside] = int(torch.bincount(classes).argmax())
        return out

    def labeled_pixels(self, item: ItemId) -> int:
        """Pixels of ``item`` that carry a label for training."""
        batch = self.take([item])
        assert batch.data_samples is not None
        return int((torch.as_tensor(batch.data_samples[0]["gt_sem_seg"]) != IGNORE_INDEX).sum())


__all__ = ["IGNORE_INDEX", "PartialSegmentationPool"]
