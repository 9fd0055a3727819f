from __future__ import annotations

import functools
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
        assert stats.screen == screen  # a float32 copy of the float64 features, or none
        # the plain loop reads all 4000 rows at every update; groups far away are skipped
        assert stats.read_fraction < 0.15, stats
        assert stats.groups_scanned / stats.updates < 30, stats
        assert 1 < stats.batches < 100, stats


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
        pairs = torch.repeat_interleave(torch.tensor([3, 200]), torch.tensor([40, 37]))
        assert torch.equal(dist.pairs(idx, pairs), torch.cat([full[idx[:40]], dist(200)[idx[40:]]]))
    # many batches through both update paths, on the tree kernel
    monkeypatch.setattr(D, "_T_START", 16)
    x = _dataset("clustered", 2000, 24, torch.float64, seed=5)
    for labeled in (None, x[:8] + 0.05):
        got, stats = _pruned(x, 300, labeled, seed=3)
        assert got == _plain_k_center(x, 300, labeled, seed=3) and stats.batches > 20


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


@pytest.mark.parametrize(
    ("dtype", "screen", "norm"),
    [
        (torch.float64, True, 32.0),  # a float32 copy
        (torch.float64, False, 32.0),  # the float64 features themselves
        (torch.float32, False, 32.0),  # the float32 features themselves
        (torch.float32, False, 2.0**40),  # huge norms: a scaled float32 copy
        (torch.float64, True, 2.0**-40),  # tiny norms: a scaled float32 copy
    ],
)
def test_bounds_hold(dtype: torch.dtype, screen: bool, norm: float) -> None:
    """Lower bounds never exceed the true squared distance; cut-offs never drop a pair whose
    computed distance could change the running minimum; and both are tight enough to use."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 96, generator=g, dtype=torch.float64)
    # norms just under ``norm``, where the copy rounds coarsest, with near and exact duplicates
    x *= (norm - norm / 64 * torch.rand(400, 1, generator=g, dtype=torch.float64)) / x.norm(
        dim=1, keepdim=True
    )
    x[200:] = x[:200] + norm * 1e-5 * torch.randn(200, 96, generator=g, dtype=torch.float64)
    x[-1] = x[0]
    x = x.to(dtype)
    dists = F.sq_dists_to(x)
    max_sq = float(dists.sq_norm_N.max())
    bounds = D._Bounds(dists, screen, max_sq)
    assert bounds.copied == (screen or norm > 2.0**30 or norm < 2.0**-30)
    x64 = x.double()
    true = torch.cdist(x64, x64[:50]).pow(2)  # float64 reference
    sq = bounds.sq_N
    dots = bounds.rows_ND @ bounds.rows_ND[:50].T
    lower = bounds.lower(sq[:, None], sq[None, :50], dots)
    assert (lower <= true * (1 + 1e-12)).all()
    far = true > 1e-2 * norm * norm
    assert (lower[far] > 0.99 * true[far]).all()
    # cut-offs: a pair at or above its point's cut-off cannot lower the running minimum
    # min(d, computed distances of all the point's pairs)
    delta = 2.0 * D._gamma(dists._dots.width + 2, torch.finfo(dtype).eps / 2) * 4.0 * max_sq
    s_est = bounds.estimate(sq[:, None], sq[None, :50], dots)
    computed = torch.stack([dists(j) for j in range(50)], 1)
    for d in (computed.amin(1), computed.amax(1), computed[:, 7], computed[:, 7] * 0.999):
        dropped = s_est >= bounds.cutoff(d, s_est.amin(1), delta)[:, None]
        floor = torch.minimum(d, computed.amin(1))[:, None].expand_as(computed)
        assert (computed[dropped] >= floor[dropped]).all()
        assert dropped.float().mean() > 0.5  # most pairs are settled without exact distances


def test_pairs_and_blocks_equal_full_vectors_bit_for_bit() -> None:
    """The update's and the batches' reads give exactly the full pass's values."""
    g = torch.Generator().manual_seed(0)
    for d, dtype in (
        (5, torch.float64),
        (16, torch.float32),
        (33, torch.float32),
        (64, torch.float64),
    ):
        x = torch.randn(1037, d, generator=g, dtype=dtype) * 3 + 1
        dist = F.sq_dists_to(x)
        dist._dots.chunk = 48  # runs spanning chunks of the buffer
        full = {j: dist(j) for j in (0, 3, 500, 1036)}
        js = torch.tensor([0, 0, 3, 500, 500, 500, 1036])
        counts = torch.tensor([1, 17, 16, 100, 3, 60, 1])
        j_P = torch.repeat_interleave(js, counts)
        idx_P = torch.randint(1037, (int(counts.sum()),), generator=g)
        got = dist.pairs(idx_P, j_P)
        want = torch.stack([full[int(j)][int(i)] for i, j in zip(idx_P, j_P, strict=True)])
        assert torch.equal(got, want)
        for size in (1, 15, 16, 17, 300):
            idx = torch.randperm(1037, generator=g)[:size]
            block, sq = dist.gather(idx)
            assert torch.equal(dist.block(block, sq, 500), full[500][idx])
            assert torch.equal(dist.block(block, sq, 3), full[3][idx])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_labeled", [0, 8])
def test_batched_k_center_many_batches_equal_plain_loop(
    dtype: torch.dtype, num_labeled: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small candidate sets force many batches through both update paths (dense pair tests
    while regions lack centers, sparse group lists after), with and without the copy."""
    g = torch.Generator().manual_seed(1)
    means = torch.randn(40, 24, generator=g, dtype=dtype) * 3
    x = means[torch.randint(40, (3000,), generator=g)] + 0.2 * torch.randn(
        3000, 24, generator=g, dtype=dtype
    )
    x[2000:2100] = x[:100]  # exact duplicates: ties among the farthest
    labeled = x[:num_labeled] + 0.05 if num_labeled else None
    want = _plain_k_center(x, 400, labeled, seed=3)
    for start in (16, 256):
        monkeypatch.setattr(D, "_T_START", start)
        for screen in (False, True):
            got, stats = _pruned(x, 400, labeled, seed=3, screen=screen)
            assert got == want, (start, screen)
            assert stats.batches > (20 if start == 16 else 2), stats
            assert stats.rows_screened > 0 and stats.read_fraction < 0.5, stats


def test_k_center_greedy_plain_loop_for_extreme_norms() -> None:
    """Norms past the bounds' range: the plain loop, same picks."""
    x = _dataset("clustered", 300, 6, torch.float64, seed=4) * 2.0**120
    got, _ = _pruned(x, 30, None, seed=2)
    assert got == _plain_k_center(x, 30, None, seed=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lazy", [0.95, 1.0, 1.5])
def test_lazy_points_refreshed_equal_plain_loop(
    dtype: torch.dtype, lazy: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Points left out of sparse updates (d well inside the farthest points') are brought up
    to date when they come near the top again: a floor at or above beta forces that often."""
    monkeypatch.setattr(D, "_LAZY", lazy)
    g = torch.Generator().manual_seed(2)
    means = torch.randn(30, 24, generator=g, dtype=dtype) * 3
    x = means[torch.randint(30, (2500,), generator=g)] + 0.3 * torch.randn(
        2500, 24, generator=g, dtype=dtype
    )
    x[2000:2050] = x[:50]  # exact duplicates: ties, also among lazy points
    for labeled in (None, x[:5] + 0.05):
        want = _plain_k_center(x, 600, labeled, seed=7)
        for screen in (False, True):
            got, stats = _pruned(x, 600, labeled, seed=7, screen=screen)
            assert got == want, (lazy, screen, labeled is None)
            if lazy >= 1.0:
                assert stats.refreshed > 0, stats


def test_dot_floors_never_drop_a_pair_the_cutoff_keeps() -> None:
    """The matrix products' floor test keeps every pair whose estimate passes cutoff."""
    g = torch.Generator().manual_seed(3)
    for dtype, copy in ((torch.float64, True), (torch.float64, False), (torch.float32, False)):
        x = torch.randn(300, 40, generator=g, dtype=dtype) * torch.rand(300, 1, generator=g)
        dists = F.sq_dists_to(x)
        bounds = D._Bounds(dists, copy, float(dists.sq_norm_N.max()))
        d = torch.rand(300, generator=g, dtype=torch.float64).to(dtype) * 4
        d[:5] = float("-inf")  # picked points: no pair passes
        dots = bounds.rows_ND @ bounds.rows_ND[:60].T
        s = bounds.estimate(bounds.sq_N[:, None], bounds.sq_N[None, :60], dots)
        cut = bounds.cutoff(d, None, 1e-9)
        floor = bounds.dot_floors(bounds.sq_N, cut)[:, None] + bounds.dot_floors(bounds.sq_N[:60])
        kept = dots > floor
        assert not (s < cut[:, None])[~kept].any()
        assert kept[5:].any() and not kept[:5].any()


def test_candidate_cut_inside_a_tie_of_lazy_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """Budget = N on a line: many points tie at the candidate cut, some of them lazy; the
    candidates must still be refreshed (a second topk once broke the tie differently)."""
    monkeypatch.setattr(D, "_T_START", 16)
    for seed in (1, 2):
        x = torch.randn(1500, 1, generator=torch.Generator().manual_seed(seed))
        got, _ = _pruned(x, 1500, None, seed=seed)
        assert got == _plain_k_center(x, 1500, None, seed=seed)


@pytest.mark.parametrize("scale", [1e-10, 1e10])
def test_bounds_leave_the_distance_functions_norms_alone(scale: float) -> None:
    """Float64 features far from unit norm get a scaled float32 copy; scaling its norms must
    not touch the distance function's own (every exact distance comes from those)."""
    x = _dataset("clustered", 400, 8, torch.float64, seed=5) * scale
    dist = F.sq_dists_to(x)
    before = dist(0).clone()
    picks = F.k_center_greedy(dist, 400, 60, None, torch.Generator().manual_seed(1)).tolist()
    assert torch.equal(dist(0), before)
    assert picks == _plain_k_center(x, 60, None, seed=1)
    got, stats = _pruned(x, 60, None, seed=1, screen=True)
    assert stats.screen and got == picks


def test_plain_loop_refuses_nan_distances() -> None:
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    x[7, 2] = float("nan")
    dist = F.sq_dists_to(x)
    with pytest.raises(ValueError, match="NaN"):
        F.k_center_greedy(lambda j: dist(j), 50, 5, None, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("labeled", [False, True])
def test_ties_at_the_farthest_settled_over_every_point(
    labeled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Duplicates on a small grid: the farthest distance is often shared beyond the
    candidates, so a batch settles the tie over every point, lazy ones refreshed first."""
    monkeypatch.setattr(D, "_T_START", 8)
    monkeypatch.setattr(D, "_LAZY", 1.5)
    x = _dataset("grid", 800, 5, torch.float64, seed=6)
    centers = x[:4] + 0.5 if labeled else None
    want = _plain_k_center(x, 266, centers, seed=4)
    got, stats = _pruned(x, 266, centers, seed=4)
    assert got == want and stats.refreshed > 0, stats
