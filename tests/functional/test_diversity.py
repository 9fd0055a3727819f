from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from taskal import functional as F


def _brute_k_center(x: torch.Tensor, labeled: torch.Tensor, k: int) -> list[int]:
    d = torch.cdist(x, labeled).pow(2).min(1).values
    picks = []
    for _ in range(k):
        d = d.clone()
        d[picks] = -1
        j = int(d.argmax())
        picks.append(j)
        d = torch.minimum(d, torch.cdist(x, x[j : j + 1]).pow(2)[:, 0])
    return picks


def test_k_center_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    labeled = torch.randn(10, 5, generator=g, dtype=torch.float64)
    init = F.min_sq_dists(x, labeled)
    picks = F.k_center_greedy(F.sq_dists_to(x), len(x), 12, init)
    assert picks.tolist() == _brute_k_center(x, labeled, 12)


@pytest.mark.parametrize("max_block", [1, 7, 64, 2**20])
def test_min_sq_dists_blocks_match_cdist(max_block: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(53, 6, generator=g, dtype=torch.float64) * 3 + 1
    centers = torch.randn(29, 6, generator=g, dtype=torch.float64) * 3 + 1
    want = (x[:, None] - centers[None]).pow(2).sum(-1).min(1).values
    got = F.min_sq_dists(x, centers, max_block=max_block)
    assert torch.allclose(got, want, rtol=1e-10, atol=0)
    assert F.min_sq_dists(x, x).abs().max() < 1e-9  # every row is its own center
    assert F.min_sq_dists(x[:0], centers).shape == (0,)
    assert torch.isinf(F.min_sq_dists(x, centers[:0])).all()  # no centers: infinitely far


_RSS_SCRIPT = """
import resource
import torch
from taskal.functional import min_sq_dists

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

g = torch.Generator().manual_seed(0)
x = torch.randn(20000, 8, generator=g, dtype=torch.float64)
centers = torch.randn(4000, 8, generator=g, dtype=torch.float64)
min_sq_dists(x[:64], centers[:64])  # warm up kernels and thread pools
before = peak_mb()
min_sq_dists(x, centers)
print(before, peak_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB on Linux")
def test_min_sq_dists_memory_is_bounded() -> None:
    """Core-set init on 20k candidates x 4k labeled must not build an [N, M] block (650 MB)."""
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    before, after = map(float, run.stdout.split())
    assert after - before < 150, (
        f"peak RSS grew {after - before:.0f} MB ({before:.0f} -> {after:.0f})"
    )


def test_k_center_reads_one_distance_row_per_pick() -> None:
    """Memory stays O(N): one [N] distance vector per pick, never an N x N matrix."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, 4, generator=g, dtype=torch.float64)
    base = F.sq_dists_to(x)
    shapes = []

    def counting(j: int) -> torch.Tensor:
        out = base(j)
        shapes.append(tuple(out.shape))
        return out

    picks = F.k_center_greedy(counting, len(x), 5, None, g)
    assert len(set(picks.tolist())) == 5
    assert shapes == [(20_000,)] * 5
    shapes.clear()
    F.kmeans_pp(counting, len(x), 5, 0, g)
    assert shapes == [(20_000,)] * 5


def test_k_center_spreads_over_clusters() -> None:
    centers = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    x = torch.cat([c + 0.01 * torch.randn(50, 2) for c in centers])
    picks = F.k_center_greedy(F.sq_dists_to(x), len(x), 3, None, torch.Generator().manual_seed(1))
    assert sorted(int(p) // 50 for p in picks) == [0, 1, 2]


def test_badge_factorized_distance_equals_explicit() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(40, 6, generator=g, dtype=torch.float64).softmax(1)
    emb = torch.randn(40, 9, generator=g, dtype=torch.float64)
    a, h = F.gradient_factors(probs, emb)
    explicit = (a[:, :, None] * h[:, None, :]).flatten(1)  # [N, C*(D+1)], test only
    dist = F.gradient_sq_dists_to(a, h)
    for j in (0, 7, 39):
        want = (explicit - explicit[j]).pow(2).sum(1)
        assert torch.allclose(dist(j), want, atol=1e-9)


def test_badge_seeded_unique_and_reproducible() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(100, 4, generator=g).softmax(1)
    emb = torch.randn(100, 8, generator=g)
    a = F.badge_select(probs, emb, 10, torch.Generator().manual_seed(3))
    b = F.badge_select(probs, emb, 10, torch.Generator().manual_seed(3))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 10
    norms = (probs - torch.nn.functional.one_hot(probs.argmax(1), 4)).pow(2).sum(1) * (
        emb.pow(2).sum(1) + 1
    )
    assert int(a[0]) == int(norms.argmax())


def test_kmeans_pp_handles_duplicates() -> None:
    x = torch.zeros(5, 3)
    picks = F.kmeans_pp(F.sq_dists_to(x), 5, 5, 0, torch.Generator().manual_seed(0))
    assert sorted(picks.tolist()) == [0, 1, 2, 3, 4]
