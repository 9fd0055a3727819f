"""Greedy k-center (core-set, Sener & Savarese 2018): repeatedly pick the point farthest from
every center.

:func:`k_center_greedy` runs the plain loop over any distance-to-one-point function.
:func:`k_center_greedy_features` (also taken by :func:`k_center_greedy` when it is handed
:func:`~taskal.functional.distances.sq_dists_to`'s function and nothing is labeled) picks
in exact batches and prunes with the triangle inequality, reading only the rows whose
distance can still shrink (and, once regions have centers, not even those while they are
well inside the farthest points' distance); its picks are identical to the plain loop's.
Memory is ``O(N)`` beyond the features (plus a float32 copy of float64 features, by
default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from taskal.functional.distances import DistTo, SqDistsTo, _nearest, _RowDots


def k_center_greedy(
    dist_to: DistTo,
    num_points: int,
    budget: int,
    init_min_dist_N: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Greedy k-center (Sener & Savarese 2018, core-set): repeatedly pick the farthest point.

    When ``dist_to`` comes from :func:`sq_dists_to` and ``init_min_dist_N`` is ``None``, the
    pruned :func:`k_center_greedy_features` runs instead, with identical picks; pass the
    labeled embeddings to that function directly to prune with labeled centers too.

    Args:
        dist_to: squared distance from every candidate to candidate ``j``.
        num_points: number of candidates ``N``.
        budget: how many to pick, ``<= N``.
        init_min_dist_N: squared distance of every candidate to its nearest already-labeled
            point; ``None`` when nothing is labeled (the first pick is then random).
        generator: randomness for the first pick and for breaking ties between equally
            distant points.

    Returns:
        ``[budget]`` long indices into the candidates, in pick order, unique.
    """
    if budget <= 0:
        return torch.zeros(0, dtype=torch.long)
    if (
        isinstance(dist_to, SqDistsTo)
        and init_min_dist_N is None
        and dist_to.num_points == num_points
        and budget <= num_points
        and dist_to.finite
        and _Bounds.supported(dist_to, None)
    ):
        return _pruned_k_center(dist_to, budget, None, generator, None, 2**20, KCenterStats())
    return _plain_k_center(dist_to, num_points, budget, init_min_dist_N, generator)


def _plain_k_center(
    dist_to: DistTo,
    num_points: int,
    budget: int,
    init_min_dist_N: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """The plain loop: one full distance row per pick, the farthest point next."""
    if init_min_dist_N is None:
        first = int(torch.randint(num_points, (1,), generator=generator))
        min_dist_N = dist_to(first)
        picks = [first]
    else:
        min_dist_N = init_min_dist_N.clone()
        picks = []
    chosen = torch.zeros(num_points, dtype=torch.bool, device=min_dist_N.device)
    chosen[picks] = True
    # ties (duplicate embeddings) go to a random priority, not to the first in pool order
    priority_N = torch.rand(num_points, generator=generator).to(min_dist_N.device)
    while len(picks) < budget:
        masked = min_dist_N.masked_fill(chosen, -1.0)
        best = masked.max()
        if bool(torch.isnan(best)):
            raise ValueError(
                "k-center distances are NaN: the embeddings hold NaN or inf; check the model's "
                "features for the pool"
            )
        j = int(torch.where(masked == best, priority_N, -1.0).argmax())
        picks.append(j)
        chosen[j] = True
        min_dist_N = torch.minimum(min_dist_N, dist_to(j))
    return torch.tensor(picks, dtype=torch.long)


@dataclass
class KCenterStats:
    """What :func:`k_center_greedy_features` read; pass one in to have it filled.

    Attributes:
        num_points: ``N``.
        updates: the plain loop's full passes over the ``N`` rows after its start (one per
            pick but the last, and none for a random first pick): the yardstick of
            :attr:`read_fraction`.
        rows_read: full-precision embedding rows read to compute distances exactly (the
            initial assignment excluded).
        rows_screened: rows read from the float32 bounds copy (or, for float32 features,
            the features themselves) to settle pairs without exact distances.
        entries_scanned: per-candidate scalars (distance, assignment) looked at.
        groups_scanned: (center group, pick) pairs not skipped whole, summed over picks.
        screen: whether a float32 copy of the features was made for bounds.
        batches: exact batches of picks (each followed by one update of the distances).
        refreshed: lazy points (left out of updates while well inside the farthest points'
            distance) brought up to date when they came near the top again.
    """

    num_points: int = 0
    updates: int = 0
    rows_read: int = 0
    rows_screened: int = 0
    entries_scanned: int = 0
    groups_scanned: int = 0
    screen: bool = False
    batches: int = 0
    refreshed: int = 0

    @property
    def read_fraction(self) -> float:
        """Mean fraction of the ``N`` full rows read per update (1.0 for the plain loop)."""
        return self.rows_read / max(1, self.updates * self.num_points)


def k_center_greedy_features(
    x_ND: Tensor,
    budget: int,
    labeled_LD: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    screen: bool | None = None,
    max_block: int = 2**20,
    stats: KCenterStats | None = None,
) -> Tensor:
    """Greedy k-center on plain embeddings, in exact batches pruned by the triangle inequality.

    Picks are identical to ``k_center_greedy(sq_dists_to(x_ND), N, budget, init, generator)``
    run as the plain loop, with ``init = min_sq_dists(x_ND, labeled_LD)`` when labeled points
    are given (same distances bit for bit, same random first pick and tie-breaking).

    **Batches.** Distances only shrink, so while the ``T`` largest distances ``d`` (the
    candidates) are exact, they hold the next picks for as long as the farthest candidate,
    with its distance to the picks made meanwhile folded in, is still strictly farther than
    ``beta``, the ``(T+1)``-th largest ``d``: every other point is at most ``beta`` away
    (its ``d`` need only be an upper bound). The candidates' rows are read into one block
    and the plain loop is run on them alone (one pass over the block per pick); the picks it
    makes before it reaches ``beta`` are the plain loop's next picks. Candidates that fall
    to ``beta`` or below can no longer be picked in the batch and are dropped from the
    block (in the same order, so ties still go the same way). Only then is everyone else's
    ``d`` brought up to date, for all the batch's picks at once.

    **Update.** Every point keeps its nearest center ``a_i`` and squared distance ``d_i``.
    ``||x_i - x_j|| >= ||c - x_j|| - ||x_i - c||`` means a point of center ``c`` can only
    move to a new pick ``j`` if ``||c - x_j|| < 2 sqrt(d_i)``: one threshold per (center,
    pick) pair, from a float32 lower bound on ``||c - x_j||``, settles most pairs from
    ``d_i`` and ``a_i`` alone, and once every region has centers the pairs left come from
    each center's short list of near picks. While regions still lack centers (most points
    may move to the new picks) the rows are read once for all the batch's picks instead, as
    one float32 matrix product whose entries are compared with a floor per row and per
    pick: a pair at or below it has an estimate that shows its computed distance cannot go
    below ``d_i``. A pair left is settled when its rounding-safe bounds show that its
    computed distance can neither go below ``d_i`` nor be the nearest of the point's new
    picks (with a float32 copy of float64 features, the later pairs are screened the same
    way, one pair at a time, picks near the same center in turn so that the rows they share
    are still in cache). The rest are computed exactly, one canonical call per pick over
    just those rows, so the running minimum is the plain loop's bit for bit.

    **Lazy points.** Once regions have centers, a point whose ``d`` is already at most
    ``0.95 beta`` is left out of the updates: its ``d`` stays an upper bound (at exactly
    its distance to ``a_i``, so the thresholds stay valid) and it remembers the first pick
    it missed. It cannot be a candidate while ``beta`` stays above its ``d``; when it comes
    among the ``T`` largest again, the picks it missed are folded in (pruned and screened
    like an update's) before the batch starts. Extra memory is ``O(N + (L + budget) D)``
    and a block of candidates, plus an ``N x D`` float32 copy of float64 features when
    ``screen`` is on.

    Args:
        x_ND: ``[N, D]`` floating candidate embeddings (float32 keeps 1M x 512 at 2 GB).
        budget: how many to pick, ``0 <= budget <= N``.
        labeled_LD: ``[L, D]`` already-labeled embeddings, the initial centers; ``None`` or
            empty when nothing is labeled (the first pick is then random).
        generator: randomness for the first pick and for breaking ties between equally
            distant points.
        screen: for features other than float32, bound distances with a float32 copy
            (faster; half the size of float64 features) rather than with the features
            themselves; ``None``: when the copy takes at most 1 GiB.
        max_block: block size of the initial nearest-labeled search (see min_sq_dists).
        stats: filled with what was read (rows per update, groups skipped), if given.

    Returns:
        ``[budget]`` long indices into the candidates, in pick order, unique.
    """
    if x_ND.dim() != 2 or not x_ND.is_floating_point():
        raise ValueError(f"expected floating embeddings [N, D], got {x_ND.dtype} {x_ND.shape}")
    n = int(x_ND.shape[0])
    if isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget <= n:
        raise ValueError(f"budget must be an integer in [0, {n}], got {budget!r}")
    if labeled_LD is not None and labeled_LD.shape[0] == 0:
        labeled_LD = None
    if labeled_LD is not None and (
        labeled_LD.dim() != 2
        or labeled_LD.shape[1] != x_ND.shape[1]
        or labeled_LD.dtype != x_ND.dtype
        or labeled_LD.device != x_ND.device
    ):
        raise ValueError(
            f"labeled must be [L, {x_ND.shape[1]}] {x_ND.dtype} on {x_ND.device}, got "
            f"{tuple(labeled_LD.shape)} {labeled_LD.dtype} on {labeled_LD.device}"
        )
    if budget == 0:
        return torch.zeros(0, dtype=torch.long)
    dists = SqDistsTo(x_ND)
    if not dists.finite or (labeled_LD is not None and not bool(labeled_LD.isfinite().all())):
        raise ValueError("embeddings must be finite")
    stats = stats if stats is not None else KCenterStats()
    if not _Bounds.supported(dists, labeled_LD):  # norms near the floating-point range's ends
        init = None if labeled_LD is None else _nearest(x_ND, labeled_LD, max_block, False)[0]
        stats.num_points = n
        return _plain_k_center(dists, n, budget, init, generator)
    return _pruned_k_center(dists, budget, labeled_LD, generator, screen, max_block, stats)


def _unit_roundoff(dtype: torch.dtype, device: torch.device) -> float:
    """Unit roundoff of matrix products in ``dtype`` on ``device`` (TF32 and bf16 included)."""
    u = torch.finfo(dtype).eps / 2
    if dtype == torch.float32:
        precision = torch.get_float32_matmul_precision()
        if precision == "high":
            u = max(u, 2.0**-11)  # TF32: 10 explicit mantissa bits
        elif precision == "medium":
            u = max(u, 2.0**-8)  # bfloat16
        backend = torch.backends.cuda if device.type == "cuda" else torch.backends.mkldnn
        if getattr(getattr(backend, "matmul", None), "fp32_precision", "none") not in (
            "none",
            "ieee",
        ):
            u = max(u, 2.0**-8)  # newer per-backend switches: TF32 or bfloat16
        if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            u = max(u, 2.0**-11)
    return u


def _gamma(terms: int, u: float) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: relative error bound of an ``n``-term sum."""
    return terms * u / (1.0 - terms * u) if terms * u < 0.5 else math.inf


_U64 = 2.0**-53
_SAFE = 2.0**-40  # relative slack for the float64 arithmetic on the bounds themselves


class _Bounds:
    """Rigorous lower bounds on true squared distances from cheap dot products.

    Rows are ``h = fl(s x)``: the features themselves (``s = 1``) or a float32 copy (``s`` a
    power of two, ``1`` unless the norms are extreme), with ``||h - s x|| <= eps``. With
    ``||s x|| <= r`` for every row and center, ``q_a`` the features' computed squared norms
    (scaled by ``s^2``), and any matrix product for the dot (Higham's ``gamma_D`` bound
    whatever the summation order, plus a subnormal floor),

        ``S = q_a + q_b - 2 fl(h_a . h_b)``

    is within ``E`` of ``s^2 ||x_a - x_b||^2``, where ``E`` adds up the norms' rounding,
    the dot's rounding, ``|h_a . h_b - s^2 x_a . x_b| <= 2 r eps + eps^2`` and the float64
    operations. So ``(S - E) / s^2``, rounded down, is a lower bound.
    """

    def __init__(self, dists: SqDistsTo, copy: bool, max_sq: float) -> None:
        x_ND = dists.x_ND
        in_range = max_sq == 0.0 or 2.0**-60 < max_sq < 2.0**60
        self.copied = copy or x_ND.dtype not in (torch.float32, torch.float64)
        self.copied |= x_ND.dtype == torch.float32 and not in_range
        self.scale = 1.0
        if self.copied and not in_range:
            self.scale = 2.0 ** math.floor(math.log2(2.0**10 / math.sqrt(max_sq)))
        if not self.copied:
            self.rows_ND = x_ND
        elif self.scale == 1.0:
            self.rows_ND = x_ND.to(torch.float32)
        else:
            self.rows_ND = torch.empty(x_ND.shape, dtype=torch.float32, device=x_ND.device)
            for r0 in range(0, x_ND.shape[0], dists._dots.chunk):
                self.rows_ND[r0 : r0 + dists._dots.chunk] = x_ND[r0 : r0 + dists._dots.chunk] * (
                    self.scale
                )
        s2 = self.scale * self.scale
        # the features' own norms, scaled in a copy (never the distance function's own)
        self.sq_N = dists.sq_norm_N.to(torch.float64, copy=True).mul_(s2)
        dim = int(x_ND.shape[1])
        fi = torch.finfo(self.rows_ND.dtype)
        tiny = fi.tiny * fi.eps  # the smallest subnormal: an absolute rounding-error floor
        u_sq = _unit_roundoff(x_ND.dtype, x_ND.device)  # squared norms: in the features' dtype
        r = math.sqrt(max_sq * s2 * (1 + 2 * _gamma(dim, u_sq))) * (1 + 2.0**-20)
        r += math.sqrt(dim) * tiny
        eps = (fi.eps / 2 * r + math.sqrt(dim) * tiny) * (1 + 2.0**-20) if self.copied else 0.0
        u_dot = _unit_roundoff(self.rows_ND.dtype, x_ND.device)
        dot_err = _gamma(dim, u_dot) * (r + eps) ** 2 + dim * tiny + 2 * r * eps + eps * eps
        norm_err = _gamma(dim, u_sq) * r * r + 2 * dim * torch.finfo(x_ND.dtype).tiny * s2
        self.big_e = (2 * dot_err + 2 * norm_err + 16 * _U64 * 4 * r * r) * (1 + _SAFE)
        self._dots: _RowDots | None = None
        self._slack = 2.0**-40 * r * r + 2.0**-120  # above float64 rounding of S; subnormals

    @staticmethod
    def supported(dists: SqDistsTo, labeled_LD: Tensor | None) -> bool:
        """Whether the squared norms are far enough from the floating-point range's ends."""
        max_sq = float(dists.sq_norm_N.max()) if dists.num_points else 0.0
        if labeled_LD is not None:
            max_sq = max(max_sq, float((labeled_LD.double() ** 2).sum(1).max()))
        return max_sq == 0.0 or 2.0**-200 < max_sq < 2.0**200

    def encode(self, x_MD: Tensor) -> tuple[Tensor, Tensor]:
        """Bound rows and scaled squared norms for centers given by their features."""
        rows = (x_MD * self.scale).to(self.rows_ND.dtype) if self.copied else x_MD
        return rows, (x_MD * x_MD).sum(1).to(torch.float64).mul_(self.scale * self.scale)

    def pair_dots(self, idx_P: Tensor, pb: Tensor, pk: Tensor) -> Tensor:
        """Bound-row dot products of points ``idx_P`` with picks ``pk[pb]`` (in runs of one)."""
        if self._dots is None:
            self._dots = _RowDots(self.rows_ND)
        picks, counts = torch.unique_consecutive(pb, return_counts=True)
        vecs = [self._dots.vector(j) for j in pk.index_select(0, picks).tolist()]
        return self._dots.pair_dots(idx_P, vecs, counts.tolist())

    def lower(self, sq_a: Tensor, sq_b: Tensor, dots: Tensor) -> Tensor:
        """Float64 lower bounds on true squared distances (shapes broadcast)."""
        s = (sq_a + sq_b).sub_(dots.to(torch.float64), alpha=2.0).sub_(self.big_e)
        return s.mul_((1 - _SAFE) / (self.scale * self.scale))

    def estimate(self, sq_a: Tensor, sq_b: Tensor, dots: Tensor) -> Tensor:
        """``S`` in float64 (shapes broadcast): within ``E`` of ``s^2`` times the truth."""
        return (sq_a + sq_b).sub_(dots.to(torch.float64), alpha=2.0)

    def cutoff(self, d: Tensor, s_min: Tensor | None, delta: float) -> Tensor:
        """Per point, the estimates ``S`` of pairs that may matter lie below this.

        A computed distance is within ``delta`` of the true one, so a pair can lower a
        point's ``d`` only if ``(S - E) / s^2 - delta < d``, and can be its new nearest
        only if ``(S - E) / s^2 - delta <= (S_min + E) / s^2 + delta`` for the point's
        smallest estimate ``S_min`` over any of its pairs (``None``: that test left out);
        enlarged by ``2**-30`` against rounding (it is > 0).
        """
        s2 = self.scale * self.scale
        cut = d.to(torch.float64).add_(delta).mul_(s2).add_(self.big_e)
        if s_min is not None:
            cut = torch.minimum(cut, s_min + (2 * self.big_e + 2 * delta * s2))
        return cut.mul_(1 + 2.0**-30)

    def dot_floors(self, sq: Tensor, cut: Tensor | None = None) -> Tensor:
        """Halves ``t`` in the bound rows' dtype: a pair whose computed dot product is at
        most ``fl(t_a + t_b)``, with ``t_a`` from a point's ``cut`` and ``t_b`` from a
        pick (``cut`` ``None``), has an estimate ``S >= cut``, so fails :meth:`cutoff`.

        ``S = q_a + q_b - 2 dot >= cut`` whenever ``dot <= (q_a - cut) / 2 + q_b / 2``
        exactly. Each half is lowered by ``2**-22`` of its size (above the float64 rounding
        of the halves and the rounding of converting them to float32 and adding them) and
        by a slack above the float64 rounding of ``S`` itself (``+inf`` stays ``+inf``).
        """
        half = (sq if cut is None else sq - cut).to(torch.float64) * 0.5
        lower = torch.where(half > 0, half * (1 - 2.0**-22), half * (1 + 2.0**-22))
        return lower.sub_(self._slack).to(self.rows_ND.dtype)


def _prune_thresholds(t_K: Tensor, delta: float, dtype: torch.dtype) -> Tensor:
    """Largest ``d`` such that a point of center ``c`` surely keeps ``d`` when ``j`` is picked.

    With ``t`` a lower bound on the true ``||c - x_j||^2`` and ``d + delta`` an upper bound
    on the true ``||x_i - c||^2``, the triangle inequality gives true
    ``||x_i - x_j||^2 >= d + 2 delta``, so a computed one ``>= d``, whenever
    ``d + delta <= (t - 2 delta)^2 / (4 t)`` and ``t > 2 delta``. Computed in float64 and
    shrunk by ``2**-20`` before rounding to ``dtype``, so never above the bound; negative
    (nothing skipped) where ``t <= 2 delta``.
    """
    thr = (t_K - 2.0 * delta).clamp_min_(0.0).square_().div_(t_K.clamp_min(1e-300).mul_(4.0))
    return thr.sub_(delta + 1e-300).mul_(1.0 - 2.0**-20).to(dtype)


_T_START = 256  # candidates per batch at first, and at least
_LAZY = 0.95  # sparse updates leave out points with d at most this times the last beta


def _pruned_k_center(
    dists: SqDistsTo,
    budget: int,
    labeled_LD: Tensor | None,
    generator: torch.Generator | None,
    screen: bool | None,
    max_block: int,
    stats: KCenterStats,
) -> Tensor:
    """The batched, pruned greedy k-center behind :func:`k_center_greedy_features`.

    State, ``O(N + K D)`` for ``K = L + budget`` centers: ``d_N`` and ``assign_N`` (each
    point's squared distance to, and index of, its nearest center; ``d = -inf`` once
    picked), exact at the start of every batch but for lazy points (``stale_N``: ``d`` an
    upper bound, at exactly the distance to center ``assign_N``, missing the picks from
    position ``since_N`` on, never among the candidates), and the centers' bound rows.
    """
    x_ND, sq_N = dists.x_ND, dists.sq_norm_N
    n, dim = int(x_ND.shape[0]), int(x_ND.shape[1])
    dev, dtype = x_ND.device, x_ND.dtype
    num_labeled = 0 if labeled_LD is None else int(labeled_LD.shape[0])
    stats.num_points = n

    picks: list[int] = []
    if labeled_LD is None:
        first = int(torch.randint(n, (1,), generator=generator))
        d_N = dists(first)
        assign_N = torch.zeros(n, dtype=torch.long, device=dev)
        picks.append(first)
    else:
        d_N, arg_N = _nearest(x_ND, labeled_LD, max_block, with_index=True)
        assert arg_N is not None
        assign_N = arg_N
    # ties (duplicate embeddings) go to a random priority, as in the plain loop: its argmax
    # takes the highest priority, then the lowest index; rank_N orders points that way
    priority_N = torch.rand(n, generator=generator).to(dev)
    rank_N = torch.empty(n, dtype=torch.long, device=dev)
    rank_N[torch.argsort(priority_N, descending=True, stable=True)] = torch.arange(n, device=dev)
    stats.updates = max(0, budget - 1 - len(picks))
    if picks:
        d_N[picks[0]] = -math.inf
    if len(picks) >= budget:
        return torch.tensor(picks, dtype=torch.long)

    # a bound on any computed squared distance's rounding error, doubled for safety
    max_sq = float(sq_N.max())
    if labeled_LD is not None:
        max_sq = max(max_sq, float((labeled_LD * labeled_LD).sum(1).max()))
    u = _unit_roundoff(dtype, dev)
    delta = 2.0 * _gamma(dists._dots.width + 2, u) * 4.0 * max_sq if max_sq > 0 else 0.0

    if screen is None:
        screen = n * dim * 4 <= 2**30
    bounds = _Bounds(dists, screen and dtype != torch.float32, max_sq)
    stats.screen = bounds.copied
    cap_k = num_labeled + budget
    cent_KD = bounds.rows_ND.new_empty(cap_k, dim)  # centers' bound rows: labeled, then picks
    cent_sq_K = torch.empty(cap_k, dtype=torch.float64, device=dev)
    if labeled_LD is not None:
        cent_KD[:num_labeled], cent_sq_K[:num_labeled] = bounds.encode(labeled_LD)
    else:
        cent_KD[0], cent_sq_K[0] = bounds.rows_ND[first], bounds.sq_N[first]
    num_centers = max(1, num_labeled)
    center_pt = torch.full((cap_k,), -1, dtype=torch.long, device=dev)  # picks' indices
    if labeled_LD is None:
        center_pt[0] = first
    # lazy points: d_N an upper bound (assign_N still a center at exactly that distance),
    # missing the picks from position since_N on; exact again before they can matter
    stale_N = torch.zeros(n, dtype=torch.bool, device=dev)
    since_N = torch.zeros(n, dtype=torch.long, device=dev)
    lazy_below = -math.inf  # sparse updates leave points with d at most this lazy
    sparse = False  # whether the last update was a sparse one

    full = False  # whether the last batch stopped at its cap rather than at beta

    def near_pairs(
        rows: Tensor, g_Q: Tensor, near_GP: Tensor, thr_GP: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The pairs (row, pick) that the triangle inequality leaves: rows ``rows`` (of
        groups ``g_Q``) with the picks near their group whose threshold their ``d`` exceeds;
        picks as columns of ``near_GP`` and ``thr_GP``."""
        gk, gb = near_GP.nonzero().unbind(1)  # sorted by group
        thr_G = thr_GP[gk, gb]
        count_G = torch.bincount(gk, minlength=near_GP.shape[0])
        start_G = count_G.cumsum(0).sub_(count_G)
        reps_Q = count_G.index_select(0, g_Q)
        qi = torch.repeat_interleave(reps_Q)  # row of each (row, near pick)
        first_Q = reps_Q.cumsum(0).sub_(reps_Q)
        at = torch.arange(qi.shape[0], device=dev)
        at.add_((start_G.index_select(0, g_Q) - first_Q).index_select(0, qi))
        stats.entries_scanned += int(qi.shape[0])
        keep = d_N.index_select(0, rows).index_select(0, qi) > thr_G.index_select(0, at)
        return rows.index_select(0, qi[keep]), gb.index_select(0, at[keep])

    def refresh(r_R: Tensor) -> None:
        """Make lazy points ``r_R`` exact: fold in the picks since the oldest one they
        missed, pairs left by the triangle inequality around their centers, screened."""
        stats.refreshed += int(r_R.shape[0])
        a_R, d_R = assign_N.index_select(0, r_R), d_N.index_select(0, r_R)
        first_c = int(since_N.index_select(0, r_R).min()) + num_labeled
        groups, g_R = torch.unique(a_R, return_inverse=True)
        radius_G = torch.full(groups.shape, -math.inf, dtype=dtype, device=dev)
        radius_G.scatter_reduce_(0, g_R, d_R, "amax")
        found: list[tuple[Tensor, Tensor]] = []
        step = max(1, 2**22 // int(groups.shape[0]))
        for c0 in range(first_c, num_centers, step):  # the picks' centers, a slice at a time
            c_P = torch.arange(c0, min(num_centers, c0 + step), device=dev)
            dots_GP = cent_KD.index_select(0, groups) @ cent_KD.index_select(0, c_P).T
            t_GP = bounds.lower(cent_sq_K[groups, None], cent_sq_K[c_P][None], dots_GP)
            thr_GP = _prune_thresholds(t_GP, delta, dtype)
            pr, pp = near_pairs(r_R, g_R, radius_G[:, None] > thr_GP, thr_GP)
            found.append((pr, pp + c0))
        pr, pc = (torch.cat(parts) for parts in zip(*found, strict=True))
        pc, order = torch.sort(pc, stable=True)
        pr = pr.index_select(0, order)
        if bounds.copied and pr.shape[0]:  # bound rows cost half the exact ones: screen
            stats.rows_screened += int(pr.shape[0])
            pr, pc = screened(pr, pc, bounds.pair_dots(pr, pc, center_pt), 0)
        exact(pr, pc)
        stale_N.index_fill_(0, r_R, False)

    def next_batch(size: int) -> list[int]:
        """The plain loop's next picks, as many as the ``size`` farthest points settle
        (made exact first if lazy); sets ``lazy_below`` from its beta."""
        nonlocal lazy_below, full
        want = budget - len(picks)
        size = min(size, n - len(picks))
        while True:  # the candidates exact: lazy ones among them refreshed
            # one topk for both, so that the candidates are among the refreshed even when
            # the cut falls inside a tie (two calls may break it differently)
            vals, wide = torch.topk(d_N, min(max(2 * size, size + 1), n))
            vals, top = vals[: size + 1], wide[: size + 1]
            if not bool(stale_N.index_select(0, top[:size]).any()):
                break
            refresh(wide.masked_select(stale_N.index_select(0, wide)))  # a few rounds' worth
        beta = float(vals[size]) if vals.shape[0] > size else -math.inf
        lazy_below = _LAZY * beta
        cand = top[:size]
        cand = cand.index_select(0, torch.argsort(rank_N.index_select(0, cand)))
        e_C = d_N.index_select(0, cand)
        block, sq_C = dists.gather(cand)
        cand_list = cand.tolist()
        batch: list[int] = []
        read = 0
        while len(batch) < want:
            if read > 4 * n:  # as many rows read as 4 full passes: update, shrink
                full = True
                break
            best, at = e_C.max(0)  # the first maximum: the best ranked among ties
            if not float(best) > beta:  # someone outside may be as far: stop here
                break
            i = int(at)
            batch.append(cand_list[i])
            e_C[i] = -math.inf
            if len(batch) == want:
                break
            torch.minimum(e_C, dists.block(block, sq_C, batch[-1]), out=e_C)
            read += len(cand_list)
            if len(batch) % 4 == 0:  # drop the candidates at or below beta (picked ones too):
                live = (e_C > beta).nonzero().flatten()  # they cannot be picked any more
                if 4 * int(live.shape[0]) <= 3 * len(cand_list):
                    if live.shape[0] == 0:
                        break
                    cand, e_C = cand.index_select(0, live), e_C.index_select(0, live)
                    block, sq_C = dists.gather(cand)  # same rank order: same tie-breaking
                    cand_list = cand.tolist()
        stats.rows_read += read
        while not batch:  # the farthest ties with beta: settle the tie over every point
            tied = (d_N == d_N.max()).nonzero().flatten()
            lazy = tied.masked_select(stale_N.index_select(0, tied))
            if lazy.shape[0]:
                refresh(lazy)
                continue
            batch.append(int(tied[rank_N.index_select(0, tied).argmin()]))
        return batch

    def update(batch: list[int]) -> None:
        """Fold the batch's picks (new centers) into ``d_N`` and ``assign_N``."""
        nonlocal num_centers, sparse
        k0, b = num_centers, len(batch)
        pk = torch.tensor(batch, dtype=torch.long, device=dev)
        # pairs are read in runs of one pick; picks near the same center take turns, so
        # that the rows they share are read again while still in cache
        turn_B = torch.empty(b, dtype=torch.long, device=dev)
        by_center = torch.argsort(assign_N.index_select(0, pk), stable=True)
        turn_B[by_center] = torch.arange(b, device=dev)
        cent_KD[k0 : k0 + b] = bounds.rows_ND.index_select(0, pk)
        center_pt[k0 : k0 + b] = pk
        cent_sq_K[k0 : k0 + b] = bounds.sq_N.index_select(0, pk)
        new_BD, new_sq_B = cent_KD[k0 : k0 + b], cent_sq_K[k0 : k0 + b]
        num_centers += b
        t_KB = bounds.lower(cent_sq_K[:k0, None], new_sq_B[None], cent_KD[:k0] @ new_BD.T)
        thr_KB = _prune_thresholds(t_KB, delta, dtype)
        # a point whose d is at most all its group's thresholds keeps d: O(N) scalars read
        cand_N = d_N > thr_KB.amin(1).index_select(0, assign_N)
        if sparse:  # regions have centers: points nearer than lazy_below turn lazy
            lazy_N = cand_N & ((d_N <= lazy_below) | stale_N)
            late = (lazy_N & ~stale_N).nonzero().flatten()
            since_N.index_fill_(0, late, len(picks) - b)
            stale_N.index_fill_(0, late, True)
            cand_N &= ~lazy_N
        cand = cand_N.nonzero().flatten()
        stats.batches += 1
        stats.entries_scanned += n
        q = int(cand.shape[0])
        if q == 0:
            return
        radius_K = torch.full((k0,), -math.inf, dtype=dtype, device=dev)
        radius_K.scatter_reduce_(
            0, assign_N.index_select(0, cand), d_N.index_select(0, cand), "amax"
        )
        near_KB = radius_K[:, None] > thr_KB  # (group, pick) pairs not skipped whole
        stats.groups_scanned += int(near_KB.sum())
        # (candidate, pick) pairs left by the group tests: few once every region has centers
        a_Q = assign_N.index_select(0, cand)
        size_K = torch.bincount(a_Q, minlength=k0)
        sparse = 2 * int(near_KB.sum(1).mul_(size_K).sum()) < q * b
        if sparse:  # each group's short list of near picks, screened one pair at a time
            pr, pb = near_pairs(cand, a_Q, near_KB, thr_KB)
            order = torch.argsort(turn_B.index_select(0, pb), stable=True)
            pr, pb = pr.index_select(0, order), pb.index_select(0, order)
            if bounds.copied and pr.shape[0]:  # bound rows cost half the exact ones: screen
                stats.rows_screened += int(pr.shape[0])
                pr, pb = screened(pr, pb, bounds.pair_dots(pr, pb, pk), k0)
            exact(pr, pb + k0)
            return
        # a new region's first picks, where most points may move: every candidate against
        # every pick, as matrix products of bound rows with the picks; all rows, in order,
        # unless gathering the candidates' rows (about 3 times the cost of reading them in
        # order) costs less than the products it saves
        contiguous = n * (4 + b) <= q * (12 + b)
        total = n if contiguous else q
        # chunks whose temporaries stay small (fresh memory is slow to touch): products of
        # 2**18 entries, gathered rows of 1 MiB
        rows = 2**18 // b
        if not contiguous:
            rows = min(rows, 2**20 // (dim * bounds.rows_ND.element_size()))
        rows = max(16, min(total, rows))
        floor_B = bounds.dot_floors(new_sq_B)
        found: list[tuple[Tensor, Tensor, Tensor]] = []
        for r0 in range(0, total, rows):
            r1 = min(total, r0 + rows)
            c_R = torch.arange(r0, r1, device=dev) if contiguous else cand[r0:r1]
            h_RD = bounds.rows_ND[r0:r1] if contiguous else bounds.rows_ND.index_select(0, c_R)
            sq_R = bounds.sq_N.index_select(0, c_R)
            dots_RB = h_RD @ new_BD.T
            # a row's pair with the largest dot - q_b / 2 is about its smallest estimate: that
            # pair's estimate serves as S_min in the row's cutoff (any pair's does); entries at
            # or below the row's floor plus the pick's cannot pass the cutoff
            best_R = (dots_RB - floor_B).argmax(1)
            s_best_R = bounds.estimate(
                sq_R, new_sq_B.index_select(0, best_R), dots_RB.gather(1, best_R[:, None])[:, 0]
            )
            cut_R = bounds.cutoff(d_N.index_select(0, c_R), s_best_R, delta)
            floor_RB = bounds.dot_floors(sq_R, cut_R)[:, None] + floor_B
            r_P, b_P = (dots_RB > floor_RB).nonzero().unbind(1)
            found.append((c_R.index_select(0, r_P), b_P, dots_RB[r_P, b_P]))
            stats.entries_scanned += int(dots_RB.numel())
            stats.rows_screened += r1 - r0
        pr, pb, dots_P = (torch.cat(parts) for parts in zip(*found, strict=True))
        # the triangle inequality's test, then the estimates' (lazy points may be among
        # pr: their d is exact to their center, so the work is sound, only repeated)
        at_P = (d_N.index_select(0, pr) > thr_KB[assign_N.index_select(0, pr), pb]).nonzero()
        pr, pb, dots_P = (t.index_select(0, at_P.flatten()) for t in (pr, pb, dots_P))
        order = torch.argsort(turn_B.index_select(0, pb), stable=True)
        pr, pb, dots_P = (t.index_select(0, order) for t in (pr, pb, dots_P))
        pr, pb = screened(pr, pb, dots_P, k0)
        exact(pr, pb + k0)

    def screened(pr: Tensor, pb: Tensor, dots_P: Tensor, k0: int) -> tuple[Tensor, Tensor]:
        """The pairs (point, center ``k0 + pb``) whose bound-row dot products ``dots_P``
        leave them able to lower ``d`` or to be the point's new nearest (see
        :meth:`_Bounds.cutoff`), order kept."""
        sq_P = bounds.sq_N.index_select(0, pr)
        s_P = bounds.estimate(sq_P, cent_sq_K[k0:].index_select(0, pb), dots_P)
        s_min_N = torch.full((n,), math.inf, dtype=torch.float64, device=dev)
        s_min_N.scatter_reduce_(0, pr, s_P, "amin")
        cut_P = bounds.cutoff(d_N.index_select(0, pr), s_min_N.index_select(0, pr), delta)
        at_P = (s_P < cut_P).nonzero().flatten()
        return pr.index_select(0, at_P), pb.index_select(0, at_P)

    def exact(pr: Tensor, pc: Tensor) -> None:
        """Computed distances of points ``pr`` to picked centers ``pc`` (in runs of one),
        folded into ``d_N`` and ``assign_N``."""
        if pr.shape[0] == 0:
            return
        dist_P = dists.pairs(pr, center_pt.index_select(0, pc))
        stats.rows_read += int(pr.shape[0])
        d_P = d_N.index_select(0, pr)
        closer_P = dist_P < d_P
        if not bool(closer_P.any()):
            return
        pr, pc, dist_P = pr[closer_P], pc[closer_P], dist_P[closer_P]
        d_N.scatter_reduce_(0, pr, dist_P, "amin")
        won = dist_P == d_N.index_select(0, pr)  # a pick at the new minimum
        assign_N.index_put_((pr[won],), pc[won])

    size = _T_START
    while len(picks) < budget:
        batch = next_batch(size)
        picks.extend(batch)
        d_N.index_fill_(0, torch.tensor(batch, dtype=torch.long, device=dev), -math.inf)
        if len(picks) < budget:
            update(batch)
        # few picks per batch: the farthest points crowd in few regions, look at more of
        # them; many: fewer suffice (each pick reads all the candidates' rows)
        if full or 4 * len(batch) > size:
            size, full = max(size // 4, _T_START), False
        elif 16 * len(batch) < size:
            size = min(4 * size, max(_T_START, n // 32))
    return torch.tensor(picks, dtype=torch.long)


__all__ = ["KCenterStats", "k_center_greedy", "k_center_greedy_features"]
