from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from taskal.data import (
    SegmentationPool,
    check_mask,
    load_segmentation_folder,
    make_synthetic_segmentation,
)
from taskal.registry import DATASETS, build
from taskal.types import Batch

CLASSES = ("background", "liver", "kidney", "lesion")


def _folder(root: Path, sizes: dict[str, tuple[int, int]]) -> tuple[Path, Path]:
    """Grayscale images and valid masks (value = row % 4) of the given (H, W) by stem."""
    img_dir, ann_dir = root / "img", root / "ann"
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    for stem, (h, w) in sizes.items():
        Image.fromarray(np.full((h, w), 100, np.uint8)).save(img_dir / f"{stem}.png")
        mask = np.broadcast_to((np.arange(h) % 4)[:, None], (h, w)).astype(np.uint8)
        Image.fromarray(mask).save(ann_dir / f"{stem}.png")
    return img_dir, ann_dir


def test_pool_over_synthetic_set(tmp_path: Path) -> None:
    files = make_synthetic_segmentation(tmp_path / "s", num_images=5, image_size=(16, 24))
    pool = load_segmentation_folder(files.img_dir, files.ann_dir, CLASSES)
    assert isinstance(pool, SegmentationPool) and len(pool) == 5
    assert pool.ids == [f"{i:06d}.png" for i in range(5)] and pool.classes == CLASSES
    image = pool.read_image("000001.png")
    assert image.shape == (3, 16, 24) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    expected = np.asarray(Image.open(files.img_dir / "000001.png"))[..., 0] / 255.0
    assert np.allclose(image[1].numpy(), expected)
    gt = pool.target("000001.png")["gt_sem_seg"]
    assert gt.dtype == torch.long and gt.shape == (16, 24)
    assert torch.equal(gt, torch.from_numpy(np.array(Image.open(files.ann_dir / "000001.png"))))
    assert pool.num_pixels("000003.png") == 16 * 24


def test_take_batches_in_requested_order_and_subset(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"c": (8, 8), "a": (6, 10), "b": (12, 4)})
    pool = load_segmentation_folder(img_dir, ann_dir, CLASSES)
    assert pool.ids == ["a.png", "b.png", "c.png"]
    order = ["c.png", "a.png", "b.png"]
    batches = list(pool.batches(order, batch_size=2))
    assert [list(b.ids) for b in batches] == [["c.png", "a.png"], ["b.png"]]
    batch = batches[0]
    assert isinstance(batch, Batch) and isinstance(batch.inputs, list)
    assert [tuple(x.shape) for x in batch.inputs] == [(3, 8, 8), (3, 6, 10)]
    assert batch.data_samples is not None
    sample = batch.data_samples[1]
    assert sample["img_shape"] == (6, 10) and sample["img_path"] == str(img_dir / "a.png")
    assert sample["gt_sem_seg"][:, 0].tolist() == [0, 1, 2, 3, 0, 1]
    stripped = batch.without_labels().data_samples
    assert stripped is not None and "gt_sem_seg" not in stripped[0]
    sub = pool.subset(["b.png", "a.png"])
    assert sub.ids == ["b.png", "a.png"] and sub.num_pixels("b.png") == 48
    with pytest.raises(KeyError, match=r"nope\.png"):
        pool.subset(["nope.png"])


def test_grayscale_palette_and_ignore_values(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"a": (5, 5)})
    mask = Image.fromarray(np.array([[0, 3, 255, 1, 2]] * 5, np.uint8)).convert("P")
    mask.save(ann_dir / "a.png")
    pool = load_segmentation_folder(img_dir, ann_dir, CLASSES)
    assert pool.target("a.png")["gt_sem_seg"][0].tolist() == [0, 3, 255, 1, 2]
    assert pool.read_image("a.png").shape == (3, 5, 5)


def test_unlabeled_pool(tmp_path: Path) -> None:
    img_dir, _ = _folder(tmp_path, {"a": (4, 4)})
    pool = load_segmentation_folder(img_dir, None, CLASSES)
    batch = pool.take(["a.png"])
    assert batch.data_samples == [{"img_shape": (4, 4), "img_path": str(img_dir / "a.png")}]
    with pytest.raises(ValueError, match="unlabeled"):
        pool.target("a.png")


def _error(img_dir: Path, ann_dir: Path) -> str:
    with pytest.raises(ValueError) as info:
        load_segmentation_folder(img_dir, ann_dir, CLASSES)
    return str(info.value)


def test_missing_and_extra_masks_are_named(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"a": (4, 4), "b": (4, 4)})
    (ann_dir / "a.png").unlink()
    (ann_dir / "stray.png").write_bytes((ann_dir / "b.png").read_bytes())
    message = _error(img_dir, ann_dir)
    assert "2 problem(s)" in message
    assert "1 images without a mask" in message and "a.png" in message
    assert "1 masks without an image" in message and "stray.png" in message


def test_wrong_size_rgb_and_out_of_range_masks(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"big": (6, 6), "rgb": (4, 4), "seven": (4, 4)})
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(ann_dir / "big.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(ann_dir / "rgb.png")
    Image.fromarray(np.array([[7, 0, 255, 9]] * 4, np.uint8)).save(ann_dir / "seven.png")
    message = _error(img_dir, ann_dir)
    assert "big.png is (5, 6), big.png is (6, 6)" in message
    assert "not single-channel" in message and "rgb.png (3 channels)" in message
    assert "seven.png has [7, 9]" in message
    assert "0..3 (background, liver, kidney, lesion) or ignore_index 255" in message


def test_unreadable_and_empty_folders(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"a": (4, 4)})
    (img_dir / "broken.png").write_bytes(b"not a png")
    (ann_dir / "broken.png").write_bytes(b"not a png")
    assert "unreadable files" in _error(img_dir, ann_dir)
    with pytest.raises(ValueError, match="holds no"):
        load_segmentation_folder(tmp_path / "ann", None, CLASSES, img_suffix=".jpg")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_segmentation_folder(tmp_path / "missing", None, CLASSES)


def test_many_problems_are_listed_with_a_count(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {f"x{i}": (4, 4) for i in range(8)})
    for mask in ann_dir.iterdir():
        mask.unlink()
    message = _error(img_dir, ann_dir)
    assert "8 images without a mask" in message and "... and 3 more" in message


def test_suffixes_pair_image_and_mask(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"a": (4, 4)})
    (ann_dir / "a.png").rename(ann_dir / "a_mask.png")
    pool = load_segmentation_folder(img_dir, ann_dir, CLASSES, seg_map_suffix="_mask.png")
    assert pool.mask_path("a.png") == ann_dir / "a_mask.png"
    assert pool.target("a.png")["gt_sem_seg"].shape == (4, 4)


def test_registered_loader(tmp_path: Path) -> None:
    img_dir, ann_dir = _folder(tmp_path, {"a": (4, 4)})
    assert DATASETS.get("segmentation_folder") is load_segmentation_folder
    pool = build(
        DATASETS,
        dict(type="segmentation_folder", img_dir=img_dir, ann_dir=ann_dir, classes=CLASSES),
    )
    assert pool.ids == ["a.png"]


def test_check_mask() -> None:
    good = np.array([[0, 1], [3, 255]], np.uint8)
    check_mask(good, (2, 2), 4)
    check_mask(torch.from_numpy(good).long(), (2, 2), 4)
    with pytest.raises(
        ValueError, match=r"m.png: mask has shape \(2, 2\) but its image is \(2, 3\)"
    ):
        check_mask(good, (2, 3), 4, where="m.png")
    with pytest.raises(ValueError, match="dtype float32"):
        check_mask(good.astype(np.float32), (2, 2), 4)
    with pytest.raises(ValueError, match="dtype bool"):
        check_mask(good > 0, (2, 2), 4)
    with pytest.raises(ValueError, match=r"value\(s\) \[255\] outside classes 0..3"):
        check_mask(good, (2, 2), 4, ignore_index=-1)
    with pytest.raises(ValueError, match=r"\[3\]"):
        check_mask(good, (2, 2), 3)
