"""A pool over a semantic segmentation folder pair (mmseg layout), checked before it is used.

:func:`load_segmentation_folder` pairs every image in ``img_dir`` with the mask of the same
stem in ``ann_dir`` (``<stem><seg_map_suffix>``, mmseg's convention), checks the pair
(sizes from the file headers, single-channel masks, class indices in range) and raises one
``ValueError`` naming the offending files, before anything is scored or trained. The
returned :class:`SegmentationPool` reads pixels lazily, one batch at a time.

Masks hold one class index ``0..C-1`` per pixel, or ``ignore_index`` (255 by default) for
pixels without a label; :func:`check_mask` applies the same rules to a mask that arrives
from an annotator.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from taskal.registry import DATASETS
from taskal.types import Batch, ItemId

#: files named per kind of problem in a validation error before "... and N more".
MAX_LISTED = 5


class Problems:
    """Validation problems grouped by kind, reported as one ``ValueError``.

    Each kind (``"images without a mask"``) lists up to :data:`MAX_LISTED` examples and a
    count, so a folder with a thousand bad files still gives a readable message.
    """

    def __init__(self) -> None:
        self._kinds: dict[str, list[str]] = {}

    def add(self, kind: str, example: str) -> None:
        self._kinds.setdefault(kind, []).append(example)

    def __bool__(self) -> bool:
        return bool(self._kinds)

    def raise_if_any(self, where: str) -> None:
        """Raise ``ValueError("<where> has N problem(s): ...")`` when any was added."""
        if not self._kinds:
            return
        total = sum(len(v) for v in self._kinds.values())
        lines = []
        for kind, examples in self._kinds.items():
            listed = "; ".join(examples[:MAX_LISTED])
            more = (
                f"; ... and {len(examples) - MAX_LISTED} more" if len(examples) > MAX_LISTED else ""
            )
            lines.append(f"{len(examples)} {kind}: {listed}{more}")
        raise ValueError(f"{where} has {total} problem(s):\n  " + "\n  ".join(lines))


def bad_label_values(values: np.ndarray, num_classes: int, ignore_index: int) -> list[int]:
    """The distinct values of ``values`` that are neither a class ``0..C-1`` nor ignored."""
    values = np.asarray(values)
    invalid = ((values < 0) | (values >= num_classes)) & (values != ignore_index)
    return [int(v) for v in np.unique(values[invalid])]


def describe_classes(classes: Sequence[str] | int, ignore_index: int) -> str:
    """``"classes 0..3 (background, liver, kidney, lesion) or ignore_index 255"``."""
    if isinstance(classes, int):
        return f"classes 0..{classes - 1} or ignore_index {ignore_index}"
    return f"classes 0..{len(classes) - 1} ({', '.join(classes)}) or ignore_index {ignore_index}"


def check_mask(
    mask: np.ndarray | torch.Tensor,
    image_hw: tuple[int, int],
    num_classes: int,
    ignore_index: int = 255,
    where: str = "",
) -> None:
    """Check a label mask, e.g. one an annotator returned, before it is stored.

    Args:
        mask: ``[H, W]`` integer class indices (numpy or torch).
        image_hw: ``(H, W)`` of the image the mask labels.
        num_classes: ``C``; valid values are ``0..C-1`` and ``ignore_index``.
        ignore_index: the value of unlabeled pixels.
        where: a prefix for the message naming the mask (a file name, an item id).

    Raises:
        ValueError: one line saying what is wrong: a shape other than ``image_hw``, a
            non-integer dtype (floats, bools) or values outside the classes.
    """
    prefix = f"{where}: " if where else ""
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.shape != tuple(image_hw):
        raise ValueError(
            f"{prefix}mask has shape {array.shape} but its image is {tuple(image_hw)} (H, W); "
            "a mask needs one class index per image pixel"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{prefix}mask has dtype {array.dtype}, expected integer class indices; convert "
            "it, e.g. mask.astype(np.uint8), after checking that it holds class indices"
        )
    bad = bad_label_values(array, num_classes, ignore_index)
    if bad:
        raise ValueError(
            f"{prefix}mask has value(s) {bad[:10]} outside "
            f"{describe_classes(num_classes, ignore_index)}"
        )


class SegmentationPool:
    """Images and their masks in two folders, addressed by the image's relative file name.

    Build it with :func:`load_segmentation_folder`. An item's data sample is a dict
    ``{"gt_sem_seg": long [H, W], "img_shape": (H, W), "img_path": str}`` (without
    ``gt_sem_seg`` for an unlabeled pool, one made without ``ann_dir``).

    Attributes:
        ids: stable ids (image paths relative to ``img_dir``, posix style), sorted.
        classes: class names; mask values index them.
        ignore_index: the mask value of unlabeled pixels.
        img_dir, ann_dir: the folders (``ann_dir`` is ``None`` for an unlabeled pool).
    """

    def __init__(
        self,
        img_dir: Path,
        ann_dir: Path | None,
        classes: Sequence[str],
        sizes: dict[ItemId, tuple[int, int]],
        img_suffix: str = ".png",
        seg_map_suffix: str = ".png",
        ignore_index: int = 255,
        ids: Sequence[ItemId] | None = None,
    ) -> None:
        self.img_dir = img_dir
        self.ann_dir = ann_dir
        self.classes = tuple(classes)
        self.img_suffix = img_suffix
        self.seg_map_suffix = seg_map_suffix
        self.ignore_index = ignore_index
        self._sizes = sizes
        self.ids: list[ItemId] = sorted(sizes, key=str) if ids is None else list(ids)
        missing = [i for i in self.ids if i not in sizes]
        if missing:
            raise KeyError(f"{len(missing)} ids are not images of {img_dir}, e.g. {missing[:3]}")

    def __len__(self) -> int:
        return len(self.ids)

    def _size(self, item: ItemId) -> tuple[int, int]:
        try:
            return self._sizes[item]
        except KeyError:
            raise KeyError(f"{item!r} is not an image of {self.img_dir}") from None

    def mask_path(self, item: ItemId) -> Path:
        """Where the mask of ``item`` lives (``ann_dir / <stem><seg_map_suffix>``)."""
        if self.ann_dir is None:
            raise ValueError(f"the pool over {self.img_dir} is unlabeled (made without ann_dir)")
        return self.ann_dir / (str(item)[: -len(self.img_suffix)] + self.seg_map_suffix)

    def num_pixels(self, item: ItemId) -> int:
        """``H * W`` of ``item`` (read from the header at load time; no decoding)."""
        h, w = self._size(item)
        return h * w

    def read_image(self, item: ItemId) -> torch.Tensor:
        """The item's pixels as float ``[3, H, W]`` in ``[0, 1]`` (grayscale -> 3 channels)."""
        h, w = self._size(item)
        path = self.img_dir / str(item)
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except OSError as err:
            raise OSError(f"cannot read image {path}: {err}") from err
        if pixels.shape[:2] != (h, w):
            raise ValueError(f"image {path} changed size since the pool was loaded; reload it")
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)

    def target(self, item: ItemId) -> dict[str, torch.Tensor]:
        """``{"gt_sem_seg": long [H, W]}`` with values in ``0..C-1`` or ``ignore_index``.

        Raises:
            ValueError: the pool is unlabeled.
        """
        path = self.mask_path(item)
        with Image.open(path) as mask:
            labels = np.asarray(mask).astype(np.int64)
        check_mask(labels, self._size(item), len(self.classes), self.ignore_index, str(path))
        return {"gt_sem_seg": torch.from_numpy(labels)}

    def data_sample(self, item: ItemId) -> dict[str, Any]:
        """The item's metainfo (and ground truth when labeled), without reading its pixels."""
        sample: dict[str, Any] = {
            "img_shape": self._size(item),
            "img_path": str(self.img_dir / str(item)),
        }
        if self.ann_dir is not None:
            sample.update(self.target(item))
        return sample

    def take(self, ids: Sequence[ItemId]) -> Batch:
        """All of ``ids`` as one batch: a list of ``[3, H_i, W_i]`` images and data samples."""
        ids = list(ids)
        samples = [self.data_sample(i) for i in ids]
        return Batch([self.read_image(i) for i in ids], ids, None, samples)

    def batches(self, ids: Sequence[ItemId], batch_size: int) -> Iterator[Batch]:
        """``ids`` in the given order, ``batch_size`` at a time; pixels are read per batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids = list(ids)
        for start in range(0, len(ids), batch_size):
            yield self.take(ids[start : start + batch_size])

    def subset(self, ids: Sequence[ItemId]) -> SegmentationPool:
        """A pool over ``ids`` only (in that order), sharing this pool's folders and sizes."""
        return SegmentationPool(
            self.img_dir,
            self.ann_dir,
            self.classes,
            self._sizes,
            self.img_suffix,
            self.seg_map_suffix,
            self.ignore_index,
            ids,
        )


def _list(folder: Path, suffix: str) -> dict[str, Path]:
    """Files under ``folder`` (recursively) ending with ``suffix``, by relative posix path."""
    return {
        p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob(f"*{suffix}"))
        if p.is_file() and p.name != suffix
    }


def _header_size(path: Path, problems: Problems) -> tuple[int, int, int] | None:
    """``(H, W, bands)`` from the file header (PIL opens lazily), or ``None`` if unreadable."""
    try:
        with Image.open(path) as image:
            return image.height, image.width, len(image.getbands())
    except OSError as err:
        problems.add("unreadable files (replace or remove them)", f"{path} ({err})")
        return None


def _check_pair(
    name: str,
    image_hw: tuple[int, int],
    mask: Path,
    classes: Sequence[str],
    ignore_index: int,
    problems: Problems,
) -> None:
    header = _header_size(mask, problems)
    if header is None:
        return
    h, w, bands = header
    if bands != 1:
        problems.add(
            "masks that are not single-channel (save class indices as an 8-bit 'L' or 'P' PNG)",
            f"{mask.name} ({bands} channels)",
        )
        return
    if (h, w) != image_hw:
        problems.add(
            "masks whose size differs from their image's (H, W)",
            f"{mask.name} is {(h, w)}, {name} is {image_hw}",
        )
        return
    with Image.open(mask) as m:
        bad = bad_label_values(np.asarray(m), len(classes), ignore_index)
    if bad:
        problems.add(
            f"masks with values outside {describe_classes(classes, ignore_index)}",
            f"{mask.name} has {bad[:10]}",
        )


@DATASETS.register_module(name="segmentation_folder")
def load_segmentation_folder(
    img_dir: str | Path,
    ann_dir: str | Path | None,
    classes: Sequence[str],
    img_suffix: str = ".png",
    seg_map_suffix: str = ".png",
    ignore_index: int = 255,
) -> SegmentationPool:
    """A pool over ``img_dir`` + ``ann_dir`` (mmseg layout), validated before it is returned.

    Registered in ``DATASETS`` as ``"segmentation_folder"``. Images are the files under
    ``img_dir`` ending with ``img_suffix`` (searched recursively); the mask of
    ``sub/x<img_suffix>`` is ``ann_dir/sub/x<seg_map_suffix>``. ``ann_dir=None`` gives an
    unlabeled pool. Nothing is written.

    Checked, all at once: the image folder exists and holds images; every image has a mask
    and every mask an image; images and masks are readable; masks are single-channel, of
    their image's size, with values in ``0..C-1`` or ``ignore_index``. Sizes come from the
    headers; mask values need decoding every mask once.

    Raises:
        FileNotFoundError: ``img_dir`` or ``ann_dir`` does not exist.
        ValueError: no images, bad ``classes``, or any problem above; the message groups
            problems by kind and names up to :data:`MAX_LISTED` files of each.
    """
    img_dir = Path(img_dir)
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct names, background first, got {classes!r}")
    if 0 <= ignore_index < len(classes):
        raise ValueError(f"ignore_index {ignore_index} is a class index (0..{len(classes) - 1})")
    if not img_dir.is_dir():
        raise FileNotFoundError(f"image folder {img_dir} does not exist")
    images = _list(img_dir, img_suffix)
    if not images:
        raise ValueError(f"image folder {img_dir} holds no '*{img_suffix}' files; check img_suffix")
    problems = Problems()
    sizes: dict[ItemId, tuple[int, int]] = {}
    for name, path in images.items():
        header = _header_size(path, problems)
        if header is not None:
            sizes[name] = header[:2]
    ann = None if ann_dir is None else Path(ann_dir)
    if ann is not None:
        if not ann.is_dir():
            raise FileNotFoundError(f"mask folder {ann} does not exist")
        masks = _list(ann, seg_map_suffix)
        stems = {name[: -len(img_suffix)] for name in images}
        for name in masks:
            if name[: -len(seg_map_suffix)] not in stems:
                problems.add(f"masks without an image in {img_dir}", name)
        for name in images:
            mask = name[: -len(img_suffix)] + seg_map_suffix
            if mask not in masks:
                problems.add(f"images without a mask in {ann} (add <stem>{seg_map_suffix})", name)
            elif name in sizes:
                _check_pair(name, sizes[name], masks[mask], classes, ignore_index, problems)
    problems.raise_if_any(f"segmentation folder {img_dir} (masks in {ann})")
    return SegmentationPool(img_dir, ann, classes, sizes, img_suffix, seg_map_suffix, ignore_index)
