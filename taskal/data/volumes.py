"""2D slices of 3D NIfTI volumes as a pool, and label volumes written back beside them.

:func:`load_volume_slices` turns a folder of volumes (``*.nii`` / ``*.nii.gz``, e.g. an
nnU-Net ``imagesTr``) and optionally a folder of label volumes of the same file names into a
:class:`VolumeSlicePool` whose items are slices along one array axis, with ids such as
``"case_000.nii.gz#2:017"`` (volume file name, axis, slice index). Volumes are read lazily
through nibabel's array proxies and at most :data:`CACHED_VOLUMES` arrays stay in memory,
so a pool of many scans costs little.

:func:`write_label_volume` and :func:`read_label_volume` move labels between slices and
whole volumes aligned with a reference scan (same shape, affine and header): to export a
round's queries for annotation and to import the masks that come back.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from taskal.data.segmentation import Problems, bad_label_values, check_mask, describe_classes
from taskal.data.synthetic_seg import SYNTHETIC_SEG_CLASSES
from taskal.registry import DATASETS
from taskal.types import Batch, ItemId

#: how many volumes' arrays (image and label count separately) a pool keeps in memory.
CACHED_VOLUMES = 2
#: largest difference between two affines' entries that still counts as the same geometry.
AFFINE_ATOL = 1e-4
#: the percentiles each volume's intensities are clipped to before scaling to [0, 1].
PERCENTILES = (0.5, 99.5)
_SUFFIXES = (".nii.gz", ".nii")


def _load(path: Path) -> Any:
    import nibabel as nib

    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises several types for corrupt files
        raise OSError(f"cannot read NIfTI file {path}: {err}") from err


def _volume_files(folder: Path) -> dict[str, Path]:
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name.endswith(_SUFFIXES) and not p.name.startswith(".")
    }


def _label_name(image_name: str, labels: dict[str, Path]) -> str | None:
    """The label file of an image: the same name, or nnU-Net's name without ``_0000``."""
    if image_name in labels:
        return image_name
    for suffix in _SUFFIXES:
        stem = image_name[: -len(suffix)]
        if image_name.endswith(suffix) and stem.endswith("_0000"):
            name = stem[:-5] + suffix
            return name if name in labels else None
    return None


def _label_array(img: Any) -> np.ndarray:
    """A label volume's values as integers; float files must hold whole numbers."""
    data = np.asarray(img.dataobj)
    if np.issubdtype(data.dtype, np.integer):
        return data
    if not np.isfinite(data).all() or not np.equal(np.round(data), data).all():
        raise ValueError("holds non-integral values; labels must be whole class indices")
    return data.astype(np.int64)


class _ArrayCache:
    """The last few arrays read, least recently used dropped first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._arrays: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()

    def get(self, key: tuple[str, str], path: Path, kind: str) -> np.ndarray:
        if key in self._arrays:
            self._arrays.move_to_end(key)
            return self._arrays[key]
        img = _load(path)
        array = _label_array(img) if kind == "label" else np.asarray(img.dataobj, np.float32)
        self._arrays[key] = array
        while len(self._arrays) > self.size:
            self._arrays.popitem(last=False)
        return array

    def __len__(self) -> int:
        return len(self._arrays)


class VolumeSlicePool:
    """Slices of 3D volumes along ``axis``, addressed by ``"<volume>#<axis>:<index:03d>"``.

    Build it with :func:`load_volume_slices`. A slice of a volume of array shape
    ``(X, Y, Z)`` along axis 2 is ``[X, Y]`` (the remaining axes in array order), and so on.
    An item's data sample is ``{"gt_sem_seg": long [H, W], "img_shape": (H, W),
    "img_path": volume path, "slice": (axis, index)}`` (no ``gt_sem_seg`` when unlabeled).

    Attributes:
        ids: stable slice ids, volumes in file-name order, slices ascending.
        volumes: the volume file names (the first part of every id).
        classes: class names; label values index them.
        axis: the slicing axis (0, 1 or 2).
        ignore_index: the label value of unlabeled voxels.
    """

    def __init__(
        self,
        images: dict[str, Path],
        labels: dict[str, Path] | None,
        classes: Sequence[str],
        axis: int,
        ignore_index: int,
        headers: dict[str, tuple[tuple[int, int, int], np.ndarray]],
        ids: Sequence[ItemId] | None = None,
        cache: _ArrayCache | None = None,
    ) -> None:
        self._images = images
        self._labels = labels
        self._headers = headers
        self._ranges: dict[str, tuple[float, float]] = {}
        self._cache = _ArrayCache(CACHED_VOLUMES) if cache is None else cache
        self.classes = tuple(classes)
        self.axis = axis
        self.ignore_index = ignore_index
        self.volumes = list(images)
        if ids is None:
            ids = [f"{v}#{axis}:{k:03d}" for v in self.volumes for k in range(headers[v][0][axis])]
        self.ids: list[ItemId] = list(ids)
        for item in self.ids:
            self._parse(item)

    def __len__(self) -> int:
        return len(self.ids)

    def _parse(self, item: ItemId) -> tuple[str, int]:
        """``(volume name, slice index)`` of an id; ``KeyError`` if it is not in this pool."""
        name, _, where = str(item).rpartition("#")
        axis, _, index = where.partition(":")
        ok = name in self._headers and axis == str(self.axis) and index.isdigit()
        if not ok or int(index) >= self._headers[name][0][self.axis]:
            raise KeyError(
                f"{item!r} is not a slice of this pool (ids look like "
                f"'<volume file>#{self.axis}:<index>', volumes {self.volumes[:3]}...)"
            )
        return name, int(index)

    def volume_of(self, item: ItemId) -> str:
        """The file name of the volume ``item`` is a slice of."""
        return self._parse(item)[0]

    def shape(self, volume: str) -> tuple[int, int, int]:
        """The array shape of ``volume`` (a file name), from its header."""
        return self._headers[volume][0]

    def affine(self, volume: str) -> np.ndarray:
        """The ``[4, 4]`` voxel-to-world affine of ``volume`` (a copy)."""
        return self._headers[volume][1].copy()

    def image_path(self, volume: str) -> Path:
        return self._images[volume]

    def slice_shape(self, volume: str) -> tuple[int, int]:
        """``(H, W)`` of ``volume``'s slices along :attr:`axis`."""
        dims = [n for a, n in enumerate(self.shape(volume)) if a != self.axis]
        return dims[0], dims[1]

    def num_pixels(self, item: ItemId) -> int:
        """``H * W`` of the slice, from the header."""
        h, w = self.slice_shape(self.volume_of(item))
        return h * w

    def _index(self, index: int) -> tuple[Any, ...]:
        where: list[Any] = [slice(None)] * 3
        where[self.axis] = index
        return tuple(where)

    def read_image(self, item: ItemId) -> torch.Tensor:
        """The slice as float ``[3, H, W]`` in ``[0, 1]``: the volume's intensities clipped to
        its :data:`PERCENTILES` and scaled (one scale per volume), copied to 3 channels."""
        name, index = self._parse(item)
        volume = self._cache.get(("image", name), self._images[name], "image")
        if name not in self._ranges:
            lo, hi = np.percentile(volume, PERCENTILES)
            self._ranges[name] = float(lo), float(hi)
        lo, hi = self._ranges[name]
        pixels = (np.clip(volume[self._index(index)], lo, hi) - lo) / max(hi - lo, 1e-12)
        return torch.from_numpy(np.ascontiguousarray(pixels, np.float32)).expand(3, -1, -1).clone()

    def target(self, item: ItemId) -> dict[str, torch.Tensor]:
        """``{"gt_sem_seg": long [H, W]}``; raises ``ValueError`` for an unlabeled pool."""
        name, index = self._parse(item)
        if self._labels is None:
            raise ValueError(
                f"{item!r} has no label: the pool was loaded without label_dir (unlabeled)"
            )
        labels = self._cache.get(("label", name), self._labels[name], "label")
        return {"gt_sem_seg": torch.from_numpy(labels[self._index(index)].astype(np.int64))}

    def data_sample(self, item: ItemId) -> dict[str, Any]:
        """The slice's metainfo (and ground truth when labeled), without its pixels."""
        name, index = self._parse(item)
        sample: dict[str, Any] = {
            "img_shape": self.slice_shape(name),
            "img_path": str(self._images[name]),
            "slice": (self.axis, index),
        }
        if self._labels is not None:
            sample.update(self.target(item))
        return sample

    def take(self, ids: Sequence[ItemId]) -> Batch:
        """All of ``ids`` as one batch: a list of ``[3, H_i, W_i]`` slices and data samples."""
        ids = list(ids)
        samples = [self.data_sample(i) for i in ids]
        return Batch([self.read_image(i) for i in ids], ids, None, samples)

    def batches(self, ids: Sequence[ItemId], batch_size: int) -> Iterator[Batch]:
        """``ids`` in the given order, ``batch_size`` at a time (keep slices of a volume
        together for cache hits)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids = list(ids)
        for start in range(0, len(ids), batch_size):
            yield self.take(ids[start : start + batch_size])

    def subset(self, ids: Sequence[ItemId]) -> VolumeSlicePool:
        """A pool over ``ids`` only (in that order), sharing files, headers and the cache."""
        pool = VolumeSlicePool(
            self._images,
            self._labels,
            self.classes,
            self.axis,
            self.ignore_index,
            self._headers,
            ids,
            self._cache,
        )
        pool._ranges = self._ranges
        return pool


def _check_volume(
    name: str,
    image: Path,
    label: Path | None,
    classes: Sequence[str],
    ignore_index: int,
    problems: Problems,
) -> tuple[tuple[int, int, int], np.ndarray] | None:
    """Shape and affine of a readable 3D volume (checked against its label), else ``None``."""
    try:
        img = _load(image)
    except OSError as err:
        problems.add("unreadable files (replace or remove them)", str(err))
        return None
    if len(img.shape) != 3:
        problems.add("volumes that are not 3D (one channel per file)", f"{name} {img.shape}")
        return None
    shape, affine = tuple(int(n) for n in img.shape), np.asarray(img.affine, np.float64)
    if label is None:
        return (shape[0], shape[1], shape[2]), affine
    try:
        lab = _load(label)
    except OSError as err:
        problems.add("unreadable files (replace or remove them)", str(err))
        return None
    problem = _label_problem(lab, shape, affine, classes, ignore_index)
    if problem is not None:
        problems.add(f"label volumes that do not fit their image ({problem[0]})", problem[1])
    return (shape[0], shape[1], shape[2]), affine


def _label_problem(
    lab: Any,
    shape: Sequence[int],
    affine: np.ndarray,
    classes: Sequence[str] | int,
    ignore_index: int,
) -> tuple[str, str] | None:
    """``(kind, detail)`` of what is wrong with a label volume against its image, or None."""
    name = Path(lab.get_filename()).name
    if tuple(lab.shape) != tuple(shape):
        return "shape", f"{name} is {tuple(lab.shape)}, its image {tuple(shape)}"
    if not np.allclose(np.asarray(lab.affine), affine, atol=AFFINE_ATOL, rtol=0):
        diff = float(np.abs(np.asarray(lab.affine) - affine).max())
        return "affine", f"{name} differs from its image's affine by up to {diff:.3g}"
    try:
        data = _label_array(lab)
    except ValueError as err:
        return "values", f"{name} {err}"
    num = classes if isinstance(classes, int) else len(classes)
    bad = bad_label_values(data, num, ignore_index)
    if bad:
        return (
            "values",
            f"{name} has {bad[:10]}, expected {describe_classes(classes, ignore_index)}",
        )
    return None


@DATASETS.register_module(name="volume_slices")
def load_volume_slices(
    image_dir: str | Path,
    label_dir: str | Path | None = None,
    classes: Sequence[str] = SYNTHETIC_SEG_CLASSES,
    axis: int = 2,
    ignore_index: int = 255,
) -> VolumeSlicePool:
    """A pool of the 2D slices along ``axis`` of the volumes in ``image_dir``, validated.

    Registered in ``DATASETS`` as ``"volume_slices"``. Volumes are the ``*.nii`` and
    ``*.nii.gz`` files in ``image_dir``; the label volume of ``x.nii.gz`` is
    ``label_dir/x.nii.gz`` (nnU-Net's ``x_0000.nii.gz`` also pairs with ``x.nii.gz``).
    Without ``label_dir`` the pool is unlabeled. Only headers are read for images; every
    label volume is decoded once to check its values. Nothing is written.

    Checked, all at once: readable 3D volumes; every image has a label volume and every
    label volume an image; same shape and affine (within :data:`AFFINE_ATOL`); whole-number
    labels in ``0..C-1`` or ``ignore_index``.

    Raises:
        FileNotFoundError: a folder does not exist.
        ValueError: ``axis`` not in 0..2, no volumes, bad ``classes``, or any problem above;
            the message groups problems by kind and names the files.
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2 (an array axis of the 3D volumes), got {axis}")
    if not classes or len(set(classes)) != len(classes) or 0 <= ignore_index < len(classes):
        raise ValueError(
            f"classes must be distinct names and ignore_index ({ignore_index}) no class index, "
            f"got {list(classes)}"
        )
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"volume folder {image_dir} does not exist")
    images = _volume_files(image_dir)
    if not images:
        raise ValueError(f"volume folder {image_dir} holds no *.nii or *.nii.gz files")
    problems = Problems()
    labels: dict[str, Path] | None = None
    if label_dir is not None:
        label_dir = Path(label_dir)
        if not label_dir.is_dir():
            raise FileNotFoundError(f"label folder {label_dir} does not exist")
        found = _volume_files(label_dir)
        pairs = {name: _label_name(name, found) for name in images}
        for name, label in pairs.items():
            if label is None:
                problems.add(f"volumes without a label volume in {label_dir}", name)
        for name in sorted(set(found) - set(pairs.values())):
            problems.add(f"label volumes without a volume in {image_dir}", name)
        labels = {name: found[label] for name, label in pairs.items() if label is not None}
    headers = {}
    for name, path in images.items():
        label_path = None if labels is None else labels.get(name)
        header = _check_volume(name, path, label_path, classes, ignore_index, problems)
        if header is not None:
            headers[name] = header
    problems.raise_if_any(f"volumes in {image_dir} (labels in {label_dir})")
    return VolumeSlicePool(images, labels, classes, axis, ignore_index, headers)


def write_label_volume(
    path: str | Path,
    label_slices: dict[int, np.ndarray],
    reference: str | Path,
    axis: int,
    fill: int = 255,
    overwrite: bool = False,
) -> Path:
    """Write a uint8 label volume aligned with ``reference``, given some of its slices.

    The volume has the reference's shape, affine and header (data type set to uint8, no
    intensity scaling); slice ``k`` along ``axis`` is ``label_slices[k]`` (``[H, W]``
    integers in ``0..255``, laid out as :meth:`VolumeSlicePool.read_image` gives slices) and
    every other voxel is ``fill`` (the ignore index: unlabeled). The file is written to a
    temporary name in the same folder and then renamed, so a reader never sees half a file.

    Returns:
        ``path``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: ``axis`` out of range, a slice index out of range, or a slice of the
            wrong shape, dtype or values.
    """
    import nibabel as nib

    path, ref = Path(path), _load(Path(reference))
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if not path.name.endswith(_SUFFIXES):
        raise ValueError(f"{path} must end with .nii or .nii.gz")
    if len(ref.shape) != 3 or axis not in (0, 1, 2):
        raise ValueError(f"need a 3D reference and axis 0..2, got {ref.shape} and axis {axis}")
    if not 0 <= fill <= 255:
        raise ValueError(f"fill must fit in uint8 (0..255), got {fill}")
    data = np.full(ref.shape, fill, dtype=np.uint8)
    hw = tuple(n for a, n in enumerate(ref.shape) if a != axis)
    for index, labels in label_slices.items():
        if not 0 <= index < ref.shape[axis]:
            raise ValueError(f"slice {index} is outside 0..{ref.shape[axis] - 1} along axis {axis}")
        check_mask(labels, (hw[0], hw[1]), 256, ignore_index=-1, where=f"slice {index}")
        where: list[Any] = [slice(None)] * 3
        where[axis] = index
        data[tuple(where)] = labels
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    out = nib.Nifti1Image(data, ref.affine, header)
    out.header.set_slope_inter(1.0, 0.0)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        nib.save(out, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def read_label_volume(
    path: str | Path,
    reference: str | Path,
    classes: Sequence[str] | int,
    ignore_index: int = 255,
) -> np.ndarray:
    """A label volume checked against its reference scan, as an integer array.

    Args:
        path: the label volume (e.g. returned by an annotator).
        reference: the scan it labels.
        classes: class names (or their number ``C``); values must be ``0..C-1`` or
            ``ignore_index``.
        ignore_index: the value of unlabeled voxels.

    Returns:
        The labels in the reference's array shape: uint8 when every allowed value fits,
        else int64.

    Raises:
        ValueError: another shape or affine than the reference (within
            :data:`AFFINE_ATOL`), non-integral values or values outside the classes.
    """
    ref = _load(Path(reference))
    lab = _load(Path(path))
    if len(ref.shape) != 3:
        raise ValueError(f"reference {reference} is not a 3D volume: shape {ref.shape}")
    problem = _label_problem(lab, ref.shape, np.asarray(ref.affine), classes, ignore_index)
    if problem is not None:
        fix = {
            "shape": "re-export it on the reference scan's grid",
            "affine": "re-export it on the reference scan's grid (same orientation and origin)",
            "values": "relabel those voxels with class indices or the ignore index",
        }[problem[0]]
        raise ValueError(
            f"label volume {path} does not fit {reference} ({problem[0]}): {problem[1]}; {fix}"
        )
    data = _label_array(lab)
    num = classes if isinstance(classes, int) else len(classes)
    fits = num <= 256 and 0 <= ignore_index <= 255
    return data.astype(np.uint8 if fits else np.int64)
