"""Segmentation label campaigns on disk: query masks out to annotators, label masks back in.

* :func:`export_queries` writes a round's queries as masks annotators can open beside the
  images: a PNG per 2D image, or, for slices of NIfTI volumes, one mask volume per scan
  aligned with it (same shape, affine and header), 1 where to label and 0 elsewhere, plus
  ``queries.json`` (item, region, cost, score, mask file).
* :class:`MaskStore` keeps the labels recorded so far as PNG label maps in an mmseg
  annotation folder (255 = unlabeled), so mmseg and the torchvision loop train on it as is.
* :func:`import_masks` brings returned masks in: PNG label maps named like the images, or
  NIfTI label volumes named like the scans, with **255 on every pixel left unlabeled** (0
  is a class, background, not "no label": a mask painted over the exported query mask,
  whose 0 means "not asked", must be converted first). Every file is checked first (shape,
  affine, label values; items of the pool; with ``queried``, items that were asked); if one
  fails nothing is recorded. A returned label never replaces a different label already
  recorded unless ``overwrite=True``. Each file is written atomically; a crash between
  files leaves the earlier ones recorded, each whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from taskal.adapters._segmentation import PixelRegions
from taskal.data.segmentation import check_mask
from taskal.data.volumes import VolumeSlicePool, read_label_volume, write_label_volume
from taskal.queries import Query
from taskal.types import ItemId

UNLABELED = 255


def item_file(item: ItemId, suffix: str = ".png") -> str:
    """A file name for ``item``: its id without its image suffix, ``/``, ``#`` and ``:``
    replaced (``"case_000.nii.gz#2:017"`` -> ``"case_000.nii.gz_2_017.png"``)."""
    name = str(item)
    for ext in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return "".join("_" if c in "/\\#:" else c for c in name) + suffix


def query_masks(
    queries: Sequence[Query], pool: Any, regions: PixelRegions
) -> dict[ItemId, np.ndarray]:
    """Per queried item, a ``[H, W]`` uint8 mask: 1 on the pixels to label, else 0 (a whole
    item query marks every pixel)."""
    by_item: dict[ItemId, list[Query]] = defaultdict(list)
    for q in queries:
        by_item[q.item].append(q)
    out = {}
    for item, qs in by_item.items():
        image = pool.read_image(item)
        if any(q.region is None for q in qs):
            out[item] = np.ones(tuple(image.shape[-2:]), dtype=np.uint8)
            continue
        region_map = regions.region_map(image)
        wanted = torch.tensor(sorted({int(q.region) for q in qs if q.region is not None}))
        out[item] = torch.isin(region_map, wanted).numpy().astype(np.uint8)
    return out


def export_queries(
    queries: Sequence[Query],
    pool: Any,
    regions: PixelRegions | Mapping[str, Any] | None,
    out_dir: str | Path,
    overwrite: bool = False,
) -> Path:
    """Write ``queries`` for annotators into ``out_dir`` (see the module docstring).

    Returns:
        the path of ``queries.json``.

    Raises:
        FileExistsError: ``out_dir`` holds an export already and ``overwrite`` is False.
    """
    out = Path(out_dir)
    manifest_path = out / "queries.json"
    if manifest_path.exists() and not overwrite:
        raise FileExistsError(f"{out} holds an export already; pass overwrite=True to replace it")
    out.mkdir(parents=True, exist_ok=True)
    masks = query_masks(queries, pool, PixelRegions.of(regions))
    files: dict[ItemId, str] = {}
    if isinstance(pool, VolumeSlicePool):
        per_volume: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        for item, mask in masks.items():
            per_volume[pool.volume_of(item)][int(str(item).rsplit(":", 1)[1])] = mask
        for volume, slices in per_volume.items():
            path = out / volume
            write_label_volume(path, slices, pool.image_path(volume), pool.axis, 0, overwrite)
            files.update({i: volume for i in masks if pool.volume_of(i) == volume})
    else:
        for item, mask in masks.items():
            files[item] = item_file(item)
            _write_png(out / files[item], mask)
    manifest = {
        "description": "taskal segmentation queries: label the pixels where the mask is 1",
        "queries": [
            {
                "item": str(q.item),
                "region": q.region,
                "cost": q.cost,
                "score": None if q.score != q.score else q.score,
                "mask": files[q.item],
            }
            for q in queries
        ],
    }
    _atomic_text(manifest_path, json.dumps(manifest, indent=1))
    return manifest_path


class MaskStore:
    """Recorded labels of a segmentation pool: one PNG label map per item in ``root``
    (uint8 class indices, 255 = unlabeled; the item's file name from :func:`item_file`).

    Args:
        root: the folder (created if missing).
        pool: the pool whose items are labeled (``ids``, ``read_image`` or ``num_pixels``
            for sizes, ``classes``).
    """

    def __init__(self, root: str | Path, pool: Any) -> None:
        names: dict[str, ItemId] = {}
        for item in pool.ids:
            other = names.setdefault(item_file(item), item)
            if other != item:
                raise ValueError(
                    f"items {other!r} and {item!r} would share the label file "
                    f"{item_file(item)!r}; rename one of them"
                )
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.pool = pool
        self.num_classes = len(pool.classes)

    def path(self, item: ItemId) -> Path:
        return self.root / item_file(item)

    def labels(self, item: ItemId) -> np.ndarray | None:
        """The recorded ``[H, W]`` labels of ``item``, or ``None`` when it has none."""
        path = self.path(item)
        if not path.exists():
            return None
        with Image.open(path) as image:
            return np.asarray(image)

    def merged(self, item: ItemId, mask: np.ndarray, overwrite: bool, where: str) -> np.ndarray:
        """``mask`` (255 where it labels nothing) merged over the recorded labels.

        Raises:
            ValueError: the mask does not fit the item's image, or it gives a pixel a label
                other than the recorded one and ``overwrite`` is False.
        """
        hw = tuple(self.pool.read_image(item).shape[-2:])
        check_mask(mask, (hw[0], hw[1]), self.num_classes, UNLABELED, where)
        old = self.labels(item)
        new = mask.astype(np.uint8)
        if old is None:
            return new
        given = new != UNLABELED
        clash = given & (old != UNLABELED) & (old != new)
        if bool(clash.any()) and not overwrite:
            raise ValueError(
                f"{where}: {int(clash.sum())} pixels already carry another label; nothing was "
                "recorded. Pass overwrite=True to replace recorded labels"
            )
        return np.where(given, new, old).astype(np.uint8)

    def record(self, masks: Mapping[ItemId, np.ndarray], overwrite: bool = False) -> None:
        """Record masks for several items: all are checked before any is written."""
        merged = {i: self.merged(i, m, overwrite, str(i)) for i, m in masks.items()}
        for item, labels in merged.items():
            _write_png(self.path(item), labels)

    def labeled_pixels(self, item: ItemId) -> int:
        labels = self.labels(item)
        return 0 if labels is None else int((labels != UNLABELED).sum())


def import_masks(
    store: MaskStore,
    returned: str | Path,
    queried: Sequence[ItemId] | None = None,
    overwrite: bool = False,
) -> dict[ItemId, int]:
    """Record the masks in folder ``returned`` into ``store``.

    A 2D pool's masks are PNG label maps named :func:`item_file` of their item; a volume
    pool's are NIfTI label volumes named like their scans (slices with no labeled voxel are
    skipped). With ``queried``, every returned item must be one of them.

    Returns:
        labeled pixels per recorded item.

    Raises:
        ValueError: a file that matches no item of the pool, an item that was not queried,
            a mask of the wrong shape, affine or values, or a clash with recorded labels
            (without ``overwrite``). Nothing is recorded then.
    """
    folder, pool = Path(returned), store.pool
    masks: dict[ItemId, np.ndarray] = {}
    if isinstance(pool, VolumeSlicePool):
        items = set(pool.ids)
        scans = {pool.volume_of(i) for i in pool.ids}
        for path in sorted(folder.glob("*.nii*")):
            if path.name not in scans:
                raise ValueError(f"{path.name} is not a scan of this pool; nothing was recorded")
            labels = read_label_volume(path, pool.image_path(path.name), pool.classes, UNLABELED)
            for index in range(labels.shape[pool.axis]):
                sl = np.take(labels, index, axis=pool.axis)
                if not bool((sl != UNLABELED).any()):
                    continue
                item = f"{path.name}#{pool.axis}:{index:03d}"
                if item not in items:
                    raise ValueError(
                        f"{path.name} labels slice {index}, which is not an item of this pool; "
                        "nothing was recorded"
                    )
                masks[item] = sl
    else:
        by_file = {item_file(i): i for i in pool.ids}
        for path in sorted(folder.glob("*.png")):
            if path.name not in by_file:
                raise ValueError(
                    f"{path.name} matches no item of the pool (expected names like "
                    f"{next(iter(by_file))}); nothing was recorded"
                )
            with Image.open(path) as image:
                masks[by_file[path.name]] = np.asarray(image)
    if queried is not None:
        extra = sorted(str(i) for i in set(masks) - set(queried))
        if extra:
            raise ValueError(
                f"masks for items that were never queried: {extra[:3]}; nothing was recorded"
            )
    store.record(masks, overwrite)
    return {i: int((m != UNLABELED).sum()) for i, m in masks.items()}


def _write_png(path: Path, mask: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".png", prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(mask.astype(np.uint8)).save(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


__all__ = ["MaskStore", "export_queries", "import_masks", "item_file", "query_masks"]
