"""The adapters/ folder installs as taskal.adapters, never as a top-level ``adapters``
(PyPI has an unrelated package of that name)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_adapters_live_under_taskal() -> None:
    import taskal.adapters

    assert Path(taskal.adapters.__file__).resolve().parent == ROOT / "adapters"


def test_wheel_has_no_top_level_adapters(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("taskal-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "taskal/adapters/classification.py" in names
    assert "taskal/strategies/base.py" in names
    assert not [n for n in names if n.startswith("adapters/")]
    assert not [n for n in names if n.startswith("tests/")]
