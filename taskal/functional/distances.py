"""Squared distances between embeddings without an ``N x N`` matrix: to one point
(:func:`sq_dists_to`) or to the nearest of many (:func:`min_sq_dists`).

Every dot product goes through one fixed computation path (aligned, padded rows on the CPU;
a fixed summation tree elsewhere), so the distance of a row to a point is the same bits
whichever other rows share the call: what lets the pruned k-center in
:mod:`taskal.functional.kcenter` pick exactly what the plain loop picks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor

#: squared distances from every candidate to candidate ``j``
DistTo = Callable[[int], Tensor]

_ROW_BLOCK = 16  # rows per matrix-vector call are padded to a multiple of this
_ALIGN_BYTES = 64  # row starts and row lengths are padded to this many bytes
_CHUNK_BYTES = 2**22  # row chunks for streaming passes (CPU)


def _sq_norms(x_ND: Tensor) -> Tensor:
    """``(x * x).sum(1)``, the same values, without an ``N x D`` temporary."""
    n, d = int(x_ND.shape[0]), int(x_ND.shape[1])
    rows = max(1, _CHUNK_BYTES // max(1, d * x_ND.element_size()))
    if rows >= n or not x_ND.is_floating_point():
        return (x_ND * x_ND).sum(1)
    tmp_RD = x_ND.new_empty(rows, d)
    out_N = x_ND.new_empty(n)
    for r0 in range(0, n, rows):
        chunk_RD = x_ND[r0 : r0 + rows]
        sq_RD = tmp_RD[: chunk_RD.shape[0]]
        torch.mul(chunk_RD, chunk_RD, out=sq_RD)
        torch.sum(sq_RD, 1, out=out_N[r0 : r0 + rows])
    return out_N


class _RowDots:
    """``x_i . v`` for any set of rows, each row computed the same way whatever set it is in.

    Pruned k-center reads different subsets of rows at each pick; to match the unpruned
    loop bit for bit, a row's dot product must not depend on which other rows share the
    call. On CPU, BLAS matrix-vector kernels round a row differently depending on its memory
    alignment and on whether it falls in the kernel's main loop or its remainder (the last
    ``M mod 4`` rows, say), so every row goes through one canonical path: rows ``64``-byte
    aligned and zero-padded to a multiple of ``64`` bytes, calls made on a multiple of
    ``16`` rows (row-invariant in MKL's main loops, as the tests check). On other
    devices (cuBLAS picks kernels by shape) the dot product is an elementwise product
    summed by a fixed pairwise tree of elementwise additions over a power-of-two width,
    row-invariant by construction. Rows are used in place when ``x`` already has the layout
    (e.g. ``D = 512``), else copied chunk by chunk into a padded buffer.
    """

    def __init__(
        self, x_ND: Tensor, chunk_bytes: int | None = None, blas: bool | None = None
    ) -> None:
        self.x_ND = x_ND
        d = int(x_ND.shape[1])
        item = x_ND.element_size()
        self.blas = x_ND.device.type == "cpu" if blas is None else blas
        if self.blas:
            per = max(1, _ALIGN_BYTES // item)
            self.width = -(-d // per) * per
            aligned = x_ND.data_ptr() % _ALIGN_BYTES == 0
        else:
            self.width = 1 << max(0, d - 1).bit_length()  # a power of two >= d
            aligned = True
        self.direct = x_ND.is_contiguous() and self.width == d and aligned
        if chunk_bytes is None:
            chunk_bytes = _CHUNK_BYTES if x_ND.device.type == "cpu" else 2**26
        rows = chunk_bytes // max(1, self.width * item) // _ROW_BLOCK * _ROW_BLOCK
        self.chunk = max(_ROW_BLOCK, rows)
        self._buf: Tensor | None = None

    def _buffer(self) -> Tensor:
        if self._buf is None:  # one call's padding past a full chunk fits too
            self._buf = self.x_ND.new_zeros(self.chunk + _ROW_BLOCK, self.width)
        return self._buf

    def vector(self, j: int) -> Tensor:
        """Row ``j`` as the vector for :meth:`all` and :meth:`rows` (a padded copy if need be)."""
        if self.direct:
            return self.x_ND[j]  # already aligned and padded
        out = self.x_ND.new_zeros(self.width)
        out[: self.x_ND.shape[1]] = self.x_ND[j]
        return out

    def _through_buffer(self, src_MD: Tensor | None, idx_M: Tensor | None, v_W: Tensor) -> Tensor:
        """Copy rows ``src_MD`` (or rows ``idx_M`` of ``x``) into the buffer; dot with ``v``."""
        buf = self._buffer()
        if idx_M is not None:
            m = int(idx_M.shape[0])
            if self.direct:
                torch.index_select(self.x_ND, 0, idx_M, out=buf[:m])
            else:
                buf[:m, : self.x_ND.shape[1]] = self.x_ND.index_select(0, idx_M)
        else:
            assert src_MD is not None
            m = int(src_MD.shape[0])
            buf[:m, : src_MD.shape[1]] = src_MD
        return self._dots(buf[:m], v_W)

    def _dots(self, rows_MW: Tensor, v_W: Tensor) -> Tensor:
        """The canonical kernel on rows laid out as described above."""
        if self.blas:  # rows_MW is the buffer's head: pad the call with its next (stale) rows
            assert rows_MW.data_ptr() == self._buffer().data_ptr()
            return self.block_dots(self._buffer(), int(rows_MW.shape[0]), v_W)
        return self._tree(rows_MW, v_W)

    def _tree(self, rows_MW: Tensor, v_W: Tensor) -> Tensor:
        """Elementwise products summed by a fixed pairwise tree (the non-BLAS kernel)."""
        prod_MW = rows_MW * v_W
        w = self.width
        while w > 1:  # fixed pairwise tree: element i += element i + w / 2
            w //= 2
            prod_MW[:, :w].add_(prod_MW[:, w : 2 * w])
        return prod_MW[:, 0]

    def gather(self, idx_M: Tensor) -> Tensor:
        """Rows ``idx_M`` copied into a new block in the canonical layout, for :meth:`block_dots`.

        The block has ``M`` rows rounded up to whole calls (zero rows pad it)."""
        m = int(idx_M.shape[0])
        rows = -(-m // _ROW_BLOCK) * _ROW_BLOCK if self.blas else m
        block = self.x_ND.new_zeros(rows, self.width)  # a fresh allocation: 64-byte aligned
        if self.width == self.x_ND.shape[1]:
            torch.index_select(self.x_ND, 0, idx_M, out=block[:m])
        else:
            block[:m, : self.x_ND.shape[1]] = self.x_ND.index_select(0, idx_M)
        return block

    def block_dots(self, block: Tensor, m: int, v_W: Tensor) -> Tensor:
        """``[m]`` dot products of the first ``m`` rows of a canonical block with ``v_W``.

        ``block`` is this object's buffer or a :meth:`gather` block, with at least ``m``
        rounded up to a multiple of ``16`` rows (rows past ``m`` only pad the call)."""
        if not self.blas:
            return self._tree(block[:m], v_W)
        padded = -(-m // _ROW_BLOCK) * _ROW_BLOCK
        return torch.mv(block[:padded], v_W)[:m]

    def pair_dots(self, idx_P: Tensor, vecs: list[Tensor], counts: list[int]) -> Tensor:
        """``[P]`` dot products of rows ``idx_P`` with vectors in runs: the first ``counts[0]``
        rows with ``vecs[0]``, the next ``counts[1]`` with ``vecs[1]`` and so on.

        Equal to ``all(vecs[b])`` at those rows: rows are gathered chunk by chunk into the
        buffer and each run is one canonical call on its slice (a run starting anywhere in
        the buffer is still aligned rows, padded to whole calls by the rows after it)."""
        total = int(idx_P.shape[0])
        out = self.x_ND.new_empty(total)
        buf = self._buffer()
        ends = list(itertools.accumulate(counts))
        b = 0
        for r0 in range(0, total, self.chunk):
            r1 = min(total, r0 + self.chunk)
            if self.width == self.x_ND.shape[1]:
                torch.index_select(self.x_ND, 0, idx_P[r0:r1], out=buf[: r1 - r0])
            else:
                buf[: r1 - r0, : self.x_ND.shape[1]] = self.x_ND.index_select(0, idx_P[r0:r1])
            while b < len(counts) and ends[b] - counts[b] < r1:
                lo, hi = max(ends[b] - counts[b], r0), min(ends[b], r1)
                if hi > lo:
                    out[lo:hi] = self.block_dots(buf[lo - r0 :], hi - lo, vecs[b])
                if ends[b] > r1:
                    break  # the run goes on in the next chunk
                b += 1
        return out

    def all(self, v_W: Tensor) -> Tensor:
        """``[N]`` dot products of every row with ``v_W`` (from :meth:`vector`)."""
        x, n = self.x_ND, self.x_ND.shape[0]
        out = x.new_empty(n)
        if self.direct and self.blas:
            main = n - n % _ROW_BLOCK
            if main:
                torch.mv(x[:main], v_W, out=out[:main])
            if main < n:
                out[main:] = self._through_buffer(x[main:], None, v_W)
            return out
        if self.direct:
            for r0 in range(0, n, self.chunk):
                out[r0 : r0 + self.chunk] = self._dots(x[r0 : r0 + self.chunk], v_W)
            return out
        for r0 in range(0, n, self.chunk):
            out[r0 : r0 + self.chunk] = self._through_buffer(x[r0 : r0 + self.chunk], None, v_W)
        return out

    def rows(self, idx_M: Tensor, v_W: Tensor) -> Tensor:
        """``[M]`` dot products of rows ``idx_M`` with ``v_W``, equal to ``all(v_W)[idx_M]``."""
        if idx_M.shape[0] <= self.chunk:
            return self._through_buffer(None, idx_M, v_W)
        out = self.x_ND.new_empty(idx_M.shape[0])
        for r0 in range(0, idx_M.shape[0], self.chunk):
            sel = idx_M[r0 : r0 + self.chunk]
            out[r0 : r0 + self.chunk] = self._through_buffer(None, sel, v_W)
        return out


class SqDistsTo:
    """``j -> ||x_i - x_j||^2`` for all ``i`` (``[N]``, clamped at 0), from :func:`sq_dists_to`.

    Computed as ``||x_i||^2 + ||x_j||^2 - 2 x_i.x_j`` with every dot product taken through
    one canonical kernel (see :class:`_RowDots`), so :meth:`rows` gives bit for bit the
    entries of the full vector. :func:`k_center_greedy` recognises this object and prunes.

    Attributes:
        x_ND: the ``[N, D]`` embeddings.
        sq_norm_N: ``||x_i||^2``.
    """

    def __init__(self, x_ND: Tensor) -> None:
        if x_ND.dim() != 2:
            raise ValueError(f"expected embeddings [N, D], got {tuple(x_ND.shape)}")
        if not x_ND.is_floating_point():
            x_ND = x_ND.to(torch.get_default_dtype())
        self.x_ND = x_ND
        self.sq_norm_N = _sq_norms(x_ND)
        self._dots = _RowDots(x_ND)
        self._finite: bool | None = None

    @property
    def num_points(self) -> int:
        return int(self.x_ND.shape[0])

    @property
    def finite(self) -> bool:
        """Whether every embedding is finite (pruning bounds need it)."""
        if self._finite is None:
            self._finite = bool(torch.isfinite(self.sq_norm_N).all())
        return self._finite

    def __call__(self, j: int) -> Tensor:
        dots_N = self._dots.all(self._dots.vector(j))
        return (self.sq_norm_N + self.sq_norm_N[j]).add_(dots_N, alpha=-2.0).clamp_min_(0.0)

    def rows(self, idx_M: Tensor, j: int) -> Tensor:
        """``self(j)[idx_M]``, reading only rows ``idx_M`` (bit for bit the same values)."""
        dots_M = self._dots.rows(idx_M, self._dots.vector(j))
        sq_M = self.sq_norm_N.index_select(0, idx_M)
        return (sq_M + self.sq_norm_N[j]).add_(dots_M, alpha=-2.0).clamp_min_(0.0)

    def pairs(self, idx_P: Tensor, j_P: Tensor) -> Tensor:
        """``self(j_P[p])[idx_P[p]]`` for every ``p``, reading only rows ``idx_P`` once.

        One canonical call per run of equal ``j_P``: sort the pairs by ``j`` first."""
        js, counts = torch.unique_consecutive(j_P, return_counts=True)
        vecs = [self._dots.vector(j) for j in js.tolist()]
        dots_P = self._dots.pair_dots(idx_P, vecs, counts.tolist())
        sq_P = self.sq_norm_N.index_select(0, idx_P) + self.sq_norm_N.index_select(0, j_P)
        return sq_P.add_(dots_P, alpha=-2.0).clamp_min_(0.0)

    def gather(self, idx_M: Tensor) -> tuple[Tensor, Tensor]:
        """Rows ``idx_M`` in a canonical block and their squared norms, for :meth:`block`."""
        return self._dots.gather(idx_M), self.sq_norm_N.index_select(0, idx_M)

    def block(self, block: Tensor, sq_M: Tensor, j: int) -> Tensor:
        """``self(j)`` at the rows of a :meth:`gather` block (bit for bit the same values)."""
        dots_M = self._dots.block_dots(block, int(sq_M.shape[0]), self._dots.vector(j))
        return (sq_M + self.sq_norm_N[j]).add_(dots_M, alpha=-2.0).clamp_min_(0.0)


def sq_dists_to(x_ND: Tensor) -> SqDistsTo:
    """Return ``j -> ||x_i - x_j||^2`` for all ``i`` (``[N]``, float, clamped at 0)."""
    return SqDistsTo(x_ND)


def _nearest(
    x_ND: Tensor, centers_MD: Tensor, max_block: int, with_index: bool
) -> tuple[Tensor, Tensor | None]:
    """Blocked ``min_m ||x_i - c_m||^2`` and, optionally, the ``argmin`` (see min_sq_dists)."""
    if x_ND.dim() != 2 or centers_MD.dim() != 2 or x_ND.shape[1] != centers_MD.shape[1]:
        raise ValueError(
            f"expected x [N, D] and centers [M, D] with the same D, got {tuple(x_ND.shape)} "
            f"and {tuple(centers_MD.shape)}"
        )
    if isinstance(max_block, bool) or not isinstance(max_block, int) or max_block < 1:
        raise ValueError(f"max_block must be a positive integer, got {max_block!r}")
    n, m = int(x_ND.shape[0]), int(centers_MD.shape[0])
    cols = max(1, min(m, math.isqrt(max_block)))
    rows = max(1, min(n, max_block // cols))
    cols = max(1, min(m, max_block // rows))  # widen when N is small
    sq_norm_N = _sq_norms(x_ND)
    sq_norm_1M = _sq_norms(centers_MD)[None]
    centers_DM = centers_MD.T.contiguous()
    # min_m ||x - c_m||^2 = ||x||^2 + min_m (||c_m||^2 - 2 x.c_m): ||x||^2 joins after the min
    out_N = torch.full((n,), float("inf"), dtype=x_ND.dtype, device=x_ND.device)
    arg_N = torch.zeros(n, dtype=torch.long, device=x_ND.device) if with_index else None
    for r0 in range(0, n, rows):
        best_R = out_N[r0 : r0 + rows]
        for c0 in range(0, m, cols):
            block_RC = torch.addmm(
                sq_norm_1M[:, c0 : c0 + cols],
                x_ND[r0 : r0 + rows],
                centers_DM[:, c0 : c0 + cols],
                alpha=-2.0,
            )
            if arg_N is None:
                torch.minimum(best_R, block_RC.amin(dim=1), out=best_R)
                continue
            vals_R, idx_R = block_RC.min(dim=1)
            better_R = vals_R < best_R  # ties keep the earlier center
            best_R[better_R] = vals_R[better_R]
            arg_N[r0 : r0 + rows][better_R] = idx_R[better_R] + c0
    return out_N.add_(sq_norm_N).clamp_min_(0.0), arg_N


def min_sq_dists(x_ND: Tensor, centers_MD: Tensor, max_block: int = 2**20) -> Tensor:
    """``min_m ||x_i - c_m||^2``: squared distance of every row of ``x_ND`` to its nearest center.

    The core-set initialisation (Sener & Savarese 2018): the distance of every candidate to
    the labeled set. Rows and centers are processed in blocks of at most ``max_block``
    distances (``rows_per_block * centers_per_block <= max_block``), each computed as
    ``||c||^2 - 2 x.c`` and folded into an ``O(N)`` running minimum, to which ``||x||^2`` is
    added at the end (clamped at 0). Extra memory is ``O(N + M + max_block)`` whatever ``N``
    and ``M`` are (``2**20`` float64 distances are 8 MiB per block).

    Args:
        x_ND: ``[N, D]`` candidate embeddings.
        centers_MD: ``[M, D]`` center (labeled) embeddings, same dtype and device.
        max_block: the most distances held in one block, ``>= 1``.

    Returns:
        ``[N]`` squared distances ``>= 0`` in ``x_ND``'s dtype (``inf`` when ``M == 0``);
        higher = farther from every center (core-set picks the highest first).
    """
    return _nearest(x_ND, centers_MD, max_block, with_index=False)[0]


__all__ = ["DistTo", "SqDistsTo", "min_sq_dists", "sq_dists_to"]
