"""Partially annotated images: box queries become crops whose unlabeled pixels are masked."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from taskal.adapters import TorchvisionDetectionAdapter
from taskal.data import CocoDetectionPool, load_coco_detection, make_synthetic_detection
from taskal.partial import PartialDetectionPool, box_mask, crop_window
from taskal.queries import LabelState, Query
from taskal.training_det import DetTrainConfig, train_detector
from taskal.types import ItemId

from ..adapters.test_torchvision_detection import faster_rcnn

pytestmark = pytest.mark.filterwarnings("ignore:.*has no dropout with p > 0")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> CocoDetectionPool:
    root = Path(tmp_path_factory.mktemp("partial"))
    files = make_synthetic_detection(root, num_images=6, image_size=(64, 64), seed=0)
    return load_coco_detection(files.ann_file, files.img_dir)


def _gt(oracle: CocoDetectionPool, item: ItemId, k: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = oracle.target(item)["boxes"][k].tolist()
    return x0, y0, x1, y1


@pytest.fixture(scope="module")
def state(oracle: CocoDetectionPool) -> LabelState:
    """One full image; box queries on three more, built from their ground-truth boxes."""
    ids = oracle.ids
    x0, y0, x1, y1 = _gt(oracle, ids[3], 3)
    state = LabelState(full={ids[1]})
    state.add(
        [
            Query(ids[0], 7, box=_gt(oracle, ids[0], 2)),  # small box inside a pile of shapes
            Query(ids[3], 2, box=_gt(oracle, ids[3], 1)),
            Query(ids[3], 5, box=(x0 - 0.5, y0 - 0.8, x1, y1)),  # a predicted, not exact, box
            Query(ids[4], 0, box=(60.0, 60.0, 62.0, 62.0)),  # its crop is too small to train
            Query(ids[4], 3, box=(20.0, 20.0, 30.0, 30.0)),  # corner of a big shape: cut
            Query(ids[5], 1, box=(10.0, 54.0, 30.0, 63.0)),  # background; a shape in context
        ]
    )
    return state


@pytest.fixture(scope="module")
def pool(oracle: CocoDetectionPool, state: LabelState) -> PartialDetectionPool:
    return PartialDetectionPool(oracle, state)


def _crops(pool: PartialDetectionPool) -> list[str]:
    return [str(i) for i in pool.ids if str(i) in pool.crops]


def test_ids_sizes_and_skipped_crops(oracle: CocoDetectionPool, pool: PartialDetectionPool) -> None:
    ids = oracle.ids
    crops = [f"{ids[0]}#r0", ids[1], f"{ids[3]}#r0", f"{ids[3]}#r1", f"{ids[4]}#r1", f"{ids[5]}#r0"]
    assert pool.ids == crops
    assert pool.skipped == {f"{ids[4]}#r0": (4, 4)}  # [59, 63) x [59, 63): under 8 pixels
    assert pool.crops[f"{ids[0]}#r0"].window == (16, 32, 32, 48)  # 8 x 8 box, 4 px each side
    assert pool.crops[f"{ids[3]}#r0"].window == (0, 0, 26, 29)  # clipped at the image's corner
    batch = pool.take(pool.ids)
    assert list(batch.ids) == pool.ids
    for image, sample, i in zip(batch.inputs, batch.data_samples or [], pool.ids, strict=True):
        x0, y0, x1, y1 = sample["crop"]
        assert image.dtype == torch.float32 and image.shape == (3, y1 - y0, x1 - x0)
        assert sample["img_shape"] == (y1 - y0, x1 - x0) and sample["offset"] == (x0, y0)
        assert sample["source"] == (i if sample["region"] is None else pool.crops[str(i)].item)
        assert float(image.min()) >= 0 and float(image.max()) <= 1


def test_crop_window_expands_clips_and_validates() -> None:
    assert crop_window((10, 20, 30, 30), (64, 64)) == (0, 15, 40, 35)
    assert crop_window((10.2, 20, 30, 30.5), (64, 64), context=0.0) == (10, 20, 30, 31)
    assert crop_window((50, 50, 60, 60), (64, 56), context=1.0) == (40, 40, 56, 64)
    with pytest.raises(ValueError, match="finite"):
        crop_window((0, 0, math.nan, 4), (8, 8))
    with pytest.raises(ValueError, match="x0 <= x1"):
        crop_window((5, 0, 4, 4), (8, 8))


def test_full_images_are_the_oracles(oracle: CocoDetectionPool, pool: PartialDetectionPool) -> None:
    item = oracle.ids[1]
    mine, theirs = pool.take([item]), oracle.take([item])
    assert torch.equal(mine.inputs[0], theirs.inputs[0])
    sample, target = (mine.data_samples or [])[0], (theirs.data_samples or [])[0]
    assert torch.equal(sample["boxes"], target["boxes"])
    assert torch.equal(sample["labels"], target["labels"])
    assert not sample["masked"].any() and sample["offset"] == (0, 0)


def _clip(boxes: torch.Tensor, window: tuple[int, int, int, int]) -> torch.Tensor:
    """xyxy ``boxes`` clipped to an ``(x0, y0, x1, y1)`` window, in image pixels."""
    w = torch.tensor(window, dtype=torch.float32)
    return torch.cat([boxes[:, :2].maximum(w[:2]), boxes[:, 2:].minimum(w[2:])], 1)


def _match(boxes: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``[n]`` index into ``ref`` of each row of ``boxes`` (exact match; -1 if none)."""
    if not len(ref):
        return torch.full((len(boxes),), -1)
    eq = (boxes[:, None] - ref[None]).abs().amax(-1) < 1e-4
    return torch.where(eq.any(1), eq.float().argmax(1), -1)


def test_targets_are_shifted_labeled_boxes_and_never_leak(
    oracle: CocoDetectionPool, state: LabelState, pool: PartialDetectionPool
) -> None:
    batch = pool.take(_crops(pool))
    for i, sample in zip(batch.ids, batch.data_samples or [], strict=True):
        crop = pool.crops[str(i)]
        gt = oracle.target(crop.item)
        x0, y0, x1, y1 = crop.window
        window = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
        which = _match(sample["boxes"] + window[:2].repeat(2), _clip(gt["boxes"], crop.window))
        assert (which >= 0).all(), "every target is a ground-truth box clipped to the crop"
        assert torch.equal(sample["labels"], gt["labels"][which])
        queried = torch.tensor(state.boxes[crop.item])
        for k, box in enumerate(gt["boxes"]):
            lo = box[:2].maximum(queried[:, :2])
            hi = box[2:].minimum(queried[:, 2:])
            overlaps = ((hi - lo).clamp(min=0).prod(1) > 0).any()
            if not overlaps:  # outside every queried box: unlabeled, never a target
                assert k not in which.tolist()
            own = ((box[:2] >= torch.tensor(crop.query_box[:2])).all()) & (
                box[2:] <= torch.tensor(crop.query_box[2:])
            ).all()
            if own:  # inside this crop's queried box: a target, at its exact shifted place
                assert k in which.tolist()
    # the fixture exercises both: a queried image holds objects outside every queried box
    item = oracle.ids[0]
    assert not pool.labeled_objects(item).all() and pool.labeled_objects(item).any()
    assert pool.labeled_objects(oracle.ids[1]).all()


def test_no_object_in_a_crop_is_trained_as_background(
    oracle: CocoDetectionPool, pool: PartialDetectionPool
) -> None:
    """Every ground-truth object (labeled or not) that is not a target of a crop shows no
    pixel outside the targets' boxes; shown pixels are the image's, masked ones its mean."""
    batch = pool.take(_crops(pool))
    n_masked_objects = 0
    for i, image, sample in zip(batch.ids, batch.inputs, batch.data_samples or [], strict=True):
        crop = pool.crops[str(i)]
        x0, y0, x1, y1 = crop.window
        hw = (y1 - y0, x1 - x0)
        original = oracle.read_image(crop.item)[:, y0:y1, x0:x1]
        masked = sample["masked"]
        assert masked.shape == hw and masked.any()
        assert torch.equal(image[:, ~masked], original[:, ~masked])
        fill = original.mean((1, 2), keepdim=True).expand_as(original)
        assert torch.allclose(image[:, masked], fill[:, masked])
        targets = box_mask(sample["boxes"], hw)
        offset = torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        gt = oracle.target(crop.item)["boxes"]
        which = set(_match(sample["boxes"] + offset, _clip(gt, crop.window)).tolist())
        for k, box in enumerate(gt):
            if k in which:
                continue
            pixels = box_mask((box - offset)[None], hw)
            assert not (pixels & ~masked & ~targets).any(), (i, k)
            n_masked_objects += int(pixels.any())
    assert n_masked_objects >= 2  # cut labeled objects and unlabeled context objects


def test_cut_labeled_objects_and_unlabeled_context_are_masked(
    oracle: CocoDetectionPool, pool: PartialDetectionPool
) -> None:
    ids = oracle.ids
    small = (pool.take([f"{ids[0]}#r0"]).data_samples or [])[0]
    # the 8 x 8 query overlaps two big labeled shapes that the 16 x 16 crop cuts: they are
    # masked, and so is the unlabeled context, so only the queried (target) box is shown
    assert small["boxes"].tolist() == [[4.0, 4.0, 12.0, 12.0]]
    assert torch.equal(small["masked"], ~box_mask(small["boxes"], (16, 16)))
    corner = (pool.take([f"{ids[3]}#r0"]).data_samples or [])[0]
    # the unlabeled shape [20, 26, 49, 53] reaches into the crop's context: masked
    assert corner["masked"][26:29, 20:26].all()
    assert not corner["masked"][3:20, 0:17].any()  # the queried (and labeled) box is shown
    cut = (pool.take([f"{ids[4]}#r1"]).data_samples or [])[0]
    # the queried box [20, 20, 30, 30] overlaps the labeled shape [28, 5, 55, 32], which the
    # crop [15, 15, 35, 35] cuts: no target, and its pixels inside the queried box are masked
    assert len(cut["boxes"]) == 0 and cut["masked"][5:15, 13:15].all()
    assert not cut["masked"][5:15, 5:13].any()  # the rest of the queried box is background
    empty = (pool.take([f"{ids[5]}#r0"]).data_samples or [])[0]
    # nothing overlaps the queried box; the unlabeled shape [0, 54, 9, 63] lies wholly in the
    # crop's context: it is no target (no leakage), and it is masked
    assert len(empty["boxes"]) == 0 and empty["offset"] == (0, 49)
    assert empty["masked"][5:14, 0:9].all()


def test_min_visible_and_context_change_targets(
    oracle: CocoDetectionPool, state: LabelState
) -> None:
    ids = oracle.ids
    loose = PartialDetectionPool(oracle, state, min_visible=0.01, context=1.0)
    sample = (loose.take([f"{ids[0]}#r0"]).data_samples or [])[0]
    assert len(sample["boxes"]) == 3  # the two big labeled shapes are now (clipped) targets
    assert not sample["masked"][0:12, 11:16].any()
    tight = PartialDetectionPool(oracle, state, context=0.0, min_size=1)
    assert tight.crops[f"{ids[0]}#r0"].window == (20, 36, 28, 44)
    assert f"{ids[4]}#r0" in tight.ids and not tight.skipped


def test_clear_errors(oracle: CocoDetectionPool, pool: PartialDetectionPool) -> None:
    ids = oracle.ids
    with pytest.raises(ValueError, match="without a box"):
        PartialDetectionPool(oracle, LabelState(partial={ids[2]: {0, 3}}))
    with pytest.raises(ValueError, match="finite"):
        PartialDetectionPool(oracle, LabelState(boxes={ids[2]: [(0.0, 0.0, math.inf, 5.0)]}))
    with pytest.raises(ValueError, match="not in the oracle"):
        PartialDetectionPool(oracle, LabelState(full={"nope.png"}))
    for bad in ({"context": -1.0}, {"min_visible": 0.0}, {"min_size": 0}):
        with pytest.raises(ValueError):
            PartialDetectionPool(oracle, LabelState(), **bad)
    with pytest.raises(KeyError, match="not training items"):
        pool.take([ids[2]])
    assert [b.ids for b in pool.batches(pool.ids, 3)] == [pool.ids[:3], pool.ids[3:]]


def test_train_detector_runs_on_crops_and_full_images(
    oracle: CocoDetectionPool, pool: PartialDetectionPool
) -> None:
    torch.manual_seed(0)
    adapter = TorchvisionDetectionAdapter(faster_rcnn(num_classes=len(oracle.classes) + 1))
    cfg = DetTrainConfig(epochs=1, batch_size=2, lr=0.01, warmup_iters=1, min_epoch_items=4)
    stats = train_detector(adapter, pool, pool.ids, cfg, torch.Generator().manual_seed(0))
    assert "loss" in stats and math.isfinite(stats["loss"])
