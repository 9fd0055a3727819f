from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from taskal.data import (
    SYNTHETIC_SEG_CLASSES,
    ensure_synthetic_segmentation,
    ensure_synthetic_volumes,
    make_synthetic_segmentation,
    make_synthetic_volumes,
)
from taskal.registry import DATASETS, build


def _arrays(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.iterdir())])


def test_writes_rgb_images_and_index_masks_of_the_same_size(tmp_path: Path) -> None:
    files = make_synthetic_segmentation(tmp_path / "set", num_images=4, image_size=(24, 40))
    assert files.img_dir == tmp_path / "set" / "images"
    assert files.ann_dir == tmp_path / "set" / "masks"
    assert sorted(p.name for p in files.img_dir.iterdir()) == [f"{i:06d}.png" for i in range(4)]
    for png in files.img_dir.iterdir():
        with Image.open(png) as im, Image.open(files.ann_dir / png.name) as mask:
            assert im.mode == "RGB" and mask.mode == "L" and im.size == mask.size == (40, 24)
            pixels = np.asarray(im)
            assert (pixels[..., 0] == pixels[..., 1]).all() and (
                pixels[..., 1] == pixels[..., 2]
            ).all()
    assert set(np.unique(_arrays(files.ann_dir))) <= {0, 1, 2, 3}
    meta = json.loads(files.meta_file.read_text())
    assert meta["classes"] == list(SYNTHETIC_SEG_CLASSES) and meta["seed"] == 0
    assert meta["arguments"]["image_size"] == [24, 40]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = make_synthetic_segmentation(tmp_path / "a", num_images=3, image_size=(32, 32), seed=5)
    b = make_synthetic_segmentation(tmp_path / "b", num_images=3, image_size=(32, 32), seed=5)
    c = make_synthetic_segmentation(tmp_path / "c", num_images=3, image_size=(32, 32), seed=6)
    for sub in ("images", "masks"):
        for png in sorted((a.root / sub).iterdir()):
            assert png.read_bytes() == (b.root / sub / png.name).read_bytes()
    assert (a.img_dir / "000000.png").read_bytes() != (c.img_dir / "000000.png").read_bytes()
    assert not np.array_equal(_arrays(a.ann_dir), _arrays(c.ann_dir))


def test_classes_present_lesions_rare_and_small(tmp_path: Path) -> None:
    files = make_synthetic_segmentation(tmp_path / "set", num_images=24, image_size=(32, 32))
    masks = _arrays(files.ann_dir)
    fractions = np.bincount(masks.ravel(), minlength=4) / masks.size
    assert (fractions > 0).all()
    assert fractions[0] > 0.5 and fractions[3] < 0.2 * min(fractions[1], fractions[2])
    with_lesion = (masks == 3).any(axis=(1, 2))
    assert 0 < with_lesion.sum() < len(masks)
    none = make_synthetic_segmentation(tmp_path / "none", num_images=8, lesion_prob=0.0)
    assert not (_arrays(none.ann_dir) == 3).any()


def test_classes_overlap_in_intensity_but_differ_in_mean(tmp_path: Path) -> None:
    files = make_synthetic_segmentation(tmp_path / "set", num_images=16, image_size=(32, 32))
    images = _arrays(files.img_dir)[..., 0].astype(float)
    masks = _arrays(files.ann_dir)
    liver, kidney = images[masks == 1], images[masks == 2]
    background = images[masks == 0]
    assert background.mean() < liver.mean()
    # ranges overlap: no single threshold separates the two organs
    assert np.percentile(liver, 90) > np.percentile(kidney, 10)
    assert np.percentile(background, 95) > np.percentile(liver, 5)


def test_two_classes_give_one_organ_and_no_lesion(tmp_path: Path) -> None:
    files = make_synthetic_segmentation(
        tmp_path / "set", num_images=6, image_size=(16, 16), classes=("bg", "organ")
    )
    assert set(np.unique(_arrays(files.ann_dir))) == {0, 1}


def test_refuses_a_non_empty_root_and_bad_arguments(tmp_path: Path) -> None:
    root = tmp_path / "set"
    make_synthetic_segmentation(root, num_images=2, image_size=(16, 16))
    (root / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_synthetic_segmentation(root, num_images=1, image_size=(16, 16))
    make_synthetic_segmentation(root, num_images=1, image_size=(16, 16), overwrite=True)
    assert [p.name for p in (root / "masks").iterdir()] == ["000000.png"]
    assert (root / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_segmentation(tmp_path / "a", image_size=(3, 64))
    with pytest.raises(ValueError, match="distinct"):
        make_synthetic_segmentation(tmp_path / "b", classes=("bg",))
    with pytest.raises(ValueError, match="lesion_prob"):
        make_synthetic_segmentation(tmp_path / "c", lesion_prob=2.0)
    assert not (tmp_path / "a").exists()


def test_ensure_reuses_the_same_set_and_refuses_another(tmp_path: Path) -> None:
    root = tmp_path / "set"
    first = ensure_synthetic_segmentation(root, num_images=2, image_size=(16, 16), seed=1)
    stamp = (first.img_dir / "000000.png").stat().st_mtime_ns
    again = ensure_synthetic_segmentation(root, num_images=2, image_size=(16, 16), seed=1)
    assert again == first and (first.img_dir / "000000.png").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=f"{root}.*other arguments"):
        ensure_synthetic_segmentation(root, num_images=2, image_size=(16, 16), seed=2)
    with pytest.raises(ValueError, match="never overwrites"):
        ensure_synthetic_segmentation(root, overwrite=True)
    with pytest.raises(TypeError, match="unknown"):
        ensure_synthetic_segmentation(tmp_path / "other", sizes=3)


def test_registered_builders(tmp_path: Path) -> None:
    assert DATASETS.get("synthetic_segmentation") is make_synthetic_segmentation
    assert DATASETS.get("synthetic_volumes") is make_synthetic_volumes
    files = build(DATASETS, dict(type="synthetic_segmentation", root=str(tmp_path), num_images=1))
    assert np.asarray(Image.open(files.img_dir / "000000.png")).shape == (64, 64, 3)


def test_volumes_in_decathlon_layout_with_one_affine(tmp_path: Path) -> None:
    files = make_synthetic_volumes(
        tmp_path / "vol", num_volumes=2, shape=(12, 16, 10), spacing=(0.8, 0.8, 2.5), seed=3
    )
    names = ["case_000.nii.gz", "case_001.nii.gz"]
    assert sorted(p.name for p in files.image_dir.iterdir()) == names
    assert sorted(p.name for p in files.label_dir.iterdir()) == names
    for name in names:
        image, label = nib.load(files.image_dir / name), nib.load(files.label_dir / name)
        assert image.shape == label.shape == (12, 16, 10)
        assert np.allclose(image.affine, label.affine)
        assert np.allclose(np.diag(image.affine)[:3], (0.8, 0.8, 2.5))
        assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
        labels = np.asarray(label.dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2, 3} and (labels > 0).any()
    dataset = json.loads((files.root / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "background", "1": "liver", "2": "kidney", "3": "lesion"}
    assert dataset["numTraining"] == 2


def test_volume_organs_continue_across_slices(tmp_path: Path) -> None:
    files = make_synthetic_volumes(tmp_path / "vol", num_volumes=1, shape=(16, 16, 16))
    labels = np.asarray(nib.load(files.label_dir / "case_000.nii.gz").dataobj) > 0
    per_slice = labels.sum(axis=(0, 1))
    present = np.flatnonzero(per_slice)
    assert len(present) >= 3 and (np.diff(present) == 1).all()  # one contiguous run of slices
    overlap = (labels[:, :, present[:-1]] & labels[:, :, present[1:]]).sum()
    assert overlap > 0.5 * labels[:, :, present[1:]].sum()


def test_volumes_determinism_and_ensure(tmp_path: Path) -> None:
    kw = dict(num_volumes=1, shape=(8, 8, 8), seed=2)
    a = ensure_synthetic_volumes(tmp_path / "a", **kw)
    b = make_synthetic_volumes(tmp_path / "b", **kw)
    name = "case_000.nii.gz"
    for sub in ("imagesTr", "labelsTr"):
        x = np.asarray(nib.load(a.root / sub / name).dataobj)
        assert np.array_equal(x, np.asarray(nib.load(b.root / sub / name).dataobj))
    assert ensure_synthetic_volumes(tmp_path / "a", **kw) == a
    with pytest.raises(ValueError, match="other arguments"):
        ensure_synthetic_volumes(tmp_path / "a", num_volumes=2, shape=(8, 8, 8), seed=2)
