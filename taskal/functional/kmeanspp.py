"""k-means++ seeding (Arthur & Vassilvitskii 2007) that reads only the rows whose distance
can still shrink.

:func:`kmeans_pp` is the plain loop over any distance-to-one-point function: keep every
point's squared distance ``D(x)^2`` to its nearest seed, draw the next seed with probability
``∝ D(x)^2`` and fold its distances into the running minimum, one full ``N``-row pass per
pick. Handed a :class:`FactorizedSqDists` on the CPU (BADGE's gradient distances, or plain
embeddings) it prunes instead, with identical picks: same running minimum bit for bit, so
the same ``torch.multinomial`` draws from the same generator.

The pruning: every point keeps the seed it is nearest to; points are grouped by that seed,
each group knowing its largest distance (its radius). After a new seed ``j``, a point ``x``
of seed ``c`` can only come closer to ``j`` than to ``c`` if ``d(c, j) < 2 d(x, c)``, since
``d(x, j) >= d(c, j) - d(x, c)``: a whole group is skipped when that fails for its radius,
and in the other groups only the points for which it holds are read. Memory is ``O(N)``
beyond the factors; nothing ``N x N`` or ``N x k`` is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

#: squared distances from every candidate to candidate ``j``
DistTo = Callable[[int], Tensor]

_CHUNK_BYTES = 2**18  # rows per call of the CPU dot-product kernel (a cache-sized buffer)


def _row_dots(x_ND: Tensor, v_D: Tensor, idx_M: Tensor | None, buf_RD: Tensor) -> Tensor:
    """``x_i . v`` for rows ``idx_M`` (every row when ``None``), the same bits in any call.

    Each dot product is an elementwise product (exactly rounded, entry by entry) summed
    along the row by torch's CPU reduction, whose order depends on the row length alone.
    Calls always have at least two rows: a single long row would be split across threads.
    """
    m = int(x_ND.shape[0]) if idx_M is None else int(idx_M.shape[0])
    rows = int(buf_RD.shape[0])
    out = x_ND.new_empty(m + 1)  # a spare slot for a padded last call
    for r0 in range(0, m, rows):
        r = min(rows, m - r0)
        if idx_M is None:
            torch.mul(x_ND[r0 : r0 + r], v_D, out=buf_RD[:r])
        else:
            torch.index_select(x_ND, 0, idx_M[r0 : r0 + r], out=buf_RD[:r])
            buf_RD[:r].mul_(v_D)
        p = max(r, 2)
        torch.sum(buf_RD[:p], 1, out=out[r0 : r0 + p])
    return out[:m]


def _gamma(terms: int, u: float) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: relative error bound of an ``n``-term sum."""
    return terms * u / (1.0 - terms * u) if terms * u < 0.5 else math.inf


class FactorizedSqDists:
    """``j -> ||g_i - g_j||^2`` for ``g_i = f_i ⊗ f'_i ⊗ ...``, a Kronecker product of factor rows.

    ``<g_i, g_j> = prod_f <f_i, f_j>`` and ``||g_i||^2 = prod_f ||f_i||^2``, so the squared
    distance ``||g_i||^2 + ||g_j||^2 - 2 prod_f <f_i, f_j>`` costs ``O(N sum_f D_f)`` per
    call and the ``[N, prod_f D_f]`` embedding is never built. One factor is plain Euclidean
    distance; BADGE's last-layer gradients ``a_i ⊗ h_i`` are two.

    On the CPU each dot product goes through one fixed path (see :func:`_row_dots`), so
    :meth:`rows` gives bit for bit the entries of the full vector, what the pruned
    :func:`kmeans_pp` needs; elsewhere the full vector is matrix-vector products.

    Attributes:
        factors: the ``[N, D_f]`` factors, one dtype and device.
        sq_norm_N: ``||g_i||^2``, the product of the factors' squared row norms.
    """

    def __init__(self, *factors: Tensor) -> None:
        if not factors or any(f.dim() != 2 or not f.is_floating_point() for f in factors):
            raise ValueError("expected one or more floating factors [N, D_f]")
        f0 = factors[0]
        if any(f.shape[0] != f0.shape[0] or f.dtype != f0.dtype or f.device != f0.device
               for f in factors):  # fmt: skip
            raise ValueError("factors must share N, dtype and device")
        self.factors = tuple(f.contiguous() for f in factors)
        self._bufs: list[Tensor] = []
        self.factor_sq_N = [self._sq_norms(i) for i in range(len(self.factors))]
        sq_N = self.factor_sq_N[0]
        for f_sq_N in self.factor_sq_N[1:]:
            sq_N = sq_N * f_sq_N
        self.sq_norm_N = sq_N
        self._screen: tuple[int, Tensor, Tensor, float] | None = None

    @property
    def num_points(self) -> int:
        return int(self.sq_norm_N.shape[0])

    @property
    def prunable(self) -> bool:
        """CPU, float32 or float64, every norm finite: what the pruned k-means++ needs."""
        return (
            self.sq_norm_N.device.type == "cpu"
            and self.sq_norm_N.dtype in (torch.float32, torch.float64)
            and bool(torch.isfinite(self.sq_norm_N).all())
        )

    @property
    def max_error(self) -> float:
        """A bound on ``|computed - exact|`` for any squared distance here, in any summation order.

        Each dot product of ``D_f`` terms is within ``gamma_{D_f} ||f_i|| ||f_j||`` and the
        ``F`` factors multiply with ``F - 1`` roundings, so the cross term is within
        ``gamma_{sum D_f + F} ||g_i|| ||g_j||`` and each norm within ``gamma_{sum D_f + F}
        ||g_i||^2``; two more roundings form the distance. All of it is at most
        ``gamma_{sum D_f + F + 2} 4 max_i ||g_i||^2``, doubled here for safety.
        """
        u = torch.finfo(self.sq_norm_N.dtype).eps / 2
        terms = sum(int(f.shape[1]) for f in self.factors) + len(self.factors) + 2
        return 2.0 * _gamma(terms, u) * 4.0 * float(self.sq_norm_N.max())

    def _buf(self, i: int) -> Tensor:
        """Factor ``i``'s cache-sized scratch rows for :func:`_row_dots` (CPU)."""
        while len(self._bufs) <= i:
            f = self.factors[len(self._bufs)]
            rows = max(2, _CHUNK_BYTES // (int(f.shape[1]) * f.element_size()))
            self._bufs.append(f.new_zeros(rows, f.shape[1]))
        return self._bufs[i]

    def _sq_norms(self, i: int) -> Tensor:
        """``(f * f).sum(1)`` for factor ``i``, the same bits, without an ``N x D_f`` temporary."""
        f = self.factors[i]
        if f.device.type != "cpu":
            return (f * f).sum(1)
        buf, n = self._buf(i), int(f.shape[0])
        out = f.new_empty(n + 1)
        for r0 in range(0, n, buf.shape[0]):
            r = min(int(buf.shape[0]), n - r0)
            torch.mul(f[r0 : r0 + r], f[r0 : r0 + r], out=buf[:r])
            p = max(r, 2)
            torch.sum(buf[:p], 1, out=out[r0 : r0 + p])
        return out[:n]

    def _factor_dots(self, i: int, j: int, idx_M: Tensor | None) -> Tensor:
        f = self.factors[i]
        if f.device.type == "cpu":
            return _row_dots(f, f[j], idx_M, self._buf(i))
        return (f if idx_M is None else f.index_select(0, idx_M)) @ f[j]

    def _dots(self, j: int, idx_M: Tensor | None) -> Tensor:
        cross = self._factor_dots(0, j, idx_M)
        for i in range(1, len(self.factors)):
            cross.mul_(self._factor_dots(i, j, idx_M))
        return cross

    def __call__(self, j: int) -> Tensor:
        sq_N = self.sq_norm_N
        return (sq_N + sq_N[j]).add_(self._dots(j, None), alpha=-2.0).clamp_min_(0.0)

    def rows(self, idx_M: Tensor, j: int) -> Tensor:
        """``self(j)[idx_M]``, reading only rows ``idx_M`` (the same bits on the CPU)."""
        sq_M = self.sq_norm_N.index_select(0, idx_M)
        return (sq_M + self.sq_norm_N[j]).add_(self._dots(j, idx_M), alpha=-2.0).clamp_min_(0.0)

    def lower_bounds(self, idx_M: Tensor, j: int) -> tuple[Tensor, float] | None:
        """Float64 lower bounds on ``||g_i - g_j||^2`` for rows ``idx_M``, from one factor only.

        With ``s`` the narrowest factor (BADGE: ``a``, ``C`` wide against ``D + 1``) and
        ``R_i`` the product of the other factors' norms, Cauchy-Schwarz on those gives
        ``||g_i - g_j||^2 >= ||g_i||^2 + ||g_j||^2 - 2 |<s_i, s_j>| R_i R_j``: only factor
        ``s`` is read. In BADGE ``<a_i, a_j>`` is small unless ``i`` and ``j`` share a
        predicted class, so this settles most rows. Large sets take ``<s_i, s_j>`` from a
        float32 transposed copy of ``s`` (``[D_s, N]``, a streaming matrix-vector product).

        Returns:
            ``(lb_M, err)``: the exact bound is at least ``lb_M - err`` (the computed dot's
            error, ``gamma_{D_s + 3}`` in float32 of ``||s_i|| ||s_j||``, is within
            ``2 gamma max_i ||g_i||^2``, the rest as in :attr:`max_error`; both doubled).
            ``None`` for one factor.
        """
        if len(self.factors) < 2:
            return None
        if self._screen is None:
            s = min(range(len(self.factors)), key=lambda i: int(self.factors[i].shape[1]))
            r_N = torch.ones_like(self.sq_norm_N, dtype=torch.float64)
            for i, f_sq_N in enumerate(self.factor_sq_N):
                if i != s:
                    r_N.mul_(f_sq_N.double().sqrt())
            u32 = torch.finfo(torch.float32).eps / 2
            gam = _gamma(int(self.factors[s].shape[1]) + 3, u32)
            err = self.max_error + 2.0 * 2.0 * gam * float(self.sq_norm_N.max())
            self._screen = (s, r_N, self.factors[s].T.float().contiguous(), err)
        s, r_N, t_DN, err = self._screen
        f = self.factors[s]
        if 4 * idx_M.shape[0] >= f.shape[0]:  # most rows: one streaming pass beats a gather
            dots_M = (f[j].float() @ t_DN).index_select(0, idx_M)
        else:
            dots_M = _row_dots(f, f[j], idx_M, self._buf(s))
        sq_M = self.sq_norm_N.index_select(0, idx_M).double()
        lb_M = (
            dots_M.double()
            .abs_()
            .mul_(r_N.index_select(0, idx_M))
            .mul_(-2.0 * float(r_N[j]))
            .add_(sq_M)
            .add_(float(self.sq_norm_N[j]))
        )
        return lb_M, err


@dataclass
class KMeansPPStats:
    """What the pruned k-means++ read: full rows per update, groups and entries scanned."""

    num_points: int = 0
    updates: int = 0
    rows_read: int = 0
    rows_screened: int = 0
    groups_scanned: int = 0
    entries_scanned: int = 0

    @property
    def read_fraction(self) -> float:
        """Mean fraction of the ``N`` rows read per update (1.0 for the plain loop)."""
        return self.rows_read / max(1, self.updates * self.num_points)


def _draw(min_N: Tensor, chosen: Tensor, generator: torch.Generator | None) -> int:
    """The next seed, drawn with probability proportional to ``D(x)^2`` among the points not
    chosen (uniformly when every remaining point duplicates a seed)."""
    weights = min_N.masked_fill(chosen, 0.0).clamp_min(0.0)
    if float(weights.sum()) <= 0.0:
        weights = (~chosen).double()
    return int(torch.multinomial(weights, 1, generator=generator))


def kmeans_pp(
    dist_to: DistTo,
    num_points: int,
    k: int,
    first: int,
    generator: torch.Generator | None = None,
    *,
    stats: KMeansPPStats | None = None,
) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): sample with probability ∝ D(x)^2.

    When ``dist_to`` is a :class:`FactorizedSqDists` on the CPU (float32/64, finite), the
    pruned search runs (module docstring), with the plain loop's picks: the running
    minimum is the same bits and the draws are the same ``torch.multinomial`` calls.

    Args:
        dist_to: squared distance from every candidate to candidate ``j``.
        num_points: number of candidates ``N``.
        k: number of seeds ``<= N``.
        first: index of the first seed (BADGE uses the largest gradient norm).
        generator: randomness for the D^2 sampling.
        stats: filled with what the pruned search read, if given (untouched otherwise).

    Returns:
        ``[k]`` long unique indices in pick order.
    """
    if (
        isinstance(dist_to, FactorizedSqDists)
        and dist_to.num_points == num_points
        and 1 <= k <= num_points
        and dist_to.prunable
    ):
        return _pruned_kmeans_pp(dist_to, k, first, generator, stats or KMeansPPStats())
    picks = [first]
    chosen = torch.zeros(num_points, dtype=torch.bool)
    chosen[first] = True
    min_dist_N = dist_to(first).cpu().double()
    while len(picks) < k:
        j = _draw(min_dist_N, chosen, generator)
        picks.append(j)
        chosen[j] = True
        min_dist_N = torch.minimum(min_dist_N, dist_to(j).cpu().double())
    return torch.tensor(picks, dtype=torch.long)


def _pruned_kmeans_pp(
    dists: FactorizedSqDists,
    k: int,
    first: int,
    generator: torch.Generator | None,
    stats: KMeansPPStats,
) -> Tensor:
    """The pruned loop behind :func:`kmeans_pp`; picks identical to the plain loop's.

    State, ``O(N + k)``: ``min_N`` (the plain loop's running minimum), ``assign_N`` (the
    seed each point got its minimum from, so ``min_N[x]`` is the computed ``d(x, c)^2``),
    ``members`` (per seed, its unpicked points) and ``radius_K`` (their largest ``min_N``).

    Margins: with ``delta`` a bound on any computed squared distance's error, a point of seed
    ``c`` has exact ``d(x, c)^2 <= min_N[x] + delta`` and exact ``d(c, j)^2 >= t = D(c, j) -
    delta`` (``D`` computed). If ``min_N[x] + delta <= t / 4``, the triangle inequality gives
    exact ``d(x, j)^2 >= min_N[x] + delta``, so the computed one is ``>= min_N[x]`` and the
    plain loop's ``minimum`` leaves ``min_N[x]`` as it is. The threshold ``t / 4 - delta`` is
    taken in float64 less one more ``delta``, which dwarfs its own rounding.
    """
    n = dists.num_points
    stats.num_points = n
    sq_N = dists.sq_norm_N
    delta = dists.max_error
    min_N = dists(first).double()
    stats.updates, stats.rows_read = stats.updates + 1, stats.rows_read + n
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[first] = True
    assign_N = torch.zeros(n, dtype=torch.long)
    members = [torch.cat([torch.arange(first), torch.arange(first + 1, n)])]
    radius_K = torch.full((k,), -math.inf, dtype=torch.float64)
    if n > 1:
        radius_K[0] = min_N.index_select(0, members[0]).max()
    cent_KD = [f.new_empty(k, f.shape[1]) for f in dists.factors]  # the seeds' factor rows
    cent_sq_K = sq_N.new_empty(k)
    picks = [first]

    def add_center(j: int) -> int:
        c = len(picks) - 1
        for f, cent in zip(dists.factors, cent_KD, strict=True):
            cent[c] = f[j]
        cent_sq_K[c] = sq_N[j]
        return c

    add_center(first)

    def update(j: int) -> None:
        new = add_center(j)
        cross_K: Tensor | None = None
        for f, cent in zip(dists.factors, cent_KD, strict=True):
            dots = torch.mv(cent[:new], f[j])
            cross_K = dots if cross_K is None else cross_K.mul_(dots)
        assert cross_K is not None
        dcj_K = (cent_sq_K[:new] + sq_N[j]).add_(cross_K, alpha=-2.0).double()
        thr_K = dcj_K.sub_(delta).mul_(0.25).sub_(2.0 * delta)
        scan_K = radius_K[:new] > thr_K
        scan_K[int(assign_N[j])] = True  # j leaves its group
        groups = scan_K.nonzero().flatten()
        glist = groups.tolist()
        pts = members[glist[0]] if len(glist) == 1 else torch.cat([members[g] for g in glist])
        a_P = assign_N.index_select(0, pts)
        m_P = min_N.index_select(0, pts)
        at_M = ((m_P > thr_K.index_select(0, a_P)) & (pts != j)).nonzero().flatten()
        cand, m_M = pts.index_select(0, at_M), m_P.index_select(0, at_M)
        stats.updates += 1
        stats.groups_scanned += len(glist)
        stats.entries_scanned += int(pts.shape[0])
        if cand.shape[0]:  # settle what the one-factor bound can: exact >= m + delta
            screen = dists.lower_bounds(cand, j)
            if screen is not None:
                lb_M, err = screen
                stats.rows_screened += int(cand.shape[0])
                at_L = (lb_M < m_M + (err + 2.0 * delta)).nonzero().flatten()
                cand, m_M = cand.index_select(0, at_L), m_M.index_select(0, at_L)
        moved, moved_d = cand, m_M
        if cand.shape[0]:
            if 4 * cand.shape[0] >= n:  # most rows: one pass beats a gather
                d_M = dists(j).double().index_select(0, cand)
                stats.rows_read += n
            else:
                d_M = dists.rows(cand, j).double()
                stats.rows_read += int(cand.shape[0])
            at_C = (d_M < m_M).nonzero().flatten()
            moved, moved_d = cand.index_select(0, at_C), d_M.index_select(0, at_C)
        # only the groups that lose j or moved points change (the others keep their lists)
        losers = torch.cat([assign_N.index_select(0, moved), assign_N[j : j + 1]]).unique()
        min_N.index_copy_(0, moved, moved_d)
        assign_N.index_fill_(0, moved, new)
        for g in losers.tolist():
            mem = members[g]
            mem = mem.masked_select((assign_N.index_select(0, mem) == g) & (mem != j))
            members[g] = mem
            radius_K[g] = min_N.index_select(0, mem).max() if mem.shape[0] else -math.inf
        members.append(moved)
        if moved.shape[0]:
            radius_K[new] = moved_d.max()

    while len(picks) < k:
        j = _draw(min_N, chosen, generator)
        picks.append(j)
        chosen[j] = True
        if len(picks) < k:
            update(j)
    return torch.tensor(picks, dtype=torch.long)


__all__ = ["DistTo", "FactorizedSqDists", "KMeansPPStats", "kmeans_pp"]
