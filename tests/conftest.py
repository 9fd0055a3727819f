"""Shared fixtures. (Tests import nothing from a top-level ``tests`` package: mmseg's wheel
installs one that would shadow ours.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from taskal.data import load_digits


def _write_image_folder(root: Path, per_class: int = 4) -> Path:
    """Real PNGs of digits 3 and 7 in ImageFolder layout: root/<class>/<i>.png."""
    digits = load_digits()
    assert digits.targets is not None
    for cls, digit in (("three", 3), ("seven", 7)):
        (root / cls).mkdir(parents=True)
        rows = torch.nonzero(digits.targets == digit)[:per_class, 0]
        for i, idx in enumerate(rows.tolist()):
            img = (digits.inputs[idx, 0].numpy() * 255).astype(np.uint8)
            Image.fromarray(img).convert("RGB").save(root / cls / f"{i}.png")
    return root


@pytest.fixture
def image_folder() -> Callable[..., Path]:
    return _write_image_folder
