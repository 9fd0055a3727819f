from __future__ import annotations

from pathlib import Path

import pytest
import torch

from taskal.data import TensorPool, load_digits, load_image_folder, split_pool


def test_digits_bundled() -> None:
    pool = load_digits()
    assert len(pool) == 1797 and pool.inputs.shape[1:] == (1, 8, 8)
    assert float(pool.inputs.min()) >= 0.0 and float(pool.inputs.max()) <= 1.0
    assert pool.ids[0] == "digits/0" and pool.classes == [str(i) for i in range(10)]


def test_split_is_stratified_disjoint_and_seeded() -> None:
    pool = load_digits()
    a, test = split_pool(pool, 0.25, seed=0)
    b, _ = split_pool(pool, 0.25, seed=0)
    assert a.ids == b.ids and not set(a.ids) & set(test.ids)
    assert len(a) + len(test) == len(pool)
    assert torch.bincount(test.targets).min() >= 40  # type: ignore[arg-type]


def test_image_folder_reads_real_pngs(tmp_path: Path, image_folder) -> None:  # type: ignore[no-untyped-def]
    image_folder(tmp_path)
    pool = load_image_folder(str(tmp_path), image_size=16)
    assert len(pool) == 8 and pool.inputs.shape[1:] == (3, 16, 16)
    assert pool.classes == ["seven", "three"]
    assert "three/0.png" in pool.ids
    assert sorted(pool.targets.tolist()) == [0] * 4 + [1] * 4  # type: ignore[union-attr]


def test_image_folder_errors(tmp_path: Path, image_folder) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="one sub-folder per class"):
        load_image_folder(str(tmp_path / "empty"))
    image_folder(tmp_path / "broken")
    (tmp_path / "broken" / "three" / "0.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match=r"cannot read image .*0\.png"):
        load_image_folder(str(tmp_path / "broken"))


def test_pool_ids() -> None:
    with pytest.raises(ValueError, match="unique"):
        TensorPool(torch.zeros(2, 1), ids=["a", "a"])
    pool = TensorPool(torch.arange(3.0)[:, None], ids=["x", "y", "z"])
    assert pool.take(["z", "x"]).inputs[:, 0].tolist() == [2.0, 0.0]
    with pytest.raises(KeyError, match="not in the pool"):
        pool.take(["w"])
