from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from taskal.data import (
    VolumeSlicePool,
    load_volume_slices,
    make_synthetic_volumes,
    read_label_volume,
    write_label_volume,
)
from taskal.data.volumes import _ArrayCache
from taskal.registry import DATASETS, build

CLASSES = ("background", "liver", "kidney", "lesion")
SHAPE = (6, 10, 8)
AFFINE = np.array([[0.8, 0, 0, -3.0], [0, 0.8, 0, 4.0], [0, 0, 2.5, 10.0], [0, 0, 0, 1]])


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _pair(root: Path, name: str = "a.nii.gz", scale: float = 1.0) -> tuple[Path, Path]:
    """An image (a ramp along axis 2 times ``scale``) and labels (axis-0 index % 4)."""
    image = np.broadcast_to(np.arange(SHAPE[2], dtype=np.float32) * scale, SHAPE).copy()
    labels = np.broadcast_to((np.arange(SHAPE[0]) % 4)[:, None, None], SHAPE).astype(np.uint8)
    return _save(root / "img" / name, image), _save(root / "lab" / name, labels)


def test_ids_shapes_and_samples_along_each_axis(tmp_path: Path) -> None:
    _pair(tmp_path, "b.nii.gz")
    _pair(tmp_path, "a.nii")
    for axis, (n, hw) in enumerate([(6, (10, 8)), (10, (6, 8)), (8, (6, 10))]):
        pool = load_volume_slices(tmp_path / "img", tmp_path / "lab", CLASSES, axis=axis)
        assert isinstance(pool, VolumeSlicePool) and len(pool) == 2 * n
        assert pool.volumes == ["a.nii", "b.nii.gz"]
        assert pool.ids[0] == f"a.nii#{axis}:000" and pool.ids[-1] == f"b.nii.gz#{axis}:{n - 1:03d}"
        item = f"b.nii.gz#{axis}:002"
        assert pool.read_image(item).shape == (3, *hw) and pool.num_pixels(item) == hw[0] * hw[1]
        assert pool.target(item)["gt_sem_seg"].shape == hw
        sample = pool.take([item]).data_samples[0]  # type: ignore[index]
        assert sample["slice"] == (axis, 2) and sample["img_shape"] == hw
        assert sample["img_path"] == str(tmp_path / "img" / "b.nii.gz")
    assert pool.volume_of("a.nii#2:003") == "a.nii"
    assert pool.shape("a.nii") == SHAPE and np.allclose(pool.affine("a.nii"), AFFINE)


def test_slices_match_the_arrays_and_share_one_scale_per_volume(tmp_path: Path) -> None:
    _pair(tmp_path, scale=100.0)
    pool = load_volume_slices(tmp_path / "img", tmp_path / "lab", CLASSES, axis=2)
    images = torch.stack([pool.read_image(f"a.nii.gz#2:{k:03d}") for k in range(SHAPE[2])])
    assert images.dtype == torch.float32 and float(images.min()) == 0.0
    assert float(images.max()) == 1.0 and torch.equal(images[:, 0], images[:, 2])
    means = images.mean(dim=(1, 2, 3))
    assert (means[1:] > means[:-1]).all()  # the ramp survives: one scale for all slices
    gt = pool.target("a.nii.gz#2:004")["gt_sem_seg"]
    assert gt.dtype == torch.long and gt[:, 0].tolist() == [0, 1, 2, 3, 0, 1]
    along0 = load_volume_slices(tmp_path / "img", tmp_path / "lab", CLASSES, axis=0)
    assert (along0.target("a.nii.gz#0:003")["gt_sem_seg"] == 3).all()


def test_batches_order_subset_and_bad_ids(tmp_path: Path) -> None:
    _pair(tmp_path)
    pool = load_volume_slices(tmp_path / "img", tmp_path / "lab", CLASSES)
    order = ["a.nii.gz#2:005", "a.nii.gz#2:001", "a.nii.gz#2:003"]
    assert [list(b.ids) for b in pool.batches(order, 2)] == [order[:2], order[2:]]
    sub = pool.subset(order)
    assert sub.ids == order and sub.target(order[0])["gt_sem_seg"].shape == (6, 10)
    for bad in ["a.nii.gz#2:008", "a.nii.gz#1:001", "b.nii.gz#2:001", "a.nii.gz"]:
        with pytest.raises(KeyError, match="not a slice of this pool"):
            pool.subset([bad])


def test_unlabeled_pool(tmp_path: Path) -> None:
    _pair(tmp_path)
    pool = load_volume_slices(tmp_path / "img", classes=CLASSES)
    sample = pool.take(["a.nii.gz#2:000"]).data_samples[0]
    assert set(sample) == {"img_shape", "img_path", "slice"}
    with pytest.raises(ValueError, match="without label_dir"):
        pool.target("a.nii.gz#2:000")


def test_nnunet_channel_suffix_pairs_with_the_label(tmp_path: Path) -> None:
    image, _ = _pair(tmp_path, "case_001.nii.gz")
    image.rename(image.with_name("case_001_0000.nii.gz"))
    pool = load_volume_slices(tmp_path / "img", tmp_path / "lab", CLASSES)
    assert pool.target("case_001_0000.nii.gz#2:000")["gt_sem_seg"].shape == (6, 10)


def _error(root: Path) -> str:
    with pytest.raises(ValueError) as info:
        load_volume_slices(root / "img", root / "lab", CLASSES)
    return str(info.value)


def test_mismatches_are_refused_naming_the_files(tmp_path: Path) -> None:
    _pair(tmp_path, "ok.nii.gz")
    _, moved = _pair(tmp_path, "moved.nii.gz")
    _save(moved, np.zeros(SHAPE, np.uint8), AFFINE + np.diag([0, 0, 0.01, 0]))
    _, seven = _pair(tmp_path, "seven.nii.gz")
    _save(seven, np.full(SHAPE, 7, np.uint8))
    _, small = _pair(tmp_path, "small.nii.gz")
    _save(small, np.zeros((6, 10, 7), np.uint8))
    _, frac = _pair(tmp_path, "frac.nii.gz")
    _save(frac, np.full(SHAPE, 0.5, np.float32))
    _save(tmp_path / "img" / "alone.nii.gz", np.zeros(SHAPE, np.float32))
    _save(tmp_path / "lab" / "orphan.nii.gz", np.zeros(SHAPE, np.uint8))
    _save(tmp_path / "img" / "flat.nii.gz", np.zeros((6, 10), np.float32))
    _save(tmp_path / "lab" / "flat.nii.gz", np.zeros((6, 10), np.uint8))
    message = _error(tmp_path)
    assert "7 problem(s)" in message
    assert "moved.nii.gz differs from its image's affine by up to 0.01" in message
    assert "seven.nii.gz has [7], expected classes 0..3" in message
    assert "small.nii.gz is (6, 10, 7), its image (6, 10, 8)" in message
    assert "frac.nii.gz holds non-integral values" in message
    assert "volumes without a label volume" in message and "alone.nii.gz" in message
    assert "label volumes without a volume" in message and "orphan.nii.gz" in message
    assert "not 3D" in message and "flat.nii.gz" in message
    assert "ok.nii.gz" not in message


def test_float_labels_with_whole_values_and_ignore_are_accepted(tmp_path: Path) -> None:
    _, lab = _pair(tmp_path)
    _save(lab, np.full(SHAPE, 255.0, np.float32))
    pool = load_volume_slices(tmp_path / "img", tmp_path / "lab", CLASSES)
    assert (pool.target("a.nii.gz#2:000")["gt_sem_seg"] == 255).all()


def test_bad_arguments_and_folders(tmp_path: Path) -> None:
    _pair(tmp_path)
    with pytest.raises(ValueError, match="axis"):
        load_volume_slices(tmp_path / "img", axis=3)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_volume_slices(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"no \*\.nii"):
        load_volume_slices(tmp_path)
    (tmp_path / "img" / "junk.nii.gz").write_bytes(b"junk")
    assert "unreadable" in _error(tmp_path)


def test_cache_keeps_at_most_two_arrays(tmp_path: Path) -> None:
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        _pair(tmp_path, name)
    pool = load_volume_slices(tmp_path / "img", tmp_path / "lab", CLASSES)
    for batch in pool.batches(pool.ids, 5):
        assert len(batch) > 0
    cache = pool._cache
    assert isinstance(cache, _ArrayCache) and len(cache) == 2


def test_synthetic_volumes_load_as_slices(tmp_path: Path) -> None:
    files = make_synthetic_volumes(tmp_path / "v", num_volumes=2, shape=(6, 16, 16))
    cfg = dict(type="volume_slices", image_dir=files.image_dir, label_dir=files.label_dir)
    pool = build(DATASETS, cfg)
    assert len(pool) == 32 and pool.read_image(pool.ids[7]).shape == (3, 6, 16)


def test_write_read_label_volume_round_trip(tmp_path: Path) -> None:
    image, _ = _pair(tmp_path)
    ref = nib.load(image)
    ref.header["descrip"] = b"scan 7"
    nib.save(ref, image)
    out = tmp_path / "out" / "a.nii.gz"
    out.parent.mkdir()
    first = np.arange(48, dtype=np.int64).reshape(6, 8) % 4
    write_label_volume(out, {1: first, 9: np.ones((6, 8), np.uint8)}, image, axis=1)
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.nii.gz"]  # no temp file left
    written = nib.load(out)
    assert written.get_data_dtype() == np.uint8 and written.shape == SHAPE
    assert np.allclose(written.affine, AFFINE)
    assert written.header["descrip"].tobytes().startswith(b"scan 7")
    assert np.allclose(written.header.get_zooms(), nib.load(image).header.get_zooms())
    labels = read_label_volume(out, image, CLASSES)
    assert labels.dtype == np.uint8 and labels.shape == SHAPE
    assert np.array_equal(labels[:, 1], first) and (labels[:, 9] == 1).all()
    assert (np.delete(labels, [1, 9], axis=1) == 255).all()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_label_volume(out, {}, image, axis=1)
    write_label_volume(out, {}, image, axis=1, fill=0, overwrite=True)
    assert (read_label_volume(out, image, CLASSES) == 0).all()


def test_write_label_volume_refuses_bad_slices(tmp_path: Path) -> None:
    image, _ = _pair(tmp_path)
    out = tmp_path / "x.nii.gz"
    with pytest.raises(ValueError, match=r"slice 10 is outside 0\.\.9"):
        write_label_volume(out, {10: np.zeros((6, 8), np.uint8)}, image, axis=1)
    with pytest.raises(ValueError, match=r"slice 0: mask has shape \(8, 6\)"):
        write_label_volume(out, {0: np.zeros((8, 6), np.uint8)}, image, axis=1)
    with pytest.raises(ValueError, match="dtype float"):
        write_label_volume(out, {0: np.zeros((6, 8))}, image, axis=1)
    assert not out.exists()


def test_read_label_volume_refuses_shape_affine_and_values(tmp_path: Path) -> None:
    image, lab = _pair(tmp_path)
    assert read_label_volume(lab, image, 4).shape == SHAPE
    bad = tmp_path / "bad.nii.gz"
    _save(bad, np.zeros((6, 10, 7), np.uint8))
    with pytest.raises(ValueError, match=r"\(shape\).*re-export"):
        read_label_volume(bad, image, CLASSES)
    _save(bad, np.zeros(SHAPE, np.uint8), AFFINE * 2)
    with pytest.raises(ValueError, match=r"\(affine\)"):
        read_label_volume(bad, image, CLASSES)
    _save(bad, np.full(SHAPE, 5, np.uint8))
    with pytest.raises(ValueError, match=r"\(values\).*\[5\]"):
        read_label_volume(bad, image, CLASSES)
