"""Query masks out and label masks back in, for 2D images and NIfTI volumes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from taskal.adapters._segmentation import PixelRegions
from taskal.data import (
    load_segmentation_folder,
    load_volume_slices,
    make_synthetic_segmentation,
    make_synthetic_volumes,
)
from taskal.masks import MaskStore, export_queries, import_masks, item_file
from taskal.queries import Query

CLASSES = ("background", "liver", "kidney", "lesion")


@pytest.fixture
def images(tmp_path: Path):  # type: ignore[no-untyped-def]
    files = make_synthetic_segmentation(tmp_path / "data", num_images=3, image_size=(16, 24))
    return load_segmentation_folder(files.img_dir, files.ann_dir, CLASSES)


@pytest.fixture
def volumes(tmp_path: Path):  # type: ignore[no-untyped-def]
    files = make_synthetic_volumes(tmp_path / "vol", num_volumes=2, shape=(6, 16, 16))
    return load_volume_slices(files.image_dir, files.label_dir, CLASSES, axis=2)


def test_png_queries_round_trip(images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = images.ids[0], images.ids[1]
    regions = PixelRegions(patch=8)
    queries = [Query(a, 0, cost=64.0, score=0.9), Query(a, 4, cost=64.0), Query(b, None)]
    manifest = export_queries(queries, images, regions, tmp_path / "out")
    listed = json.loads(manifest.read_text())["queries"]
    assert [q["item"] for q in listed] == [a, a, b] and listed[1]["score"] is None
    mask_a = np.asarray(Image.open(tmp_path / "out" / item_file(a)))
    want = np.zeros((16, 24), np.uint8)
    want[:8, :8] = 1  # patch 0
    want[8:, 8:16] = 1  # patch 4 (3 patches per row)
    assert np.array_equal(mask_a, want)
    assert np.asarray(Image.open(tmp_path / "out" / item_file(b))).all()
    with pytest.raises(FileExistsError):
        export_queries(queries, images, regions, tmp_path / "out")
    # the annotator answers the queried pixels; the rest stays 255
    truth = images.target(a)["gt_sem_seg"].numpy().astype(np.uint8)
    answer = np.where(want == 1, truth, 255).astype(np.uint8)
    (tmp_path / "back").mkdir()
    Image.fromarray(answer).save(tmp_path / "back" / item_file(a))
    store = MaskStore(tmp_path / "labels", images)
    assert import_masks(store, tmp_path / "back", queried=[a, b]) == {a: 128}
    assert np.array_equal(store.labels(a), answer) and store.labels(b) is None


def test_imports_never_overwrite_and_check_everything_first(images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = images.ids[0], images.ids[1]
    store = MaskStore(tmp_path / "labels", images)
    first = np.full((16, 24), 255, np.uint8)
    first[0, :4] = 1
    store.record({a: first})
    back = tmp_path / "back"
    back.mkdir()
    clash = first.copy()
    clash[0, 0] = 2
    Image.fromarray(clash).save(back / item_file(a))
    fine = np.full((16, 24), 255, np.uint8)
    fine[5, 5] = 3
    Image.fromarray(fine).save(back / item_file(b))
    with pytest.raises(ValueError, match="1 pixels already carry another label"):
        import_masks(store, back)
    assert store.labels(b) is None, "nothing recorded when one file fails"
    assert np.array_equal(store.labels(a), first)
    import_masks(store, back, overwrite=True)
    assert store.labels(a)[0, 0] == 2 and store.labeled_pixels(b) == 1
    # adding labels to unlabeled pixels is no clash
    more = np.full((16, 24), 255, np.uint8)
    more[9, 9] = 1
    store.record({a: more})
    assert store.labeled_pixels(a) == 5


@pytest.mark.parametrize(
    "mask, match",
    [
        (np.zeros((8, 8), np.uint8), r"shape \(8, 8\)"),
        (np.full((16, 24), 7, np.uint8), r"value\(s\) \[7\]"),
    ],
)
def test_bad_masks_name_what_to_fix(images, tmp_path: Path, mask: np.ndarray, match: str) -> None:  # type: ignore[no-untyped-def]
    back = tmp_path / "back"
    back.mkdir()
    Image.fromarray(mask).save(back / item_file(images.ids[0]))
    store = MaskStore(tmp_path / "labels", images)
    with pytest.raises(ValueError, match=match):
        import_masks(store, back)
    assert not list((tmp_path / "labels").iterdir())


def test_unknown_files_and_unqueried_items_are_refused(images, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    back = tmp_path / "back"
    back.mkdir()
    Image.fromarray(np.zeros((16, 24), np.uint8)).save(back / "someone_else.png")
    store = MaskStore(tmp_path / "labels", images)
    with pytest.raises(ValueError, match="matches no item"):
        import_masks(store, back)
    (back / "someone_else.png").unlink()
    Image.fromarray(np.zeros((16, 24), np.uint8)).save(back / item_file(images.ids[2]))
    with pytest.raises(ValueError, match="never queried"):
        import_masks(store, back, queried=[images.ids[0]])


def test_volume_queries_align_with_the_scan_and_come_back(volumes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    vol = volumes.volumes[0]
    item = f"{vol}#2:003"
    export_queries([Query(item, None)], volumes, None, tmp_path / "out")
    exported = nib.load(tmp_path / "out" / vol)
    scan = nib.load(volumes.image_path(vol))
    assert exported.shape == scan.shape and np.allclose(exported.affine, scan.affine)
    data = np.asarray(exported.dataobj)
    assert data[:, :, 3].all() and not data[:, :, [0, 1, 2, 4, 5]].any()
    # the annotator labels slice 3 and returns a label volume on the scan's grid
    labels = np.full(scan.shape, 255, np.uint8)
    labels[:, :, 3] = volumes.target(item)["gt_sem_seg"].numpy()
    (tmp_path / "back").mkdir()
    nib.save(nib.Nifti1Image(labels, scan.affine), tmp_path / "back" / vol)
    store = MaskStore(tmp_path / "labels", volumes)
    assert import_masks(store, tmp_path / "back") == {item: 6 * 16}  # a [6, 16] slice
    assert np.array_equal(store.labels(item), labels[:, :, 3])
    # another affine (shifted origin) is refused and changes nothing
    moved = scan.affine.copy()
    moved[0, 3] += 5.0
    nib.save(nib.Nifti1Image(labels, moved), tmp_path / "back" / vol)
    with pytest.raises(ValueError, match="affine"):
        import_masks(store, tmp_path / "back", overwrite=True)
    assert np.array_equal(store.labels(item), labels[:, :, 3])


def test_items_that_would_share_a_label_file_are_refused(tmp_path: Path) -> None:
    from types import SimpleNamespace

    pool = SimpleNamespace(ids=["sub/a.png", "sub_a.png"], classes=CLASSES)
    with pytest.raises(ValueError, match=r"would share the label file 'sub_a\.png'"):
        MaskStore(tmp_path / "labels", pool)


def test_volume_imports_stay_inside_the_pool(volumes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A pool split by scan: a label volume for the other scan, or for a slice the pool
    does not hold, is refused and nothing is recorded."""
    first, second = volumes.volumes[0], volumes.volumes[1]
    mine = volumes.subset([i for i in volumes.ids if volumes.volume_of(i) == first][:4])
    store = MaskStore(tmp_path / "labels", mine)
    scan = nib.load(volumes.image_path(second))
    labels = np.full(scan.shape, 255, np.uint8)
    labels[:, :, 0] = 0
    back = tmp_path / "back"
    back.mkdir()
    nib.save(nib.Nifti1Image(labels, scan.affine), back / second)
    with pytest.raises(ValueError, match="is not a scan of this pool"):
        import_masks(store, back)
    (back / second).unlink()
    labels[:, :, 0] = 255
    labels[:, :, 9] = 1  # slice 9 of the first scan: not among mine's 4 slices
    nib.save(nib.Nifti1Image(labels, nib.load(volumes.image_path(first)).affine), back / first)
    with pytest.raises(ValueError, match="labels slice 9, which is not an item of this pool"):
        import_masks(store, back)
    assert not list((tmp_path / "labels").iterdir())
