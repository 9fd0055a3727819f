"""A pool of image files without labels: what a label campaign scores and selects from.

Items are addressed by a stable key (the path relative to the folder they were found in);
batches carry pixels and metainfo only, never a label, so nothing an annotator has not yet
provided can reach a strategy or an adapter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from taskal.types import Batch, ItemId

#: file suffixes read as images
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def list_images(folder: str | Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[str]:
    """Image files under ``folder`` (recursively), as sorted paths relative to it.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: it holds no image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    names = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes
    )
    if not names:
        raise ValueError(f"image folder {root} holds no images ({', '.join(suffixes)})")
    return names


class ImagePool:
    """Images named by key, read lazily one batch at a time.

    Args:
        files: ``(key, path)`` per item, in pool order.
        size: ``(H, W)`` to resize every image to, stacking batches into one tensor
            (classifiers); ``None`` keeps each image's own size (a list per batch).
        grayscale: read one channel instead of RGB.
    """

    def __init__(
        self,
        files: Sequence[tuple[str, str]],
        size: tuple[int, int] | None = None,
        grayscale: bool = False,
    ) -> None:
        self.paths = {key: Path(path) for key, path in files}
        if len(self.paths) != len(files):
            raise ValueError("image keys must be unique")
        self.ids: list[ItemId] = [key for key, _ in files]
        self.size = size
        self.grayscale = grayscale

    def __len__(self) -> int:
        return len(self.ids)

    def missing(self) -> list[str]:
        """Keys whose file is gone."""
        return [str(k) for k in self.ids if not self.paths[str(k)].is_file()]

    def read_image(self, item: ItemId) -> torch.Tensor:
        """The item's pixels, float ``[C, H, W]`` in ``[0, 1]``."""
        path = self.paths[str(item)]
        try:
            with Image.open(path) as opened:
                image: Image.Image = opened.convert("L" if self.grayscale else "RGB")
            if self.size is not None:
                image = image.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(image)
        except OSError as err:
            raise OSError(f"cannot read image {path} (item {item}): {err}") from err
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)

    def num_pixels(self, item: ItemId) -> int:
        with Image.open(self.paths[str(item)]) as image:
            return int(image.width * image.height)

    def take(self, ids: Sequence[ItemId]) -> Batch:
        images = [self.read_image(i) for i in ids]
        samples = [
            {"img_path": str(self.paths[str(i)]), "img_shape": tuple(x.shape[-2:])}
            for i, x in zip(ids, images, strict=True)
        ]
        if self.size is not None:
            return Batch(torch.stack(images), list(ids), None, samples)
        return Batch(images, list(ids), None, samples)

    def batches(self, ids: Sequence[ItemId], batch_size: int) -> Iterator[Batch]:
        ids = list(ids)
        for start in range(0, len(ids), batch_size):
            yield self.take(ids[start : start + batch_size])

    def subset(self, ids: Sequence[ItemId]) -> ImagePool:
        return ImagePool(
            [(str(i), str(self.paths[str(i)])) for i in ids], self.size, self.grayscale
        )


__all__ = ["IMAGE_SUFFIXES", "ImagePool", "list_images"]
