from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from taskal import functional as F
from taskal.functional import distances
from taskal.functional import kcenter as D


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


# --- pruned k-center (k_center_greedy_features) -------------------------------------------


def _plain_k_center(
    x: torch.Tensor, budget: int, labeled: torch.Tensor | None, seed: int
) -> list[int]:
    """The plain O(N)-memory loop (a wrapped closure, so no fast path) on the same distances."""
    dist = F.sq_dists_to(x)
    init = F.min_sq_dists(x, labeled) if labeled is not None else None
    g = torch.Generator().manual_seed(seed)
    return F.k_center_greedy(lambda j: dist(j), len(x), budget, init, g).tolist()


def _pruned(
    x: torch.Tensor,
    budget: int,
    labeled: torch.Tensor | None,
    seed: int,
    screen: bool | None = None,
) -> tuple[list[int], D.KCenterStats]:
    stats = D.KCenterStats()
    g = torch.Generator().manual_seed(seed)
    picks = D.k_center_greedy_features(x, budget, labeled, g, screen=screen, stats=stats)
    return picks.tolist(), stats


def _dataset(kind: str, n: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(n, d, generator=g, dtype=dtype)
    if kind == "clustered":  # tight blobs far apart: what pruning is for
        means = torch.randn(12, d, generator=g, dtype=dtype) * 4
        return means[torch.randint(12, (n,), generator=g)] + 0.05 * torch.randn(
            n, d, generator=g, dtype=dtype
        )
    if kind == "duplicates":  # every point repeated ~8 times: exact ties everywhere
        base = torch.randn(max(1, n // 8), d, generator=g, dtype=dtype)
        return base[torch.randint(len(base), (n,), generator=g)]
    # small integer grid: many exactly equal distances between distinct points
    return torch.randint(0, 3, (n, d), generator=g).to(dtype)


@pytest.mark.parametrize("kind", ["random", "clustered", "duplicates", "grid"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_labeled", [0, 6])
def test_pruned_k_center_picks_equal_plain_loop(
    kind: str, dtype: torch.dtype, num_labeled: int
) -> None:
    n, d = (203, 7) if dtype == torch.float64 else (160, 16)  # unaligned / aligned rows
    x = _dataset(kind, n, d, dtype, seed=len(kind))
    labeled = None
    if num_labeled:
        g = torch.Generator().manual_seed(1)
        labeled = x[torch.randint(n, (num_labeled,), generator=g)] + 0.01
    for budget in (1, 9, n):  # budget n: every point, down to the exact duplicates
        want = _plain_k_center(x, budget, labeled, seed=budget)
        for screen in (False, True):
            got, _ = _pruned(x, budget, labeled, seed=budget, screen=screen)
            assert got == want, (kind, dtype, num_labeled, budget, screen)
    assert sorted(want) == list(range(n))


def test_pruned_k_center_equals_todays_code_bit_for_bit() -> None:
    """Aligned rows, N a multiple of 16: the canonical kernel is the plain ``x @ x[j]``."""
    g = torch.Generator().manual_seed(3)
    means = torch.randn(20, 64, generator=g, dtype=torch.float64) * 3
    x = means[torch.randint(20, (1024,), generator=g)] + 0.1 * torch.randn(
        1024, 64, generator=g, dtype=torch.float64
    )
    labeled = x[:5] + 0.05
    sq = (x * x).sum(1)

    def old_dist_to(j: int) -> torch.Tensor:  # taskal's k_center distance before pruning
        return (sq + sq[j] - 2.0 * (x @ x[j])).clamp_min(0.0)

    for lab in (None, labeled):
        init = F.min_sq_dists(x, lab) if lab is not None else None
        old = F.k_center_greedy(old_dist_to, 1024, 300, init, torch.Generator().manual_seed(4))
        got, stats = _pruned(x, 300, lab, seed=4)
        assert got == old.tolist()
        assert stats.read_fraction < 0.5


def test_pruned_k_center_skips_rows_on_clustered_data() -> None:
    g = torch.Generator().manual_seed(0)
    means = torch.randn(20, 32, generator=g, dtype=torch.float64) * 5
    x = means[torch.randint(20, (4000,), generator=g)] + 0.1 * torch.randn(
        4000, 32, generator=g, dtype=torch.float64
    )
    labeled = means[:10] + 0.1 * torch.randn(10, 32, generator=g, dtype=torch.float64)
    for screen in (False, True):
        got, stats = _pruned(x, 200, labeled, seed=0, screen=screen)
        assert got == _plain_k_center(x, 200, labeled, seed=0)
        assert stats.updates == 199 and stats.num_points == 4000
        screened = screen and D._fp16_mv_trusted()  # the screen needs float32 accumulation
        assert stats.screen == screened
        # the plain loop reads all 4000 rows at every update; groups far away are skipped
        assert stats.read_fraction < 0.15, stats
        assert stats.groups_scanned / stats.updates < 30, stats
        assert (stats.rows_screened > 0) == screened


def test_k_center_greedy_takes_the_pruned_path_for_plain_embeddings() -> None:
    x = _dataset("clustered", 500, 8, torch.float64, seed=2)
    fast = F.k_center_greedy(F.sq_dists_to(x), 500, 40, None, torch.Generator().manual_seed(5))
    assert fast.tolist() == _plain_k_center(x, 40, None, seed=5)
    assert F.k_center_greedy(F.sq_dists_to(x), 500, 0).tolist() == []


def test_pruned_k_center_edge_cases() -> None:
    one = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    assert _pruned(one, 1, None, seed=0)[0] == [0]
    assert _pruned(one, 1, one + 1, seed=0)[0] == [0]
    assert _pruned(one, 0, None, seed=0)[0] == []
    assert _pruned(one[:0], 0, None, seed=0)[0] == []
    assert _pruned(one, 1, one[:0], seed=0)[0] == [0]  # empty labeled: nothing labeled
    zeros = torch.zeros(5, 3)
    assert sorted(_pruned(zeros, 5, None, seed=0)[0]) == [0, 1, 2, 3, 4]
    assert _pruned(zeros, 5, None, seed=0)[0] == _plain_k_center(zeros, 5, None, seed=0)
    with pytest.raises(ValueError, match="budget"):
        D.k_center_greedy_features(one, 2)
    with pytest.raises(ValueError, match="labeled"):
        D.k_center_greedy_features(one, 1, torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="finite"):
        D.k_center_greedy_features(torch.tensor([[float("nan")]]), 1)


@pytest.mark.parametrize("d", [5, 16, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sq_dists_rows_equal_full_vector_bit_for_bit(d: int, dtype: torch.dtype) -> None:
    """Any subset of rows gets exactly the values of the full pass (the pruning premise)."""
    g = torch.Generator().manual_seed(d)
    x = torch.randn(1037, d, generator=g, dtype=dtype) * 3 + 1
    dist = F.sq_dists_to(x)
    for j in (0, 500, 1036):
        full = dist(j)
        for size in (1, 15, 16, 17, 300, 1037):
            idx = torch.randperm(1037, generator=g)[:size]
            assert torch.equal(dist.rows(idx, j), full[idx])


def test_tree_kernel_rows_equal_full_vector_and_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The non-CPU canonical kernel (pairwise tree), run here on CPU."""
    monkeypatch.setattr(distances, "_RowDots", functools.partial(distances._RowDots, blas=False))
    g = torch.Generator().manual_seed(0)
    for d in (5, 64):
        x = _dataset("duplicates", 301, d, torch.float32, seed=d)
        dist = F.sq_dists_to(x)
        assert not dist._dots.blas and dist._dots.width == (8 if d == 5 else 64)
        full = dist(3)
        idx = torch.randperm(301, generator=g)[:77]
        assert torch.equal(dist.rows(idx, 3), full[idx])
        assert torch.allclose(full, ((x - x[3]) ** 2).sum(1), atol=1e-4)
        assert _pruned(x, 60, x[:4] + 0.1, seed=1)[0] == _plain_k_center(x, 60, x[:4] + 0.1, 1)


def test_prune_threshold_keeps_the_boundary_point() -> None:
    """At ``||c - x_j|| = 2 ||x_i - c||`` exactly, ``x_i`` is as far from ``x_j`` as from ``c``:
    rounding could make it come closer, so it must never be skipped; well inside it must be."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        c = torch.randn(64, generator=g, dtype=dtype) * 10
        u = torch.randn(64, generator=g, dtype=dtype)
        u = u / u.norm()
        r = 0.75
        x_i, x_j = c + r * u, c + 2 * r * u  # collinear: ||x_i - x_j|| = ||x_i - c|| = r
        pts = torch.stack([c, x_i, x_j])
        sq = (pts * pts).sum(1)
        cc = (sq[0] + sq[2] - 2 * pts[0] @ pts[2]).clamp_min(0)
        d_i = (sq[1] + sq[0] - 2 * pts[1] @ pts[0]).clamp_min(0)
        u_ro = torch.finfo(dtype).eps / 2
        delta = 2 * D._gamma(66, u_ro) * 4 * float(sq.max())
        thr = D._prune_thresholds((cc.double() - delta)[None], delta, dtype)[0]
        assert d_i > thr  # not skipped: the exact margin matters here
        x_far = c + 3 * r * u  # ||c - x_far|| = 3r > 2r: x_i surely stays
        cc_far = (sq[0] + (x_far * x_far).sum() - 2 * pts[0] @ x_far).clamp_min(0)
        assert d_i <= D._prune_thresholds((cc_far.double() - delta)[None], delta, dtype)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prune_thresholds_follow_the_bound(dtype: torch.dtype) -> None:
    """``thr <= (t - 2 delta)^2 / (4 t) - delta`` (exactly, in rationals), and not much less."""
    t = torch.tensor([1e-12, 0.5, 1.0, 3.0, 7.5, 100.0, 1e6], dtype=torch.float64)
    for delta in (0.0, 1e-9, 0.01, 0.2):
        thr = D._prune_thresholds(t, delta, dtype).double()
        for ti, th in zip(t.tolist(), thr.tolist(), strict=True):
            ft, fd = Fraction(ti), Fraction(delta)
            bound = (ft - 2 * fd) ** 2 / (4 * ft) - fd if ft > 2 * fd else None
            if bound is None or bound <= 0:
                assert th <= 0  # only d = 0, which can never shrink, may be skipped
            else:
                assert Fraction(th) <= bound
                assert th >= float(bound) - 1e-5 * abs(float(bound)) - 1e-300


def test_fp16_lower_bounds_hold() -> None:
    if not D._fp16_mv_trusted():
        pytest.skip("float16 matrix-vector products do not accumulate in float32 here")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 96, generator=g, dtype=torch.float64)
    # norms just under 32: scaled by 4 to just under 128, where float16 rounds coarsest
    x *= (31.99 - torch.rand(400, 1, generator=g, dtype=torch.float64)) / x.norm(
        dim=1, keepdim=True
    )
    x[200:] = x[:200] + 1e-3 * torch.randn(200, 96, generator=g, dtype=torch.float64)
    x[-1] = x[0]  # an exact duplicate
    max_norm = float(x.norm(dim=1).max())
    fp16 = D._Fp16(2.0 ** math.floor(math.log2(D._FP16_NORM / max_norm)), 96)
    h, hsq = fp16.encode_all(x, 64)
    # the two ingredients: quantisation error per row and float16 dot error
    assert ((h.double() / fp16.scale - x).norm(dim=1) <= fp16.eps / fp16.scale).all()
    exact = h.double() @ h[:50].double().T
    got = torch.stack([torch.mv(h, h[j]) for j in range(50)], 1).double()
    assert ((got - exact).abs() <= fp16.err / 2).all()
    true = torch.cdist(x, x[:50]).pow(2)  # float64 reference
    for j in range(50):
        lb = fp16.lower_bound(hsq, hsq[j], torch.mv(h, h[j]))
        assert (lb <= true[:, j]).all()
    # and they are useful: far pairs are bounded to within a few percent
    far = true[:, 0] > 10
    lb0 = fp16.lower_bound(hsq, hsq[0], torch.mv(h, h[0]))
    assert (lb0[far] > 0.95 * true[far, 0]).all()
