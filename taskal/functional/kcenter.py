"""Greedy k-center (core-set, Sener & Savarese 2018): repeatedly pick the point farthest from
every center.

:func:`k_center_greedy` runs the plain loop over any distance-to-one-point function.
:func:`k_center_greedy_features` (also taken by :func:`k_center_greedy` when it is handed
:func:`~taskal.functional.distances.sq_dists_to`'s function and nothing is labeled) prunes
with the triangle inequality and reads, per pick, only the rows whose distance can still
shrink; its picks are identical to the plain loop's. Memory is ``O(N)`` beyond the features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from taskal.functional.distances import DistTo, SqDistsTo, _nearest


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
    ):
        return _pruned_k_center(dist_to, budget, None, generator, None, 2**20, KCenterStats())
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
        updates: distance updates after a pick (the unpruned loop reads ``N`` rows in each).
        rows_read: full-precision embedding rows read by those updates (the initial
            assignment excluded).
        rows_screened: rows read from the float16 screen copy by those updates.
        entries_scanned: per-candidate scalars (distance, assignment) looked at by them.
        groups_scanned: center groups not skipped whole, summed over updates.
        screen: whether the float16 screen was used.
    """

    num_points: int = 0
    updates: int = 0
    rows_read: int = 0
    rows_screened: int = 0
    entries_scanned: int = 0
    groups_scanned: int = 0
    screen: bool = False

    @property
    def read_fraction(self) -> float:
        """Mean fraction of the ``N`` full rows read per update (1.0 for the unpruned loop)."""
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
    """Greedy k-center on plain embeddings, pruned by the triangle inequality.

    Picks are identical to ``k_center_greedy(sq_dists_to(x_ND), N, budget, init, generator)``
    run as the plain loop, with ``init = min_sq_dists(x_ND, labeled_LD)`` when labeled points
    are given (same distances bit for bit, same random first pick and tie-breaking).

    Every candidate keeps its nearest center ``a_i`` and squared distance ``d_i``; candidates
    are grouped by center, each group knowing its largest ``d_i``. When ``j`` is picked,
    ``||x_i - x_j|| >= ||c - x_j|| - ||x_i - c||`` means a candidate of center ``c`` can only
    move to ``j`` if ``||c - x_j|| < 2 sqrt(d_i)``: a whole group is skipped when that fails
    for its largest ``d_i``, and within the other groups only the candidates for which it
    holds have their rows read. Margins from rounding-error bounds on the computed distances
    keep a skipped candidate's computed distance to ``j`` provably ``>= d_i``, so the
    running minimum is the unpruned loop's. The farthest candidate is found from the
    groups' maxima. Optionally a float16 copy of the rows (scaled by a power of two) screens
    large candidate sets first: a candidate whose float16 distance, less its error bound,
    already exceeds ``d_i`` is settled without reading its full row. Extra memory is
    ``O(N + (L + budget) D)``, plus ``N x D`` float16 with the screen.

    Args:
        x_ND: ``[N, D]`` floating candidate embeddings (float32 keeps 1M x 512 at 2 GB).
        budget: how many to pick, ``0 <= budget <= N``.
        labeled_LD: ``[L, D]`` already-labeled embeddings, the initial centers; ``None`` or
            empty when nothing is labeled (the first pick is then random).
        generator: randomness for the first pick and for breaking ties between equally
            distant points.
        screen: use the float16 screen (CPU only, where float16 products accumulate in
            float32); ``None``: when ``x_ND`` is float64 or the copy takes at most 256 MiB.
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
    return _pruned_k_center(
        dists,
        budget,
        labeled_LD,
        generator,
        screen,
        max_block,
        stats if stats is not None else KCenterStats(),
    )


def _unit_roundoff(x_ND: Tensor) -> float:
    """Unit roundoff of the arithmetic the distances are computed in (TF32 etc. included)."""
    u = torch.finfo(x_ND.dtype).eps / 2
    if x_ND.dtype == torch.float32:
        precision = torch.get_float32_matmul_precision()
        if precision == "high":
            u = max(u, 2.0**-11)  # TF32: 10 explicit mantissa bits
        elif precision == "medium":
            u = max(u, 2.0**-8)  # bfloat16
    return u


def _gamma(terms: int, u: float) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: relative error bound of an ``n``-term sum."""
    return terms * u / (1.0 - terms * u) if terms * u < 0.5 else math.inf


_U16, _U32, _U64 = 2.0**-11, 2.0**-24, 2.0**-53
_FP16_NORM = 128.0  # rows are scaled so their norms stay below this: dots < 2**14, no overflow
_FP16_TINY = 2.0**-25  # half the float16 subnormal spacing: absolute rounding error floor


def _fp16_dot_error(terms: int, norms_product: Tensor | float) -> Tensor | float:
    """Bound on ``|fp16 mv result - exact dot|`` for float16 inputs, float32 accumulation."""
    return (_gamma(terms, _U32) * (1 + _U16) + _U16) * norms_product + _FP16_TINY


_FP16_TRUSTED: dict[str, bool] = {}


def _fp16_mv_trusted() -> bool:
    """Whether CPU float16 matrix-vector products meet :func:`_fp16_dot_error` (once a process).

    They do when they accumulate in float32, which PyTorch's CPU kernels do unless
    reduced-precision float16 reductions are allowed; a random probe checks the bound.
    """
    if "cpu" not in _FP16_TRUSTED:
        allow = getattr(torch._C, "_get_cpu_allow_fp16_reduced_precision_reduction", None)
        ok = allow is not None and not allow()
        if ok:
            g = torch.Generator().manual_seed(0)
            a_MD = (torch.randn(64, 512, generator=g) * 5).half()
            v_D = (torch.randn(512, generator=g) * 5).half()
            exact_M = a_MD.double() @ v_D.double()
            err_M = (torch.mv(a_MD, v_D).double() - exact_M).abs()
            norms_M = a_MD.double().norm(dim=1) * v_D.double().norm()
            ok = bool((err_M <= _fp16_dot_error(512, norms_M)).all())
        _FP16_TRUSTED["cpu"] = ok
    return _FP16_TRUSTED["cpu"]


class _Fp16:
    """Rows scaled by ``2**e`` (norms ``<= 128``) in float16: cheap lower bounds on distances.

    For float16 rows ``h = fl(s x)``, ``||h - s x|| <= eps``; their squared distance is
    computed as ``||h_a||^2 + ||h_b||^2 - 2 h_a.h_b`` (norms in float64, the dot by a
    float16 matrix-vector product accumulating in float32) within ``err``. So
    ``s ||x_a - x_b|| >= sqrt(S - err) - 2 eps``, a lower bound on the true distance.
    """

    def __init__(self, scale: float, dim: int) -> None:
        self.scale = scale
        r = _FP16_NORM * (1 + 2.0**-9)  # rounded rows may exceed the scaled norm a little
        r2 = r * r
        self.eps = (_U16 + 2 * _U32) * r + math.sqrt(dim) * _FP16_TINY
        dot_err = float(_fp16_dot_error(dim, r2))
        self.err = 2.0 * dot_err + (2 * _gamma(dim, _U64) + 12 * _U64) * 4 * r2

    def encode(self, x_MD: Tensor) -> tuple[Tensor, Tensor]:
        """Float16 rows and their float64 squared norms."""
        h_MD = (x_MD * self.scale).to(torch.float16)
        h64_MD = h_MD.double()
        return h_MD, (h64_MD * h64_MD).sum(1)

    def encode_all(self, x_ND: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
        """:meth:`encode` for every row, chunk by chunk through reused buffers."""
        h_ND = torch.empty(x_ND.shape, dtype=torch.float16, device=x_ND.device)
        sq_N = torch.empty(x_ND.shape[0], dtype=torch.float64, device=x_ND.device)
        tmp_RD = x_ND.new_empty(min(chunk, x_ND.shape[0]), x_ND.shape[1])
        tmp64_RD = torch.empty(tmp_RD.shape, dtype=torch.float64, device=x_ND.device)
        for r0 in range(0, x_ND.shape[0], chunk):
            rows = x_ND[r0 : r0 + chunk]
            t_RD, t64_RD, h_RD = (
                tmp_RD[: rows.shape[0]],
                tmp64_RD[: rows.shape[0]],
                h_ND[r0 : r0 + chunk],
            )
            torch.mul(rows, self.scale, out=t_RD)
            h_RD.copy_(t_RD)
            t64_RD.copy_(h_RD)
            torch.mul(t64_RD, t64_RD, out=t64_RD)
            torch.sum(t64_RD, 1, out=sq_N[r0 : r0 + chunk])
        return h_ND, sq_N

    def lower_bound(self, sq_M: Tensor, sq_v: Tensor, dots_M: Tensor) -> Tensor:
        """``[M]`` float64 lower bounds on the true (unscaled) squared distances."""
        s_M = (sq_M + sq_v).sub_(dots_M.double(), alpha=2.0).sub_(self.err)
        lb_M = s_M.clamp_min_(0.0).sqrt_().sub_(2.0 * self.eps).clamp_min_(0.0)
        return lb_M.square_().mul_((1.0 - 2.0**-40) / (self.scale * self.scale))


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


_SCREEN_MIN_ROWS = 256  # smaller candidate sets go straight to full precision


def _pruned_k_center(
    dists: SqDistsTo,
    budget: int,
    labeled_LD: Tensor | None,
    generator: torch.Generator | None,
    screen: bool | None,
    max_block: int,
    stats: KCenterStats,
) -> Tensor:
    """The pruned greedy k-center behind :func:`k_center_greedy_features`.

    State, all ``O(N + K)`` for ``K = L + budget`` centers: ``d_N`` and ``assign_N`` (each
    candidate's squared distance to, and index of, its nearest center; ``d = -inf`` once
    picked), ``members`` (per center, its unpicked candidates' ids) and ``radius_K`` (the
    largest ``d`` among a center's members). A pick only ever moves candidates to the new
    center: the scanned groups' lists shrink and the new center's list is the moved ones.
    """
    x_ND, sq_N = dists.x_ND, dists.sq_norm_N
    n, dim = int(x_ND.shape[0]), int(x_ND.shape[1])
    dev, dtype = x_ND.device, x_ND.dtype
    num_labeled = 0 if labeled_LD is None else int(labeled_LD.shape[0])
    cap_k = num_labeled + budget
    stats.num_points = n

    cent_KD = x_ND.new_empty(cap_k, dim)  # labeled centers, then picks
    cent_sq_K = x_ND.new_empty(cap_k)
    radius_K = x_ND.new_full((cap_k,), -math.inf)
    members: list[Tensor] = []  # each center's unpicked candidates (ids)
    picks: list[int] = []
    k = 0  # initial centers

    if labeled_LD is None:
        first = int(torch.randint(n, (1,), generator=generator))
        d_N = dists(first)
        assign_N = torch.zeros(n, dtype=torch.long, device=dev)
        cent_KD[0] = x_ND[first]
        cent_sq_K[0] = sq_N[first]
        k = 1
        picks.append(first)
    else:
        d_N, arg_N = _nearest(x_ND, labeled_LD, max_block, with_index=True)
        assert arg_N is not None
        assign_N = arg_N
        cent_KD[:num_labeled] = labeled_LD
        cent_sq_K[:num_labeled] = (labeled_LD * labeled_LD).sum(1)
        k = num_labeled
    # ties (duplicate embeddings) go to a random priority, as in the plain loop
    priority_N = torch.rand(n, generator=generator).to(dev)
    if picks:
        d_N[picks[0]] = -math.inf

    # a bound on any computed squared distance's rounding error, doubled for safety
    max_sq = float(torch.maximum(sq_N.max(), cent_sq_K[:k].max()))
    u = _unit_roundoff(x_ND)
    delta = 2.0 * _gamma(dists._dots.width + 2, u) * 4.0 * max_sq if max_sq > 0 else 0.0

    # float16 lower bounds: center distances always, candidate rows with the screen
    fp16: _Fp16 | None = None
    if dev.type == "cpu" and max_sq > 0 and _fp16_mv_trusted():
        scale = 2.0 ** math.floor(math.log2(_FP16_NORM / math.sqrt(max_sq)))
        if 2.0**-100 < scale < 2.0**100:
            fp16 = _Fp16(scale, dim)
    if screen is None:
        screen = dtype == torch.float64 or n * dim * 2 <= 2**28
    h_ND: Tensor | None = None
    hsq_N: Tensor | None = None
    cent_h_KD: Tensor | None = None
    cent_hsq_K: Tensor | None = None
    if fp16 is not None:
        if screen:
            h_ND, hsq_N = fp16.encode_all(x_ND, dists._dots.chunk)
            stats.screen = True
        cent_h_KD = torch.empty(cap_k, dim, dtype=torch.float16, device=dev)
        cent_hsq_K = torch.empty(cap_k, dtype=torch.float64, device=dev)
        if num_labeled:
            assert labeled_LD is not None
            cent_h_KD[:num_labeled], cent_hsq_K[:num_labeled] = fp16.encode(labeled_LD)
        else:
            cent_h_KD[:1], cent_hsq_K[:1] = fp16.encode(x_ND[first : first + 1])

    screen_yield = [1.0]  # running fraction of screened candidates the screen settled

    def build() -> None:
        live = (d_N > -math.inf).nonzero().flatten()
        keys, order = torch.sort(assign_N.index_select(0, live), stable=True)
        counts = torch.bincount(keys, minlength=k)
        members.extend(live.index_select(0, order).split(counts.tolist()))
        radius_K.scatter_reduce_(0, keys, d_N.index_select(0, live).index_select(0, order), "amax")

    def select() -> int:
        radius_G = radius_K[: len(members)]
        best = radius_G.max()
        top = (radius_G == best).nonzero().flatten().tolist()
        pts = members[top[0]] if len(top) == 1 else torch.cat([members[g] for g in top])
        cand = pts.masked_select(d_N.index_select(0, pts) == best)
        if cand.shape[0] == 1:
            return int(cand[0])
        pr = priority_N.index_select(0, cand)
        return int(cand.masked_select(pr == pr.max()).min())  # the plain loop's argmax

    def screened(j: int, cand: Tensor, d_M: Tensor, h_j: Tensor, hsq_j: Tensor) -> Tensor:
        """Which of ``cand`` the float16 screen cannot settle (may come closer to ``j``)."""
        assert fp16 is not None and h_ND is not None and hsq_N is not None
        m = int(cand.shape[0])
        if 4 * m >= n:
            dots_M = torch.mv(h_ND, h_j).index_select(0, cand)
            stats.rows_screened += n
        else:
            dots_M = torch.cat(
                [
                    torch.mv(h_ND.index_select(0, cand[r0 : r0 + 8192]), h_j)
                    for r0 in range(0, m, 8192)
                ]
            )
            stats.rows_screened += m
        lb_M = fp16.lower_bound(hsq_N.index_select(0, cand), hsq_j, dots_M)
        return lb_M.sub_(delta) < d_M  # settled where lb - delta >= d: computed dist >= d

    def update(j: int) -> None:
        new = len(members)
        x_j = x_ND[j]
        cent_KD[new] = x_j
        cent_sq_K[new] = sq_N[j]
        h_j = hsq_j = x_j  # placeholders when there is no float16 copy
        if fp16 is not None:
            assert cent_h_KD is not None and cent_hsq_K is not None
            if h_ND is not None and hsq_N is not None:
                h_j, hsq_j = h_ND[j], hsq_N[j]
            else:
                h_1D, hsq_1 = fp16.encode(x_ND[j : j + 1])
                h_j, hsq_j = h_1D[0], hsq_1[0]
            cent_h_KD[new] = h_j
            cent_hsq_K[new] = hsq_j
            t_K = fp16.lower_bound(cent_hsq_K[:new], hsq_j, torch.mv(cent_h_KD[:new], h_j))
        else:
            cc_K = torch.addmv(cent_sq_K[:new], cent_KD[:new], x_j, alpha=-2.0)
            t_K = cc_K.add_(sq_N[j]).double().sub_(delta)
        thr_K = _prune_thresholds(t_K, delta, dtype)
        keep_K = radius_K[:new] > thr_K
        keep_K[int(assign_N[j])] = True  # j leaves its group: that group's maximum changes
        groups = keep_K.nonzero().flatten()
        glist = groups.tolist()
        single = len(glist) == 1
        if single:
            pts = members[glist[0]]
            a_P = None
            thr_P = thr_K[glist[0]]
        else:
            pts = torch.cat([members[g] for g in glist])
            a_P = assign_N.index_select(0, pts)
            thr_P = thr_K.index_select(0, a_P)
        d_P = d_N.index_select(0, pts)
        at_M = (d_P > thr_P).nonzero().flatten()  # j itself is at -inf
        cand, d_M = pts.index_select(0, at_M), d_P.index_select(0, at_M)
        stats.updates += 1
        stats.groups_scanned += len(glist)
        stats.entries_scanned += int(pts.shape[0])
        m = int(cand.shape[0])
        if (
            h_ND is not None
            and m >= max(_SCREEN_MIN_ROWS, n // 16)
            and (screen_yield[0] >= 0.5 or stats.updates % 32 == 0)
        ):
            at_O = screened(j, cand, d_M, h_j, hsq_j).nonzero().flatten()
            cand, d_M = cand.index_select(0, at_O), d_M.index_select(0, at_O)
            # the screen pays where it settles most candidates (far ones), not within a blob
            screen_yield[0] = 0.75 * screen_yield[0] + 0.25 * (1.0 - cand.shape[0] / m)
        moved = cand[:0]
        moved_d = d_M[:0]
        if cand.shape[0]:
            m = int(cand.shape[0])
            if 4 * m >= n and dists._dots.direct:
                dist_M = dists(j).index_select(0, cand)  # most rows: one pass beats a gather
                stats.rows_read += n
            else:
                dist_M = dists.rows(cand, j)
                stats.rows_read += m
            at_C = (dist_M < d_M).nonzero().flatten()
            moved, moved_d = cand.index_select(0, at_C), dist_M.index_select(0, at_C)
            d_N.index_copy_(0, moved, moved_d)
            assign_N.index_fill_(0, moved, new)
        # the scanned groups lose j and the moved: new member lists and maxima
        stay_P = assign_N.index_select(0, pts) != new
        stay_P &= pts != j
        at_S = stay_P.nonzero().flatten()
        kept = pts.index_select(0, at_S)
        if single:
            members[glist[0]] = kept
            radius_K[glist[0]] = d_N.index_select(0, kept).max() if kept.shape[0] else -math.inf
        else:
            assert a_P is not None
            a_S = a_P.index_select(0, at_S)
            counts = torch.bincount(a_S, minlength=new).index_select(0, groups)
            for g, part in zip(glist, kept.split(counts.tolist()), strict=True):
                members[g] = part.clone()  # a view would keep all of ``kept`` alive
            radius_K.index_fill_(0, groups, -math.inf)
            radius_K.scatter_reduce_(0, a_S, d_N.index_select(0, kept), "amax")
        members.append(moved)
        if moved.shape[0]:
            radius_K[new] = moved_d.max()

    build()
    while len(picks) < budget:
        j = select()
        picks.append(j)
        d_N[j] = -math.inf
        if len(picks) < budget:
            update(j)
    return torch.tensor(picks, dtype=torch.long)


__all__ = ["KCenterStats", "k_center_greedy", "k_center_greedy_features"]
