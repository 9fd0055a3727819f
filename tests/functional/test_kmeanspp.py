"""Pruned k-means++ (taskal.functional.kmeanspp): the plain loop's picks, fewer rows read."""

from __future__ import annotations

import pytest
import torch

from taskal import functional as F
from taskal.functional import kmeanspp as K


def _clustered_badge(n: int, seed: int, dtype: torch.dtype = torch.float64):
    """Gradient factors of clustered embeddings with a random head, plus ties and duplicates."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(8, 12, generator=g, dtype=dtype) * 3
    emb = means[torch.randint(8, (n,), generator=g)]
    emb = emb + 0.3 * torch.randn(n, 12, generator=g, dtype=dtype)
    emb[: n // 8] = emb[n // 8 : 2 * (n // 8)]  # exact duplicates
    probs = (emb @ torch.randn(12, 5, generator=g, dtype=dtype)).softmax(1)
    probs[-3:] = torch.tensor([1.0, 0, 0, 0, 0], dtype=dtype)  # zero gradients: ties at 0
    return F.gradient_factors(probs, emb)


def _plain(dists: K.FactorizedSqDists, k: int, first: int, seed: int) -> list[int]:
    """The plain loop on the same distances (a wrapped closure, so no pruning)."""
    g = torch.Generator().manual_seed(seed)
    return K.kmeans_pp(lambda j: dists(j), dists.num_points, k, first, g).tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_picks_equal_the_plain_loop(dtype: torch.dtype, seed: int) -> None:
    a, h = _clustered_badge(301, seed, dtype)
    for factors in ((a, h), (h,)):  # BADGE's two factors; one factor is plain Euclidean
        dists = K.FactorizedSqDists(*factors)
        first = int(dists.sq_norm_N.argmax())
        for k in (1, 2, 40, 301):  # k = N: down to the duplicates and the zero gradients
            got = K.kmeans_pp(dists, 301, k, first, torch.Generator().manual_seed(seed))
            assert got.tolist() == _plain(dists, k, first, seed), (len(factors), k)
        assert sorted(got.tolist()) == list(range(301))


def test_pruned_reads_few_rows_and_matches_todays_badge() -> None:
    a, h = _clustered_badge(2000, 3)
    sq = (a * a).sum(1) * (h * h).sum(1)

    def before(j: int) -> torch.Tensor:  # badge's distance before pruning (BLAS products)
        return (sq + sq[j] - 2.0 * ((a @ a[j]) * (h @ h[j]))).clamp_min(0.0)

    first = int(sq.argmax())
    stats = K.KMeansPPStats()
    got = K.kmeans_pp(K.FactorizedSqDists(a, h), 2000, 200, first, torch.Generator().manual_seed(5),
                      stats=stats)  # fmt: skip
    old = K.kmeans_pp(before, 2000, 200, first, torch.Generator().manual_seed(5))
    assert got.tolist() == old.tolist()  # same up to rounding here, so the same draws
    assert stats.read_fraction < 0.2
    probs = torch.randn(2000, 5, generator=torch.Generator().manual_seed(3)).softmax(1)
    emb = torch.randn(2000, 12, generator=torch.Generator().manual_seed(4))
    want = F.badge_select(probs, emb, 50, torch.Generator().manual_seed(1))
    a, h = F.gradient_factors(probs.double(), emb.double())
    d = F.gradient_sq_dists_to(a, h)
    assert want.tolist() == _plain(d, 50, int(d.sq_norm_N.argmax()), 1)


def test_rows_are_bit_identical_to_the_full_vector() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5000, 7, generator=g, dtype=torch.float64)
    h = torch.randn(5000, 300, generator=g, dtype=torch.float64)
    dists = K.FactorizedSqDists(a, h)
    for j in (0, 4999):
        full = dists(j)
        for m in (1, 2, 3, 17, 1000, 5000):  # single rows, chunk edges, everything
            idx = torch.randint(5000, (m,), generator=g)
            assert torch.equal(dists.rows(idx, j), full[idx])
    explicit = (a[:, :, None] * h[:, None, :]).flatten(1)
    want = (explicit - explicit[9]).pow(2).sum(1)
    assert torch.allclose(dists(9), want, rtol=1e-12, atol=1e-9)
    assert torch.equal(dists.sq_norm_N, (a * a).sum(1) * (h * h).sum(1))


def test_bounds_hold() -> None:
    """The one-factor lower bounds and the error bound hold against the explicit embedding."""
    a, h = _clustered_badge(400, 7)
    dists = K.FactorizedSqDists(a, h)
    explicit = (a[:, :, None] * h[:, None, :]).flatten(1)
    idx = torch.arange(400)
    for j in (0, 57, 399):
        exact = (explicit - explicit[j]).pow(2).sum(1)
        assert ((dists(j) - exact).abs() <= dists.max_error).all()
        for sub in (idx, idx[:50]):  # the float32 streaming pass and the gathered rows
            screen = dists.lower_bounds(sub, j)
            assert screen is not None
            lb, err = screen
            assert (lb - err <= exact[sub]).all()
            assert (lb > 0.5 * exact[sub]).float().mean() > 0.5  # and it is not vacuous


def test_falls_back_to_the_plain_loop() -> None:
    a, h = _clustered_badge(50, 0)
    dists = K.FactorizedSqDists(a, h)
    assert dists.prunable
    h_bad = h.clone()
    h_bad[3, 0] = float("inf")
    assert not K.FactorizedSqDists(a, h_bad).prunable
    calls = []

    def counting(j: int) -> torch.Tensor:
        calls.append(j)
        return dists(j)

    K.kmeans_pp(counting, 50, 5, 0, torch.Generator().manual_seed(0))
    assert len(calls) == 5
    with pytest.raises(ValueError, match="share N"):
        K.FactorizedSqDists(a, h[:10])
    assert F.kmeans_pp is K.kmeans_pp and F.FactorizedSqDists is K.FactorizedSqDists
