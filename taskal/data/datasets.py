"""Data sets for simulations: scikit-learn's bundled digits, or a user's image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from taskal.data.pool import TensorPool
from taskal.registry import DATASETS


@DATASETS.register_module(name="digits")
def load_digits() -> TensorPool:
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes), bundled, no download.

    Inputs are ``[N, 1, 8, 8]`` in ``[0, 1]``; ids are ``"digits/<index>"``.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    inputs = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    targets = torch.from_numpy(data.target.astype(np.int64))
    ids = [f"digits/{i}" for i in range(len(targets))]
    return TensorPool(inputs, targets, ids, [str(c) for c in data.target_names])


@DATASETS.register_module(name="image_folder")
def load_image_folder(root: str, image_size: int = 32, grayscale: bool = False) -> TensorPool:
    """Images in ``root/<class>/<image>`` (torchvision's ImageFolder layout).

    Every image is resized to ``image_size`` x ``image_size`` and scaled to ``[0, 1]``;
    ids are paths relative to ``root``.
    """
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    steps = [transforms.Resize((image_size, image_size))]
    if grayscale:
        steps.append(transforms.Grayscale())
    steps.append(transforms.ToTensor())
    try:
        folder = ImageFolder(str(path), transform=transforms.Compose(steps))
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{root!r} is not an image folder: expected one sub-folder per class holding "
            f"images ({err})"
        ) from err
    inputs, targets, ids = [], [], []
    for i, (file, target) in enumerate(folder.samples):
        try:
            image, _ = folder[i]
        except OSError as err:
            raise OSError(f"cannot read image {file}: {err}") from err
        inputs.append(image)
        targets.append(target)
        ids.append(str(Path(file).relative_to(path)))
    return TensorPool(torch.stack(inputs), torch.tensor(targets), ids, folder.classes)


def split_pool(
    pool: TensorPool, test_fraction: float, seed: int = 0
) -> tuple[TensorPool, TensorPool]:
    """Stratified split into (pool, held-out test) by ``seed``."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    stratify = None if pool.targets is None else pool.targets.numpy()
    train_ids, test_ids = train_test_split(
        pool.ids, test_size=test_fraction, random_state=seed, stratify=stratify
    )
    return pool.subset(train_ids), pool.subset(test_ids)
