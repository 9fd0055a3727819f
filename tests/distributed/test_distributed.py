"""Pool scoring across processes (torchrun, gloo on loopback) and a scoring run killed
mid-pool: both give the queries (and scores) of one uninterrupted process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "select_pool.py"


def _env() -> dict[str, str]:
    # one thread per process in every run, so that each batch is computed the same way
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _one(out: Path, *extra: str) -> dict[str, Any]:
    subprocess.run([sys.executable, str(SCRIPT), str(out), *extra], check=True, env=_env())
    return dict(json.loads(out.read_text()))


def _torchrun(out: Path, *extra: str, procs: int = 2) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={procs}", str(SCRIPT), str(out), *extra]
    subprocess.run(cmd, check=True, env=_env(), capture_output=True, timeout=300)
    return dict(json.loads(out.read_text()))


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _one(tmp_path_factory.mktemp("single") / "one.json")


def test_two_processes_select_what_one_selects(single: dict[str, Any], tmp_path: Path) -> None:
    two = _torchrun(tmp_path / "two.json")
    assert set(two) == {"entropy", "bald", "coreset", "badge", "random"}
    for name, result in single.items():
        assert two[name]["items"] == result["items"], name
        assert two[name]["scores"] == result["scores"], name
    # the strategies do differ, so equal queries are no accident of the pool
    assert single["bald"]["items"] != single["entropy"]["items"]


def test_a_scoring_run_killed_mid_pool_resumes(single: dict[str, Any], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    out = tmp_path / "killed.json"
    args = [str(SCRIPT), str(out), "--cache-dir", str(cache), "--strategies", "bald"]
    proc = subprocess.Popen([sys.executable, *args, "--slow-after", "3"], env=_env())
    done = cache / "bald" / "pool"
    deadline = time.monotonic() + 120
    try:
        while len(list(done.glob("*.pt"))) < 3:
            assert proc.poll() is None, "the scoring run ended before it was killed"
            assert time.monotonic() < deadline, "no batch was scored within 2 minutes"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    scored = sorted(p.name for p in done.glob("*.pt"))
    assert len(scored) == 3  # of 9 batches (36 candidates, 4 per batch)
    stamps = {p.name: p.stat().st_mtime_ns for p in done.glob("*.pt")}
    # resumed by two processes: the batches on disk are loaded, not scored again
    resumed = _torchrun(
        tmp_path / "resumed.json", "--cache-dir", str(cache), "--strategies", "bald"
    )
    assert resumed["bald"] == single["bald"]
    assert len(list(done.glob("*.pt"))) == 9
    assert all((done / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())
