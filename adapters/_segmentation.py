"""What the segmentation adapters share: pixel units, their regions, and padded batches.

A unit is a pixel of an image at its own size: ``unit_U = row * W + col`` for an image of
width ``W``. Its region is a square patch or a SLIC superpixel of the image
(:class:`PixelRegions`), so region queries ask for a patch or a superpixel; its cost is one
labeled pixel (``cost="pixels"``) or ``1 / region size`` (``cost="clicks"``: a region costs
one click, the annotator gives it one class).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from taskal.types import Predictions, Units

REGION_KINDS = ("patch", "superpixel")
COST_KINDS = ("pixels", "clicks")


@dataclass(frozen=True)
class PixelRegions:
    """How the pixels of an image group into the regions that region queries ask for.

    Attributes:
        kind: ``"patch"`` (squares of ``patch`` pixels, the last row and column cut by the
            image's border) or ``"superpixel"`` (SLIC from scikit-image on the image itself,
            so the same image always gets the same regions).
        patch: side of a square patch in pixels.
        n_segments: about how many superpixels SLIC makes per image.
        compactness: SLIC's balance of colour against space (higher: squarer regions).
        cost: ``"pixels"`` (a region costs its pixel count: budgets in labeled pixels) or
            ``"clicks"`` (a region costs 1: the annotator gives it one class).
    """

    kind: str = "patch"
    patch: int = 16
    n_segments: int = 64
    compactness: float = 10.0
    cost: str = "pixels"

    def __post_init__(self) -> None:
        if self.kind not in REGION_KINDS:
            raise ValueError(f"regions kind must be one of {REGION_KINDS}, got {self.kind!r}")
        if self.cost not in COST_KINDS:
            raise ValueError(f"regions cost must be one of {COST_KINDS}, got {self.cost!r}")
        if self.patch < 1 or self.n_segments < 1 or not self.compactness > 0:
            raise ValueError(
                "regions need patch >= 1, n_segments >= 1 and compactness > 0, got "
                f"patch={self.patch}, n_segments={self.n_segments}, "
                f"compactness={self.compactness}"
            )

    @classmethod
    def of(cls, spec: PixelRegions | Mapping[str, Any] | None) -> PixelRegions:
        """A ``PixelRegions`` from itself, a dict of its fields, or ``None`` (defaults)."""
        if spec is None:
            return cls()
        if isinstance(spec, PixelRegions):
            return spec
        unknown = sorted(set(spec) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"regions does not take {unknown}; it accepts {list(cls.__dataclass_fields__)}"
            )
        return cls(**dict(spec))

    def region_map(self, image: Tensor) -> Tensor:
        """``[H, W]`` long region ids ``0..R-1`` of a ``[C, H, W]`` image (``[0, 1]``)."""
        h, w = int(image.shape[-2]), int(image.shape[-1])
        if self.kind == "patch":
            rows = torch.arange(h) // self.patch
            cols = torch.arange(w) // self.patch
            return rows[:, None] * (-(-w // self.patch)) + cols[None, :]
        from skimage.segmentation import slic

        pixels = image.detach().float().cpu().permute(1, 2, 0).numpy().astype(np.float64)
        labels = slic(
            pixels,
            n_segments=self.n_segments,
            compactness=self.compactness,
            start_label=0,
            channel_axis=-1,
            enforce_connectivity=True,
        )
        _, dense = np.unique(labels, return_inverse=True)  # consecutive ids 0..R-1
        return torch.from_numpy(dense.reshape(h, w).astype(np.int64))


def check_pixel_units(units: Units, sizes: Sequence[tuple[int, int]]) -> Units:
    """``units`` on the CPU after checking they name pixels of images of ``sizes``."""
    owner, unit = units.owner_U.long().cpu(), units.unit_U.long().cpu()
    counts = torch.tensor([h * w for h, w in sizes])
    if len(owner) and (
        int(owner.min()) < 0
        or int(owner.max()) >= len(sizes)
        or bool((unit < 0).any())
        or bool((unit >= counts[owner]).any())
    ):
        raise ValueError(
            "units name pixels that this batch does not have; pass the units of a prediction "
            "on this batch"
        )
    return Units(owner, unit)


def pad_images(images: Sequence[Tensor], divisor: int = 1) -> tuple[Tensor, list[tuple[int, int]]]:
    """Images padded bottom-right with zeros into one ``[B, C, H, W]`` tensor (sides a
    multiple of ``divisor``), and every image's own ``(h, w)``.

    Raises:
        ValueError: an image that is not a ``[C, H, W]`` float tensor, or channels that differ.
    """
    if not len(images):
        raise ValueError("an empty batch has no images to pad")
    for x in images:
        if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"segmentation adapters take [C, H, W] float images, got {shape}")
    if len({int(x.shape[0]) for x in images}) > 1:
        raise ValueError("the images of a batch must have the same number of channels")
    sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in images]
    hp = -(-max(h for h, _ in sizes) // divisor) * divisor
    wp = -(-max(w for _, w in sizes) // divisor) * divisor
    out = images[0].new_zeros(len(images), images[0].shape[0], hp, wp)
    for i, x in enumerate(images):
        out[i, :, : x.shape[-2], : x.shape[-1]] = x
    return out, sizes


#: the widest per-pixel logit range (max - min over classes) at which
#: :func:`upsampled_softmax` shifts by the low-resolution maximum (see there).
SHIFT_RANGE = 50.0


def upsampled_softmax(
    logits_BChw: Tensor, size: Sequence[int], out: Tensor | None = None
) -> Tensor:
    """Softmax over classes of ``logits_BChw`` upsampled bilinearly (``align_corners=False``)
    to ``size``: ``[B, C, H, W]``, channels-last (each pixel's classes adjacent, as the
    per-pixel ``[U, C]`` output holds them), written into ``out`` (``[B, H, W, C]``) when
    given.

    Softmax is unchanged by a per-pixel shift, and bilinear weights are convex (PyTorch
    clamps source positions at the border), so the logits are shifted by each
    low-resolution pixel's maximum before upsampling (a subtraction at low resolution
    instead of ``torch.softmax``'s per-pixel maximum, which is slow over a few classes):
    every upsampled logit is then ``<= 0``, so ``exp`` cannot overflow, and a pixel's
    largest is at least minus the widest class range (max - min) among its low-resolution
    neighbours. While that range is at most :data:`SHIFT_RANGE` everywhere, the result is
    ``torch.softmax`` of the upsampled logits up to float rounding, save that probabilities
    under about ``1e-16`` (``exp(SHIFT_RANGE - 87)``) may lose precision or come out 0;
    wider ranges take ``torch.softmax``. The range test reads one scalar back (a host sync
    per call on a GPU).
    """
    b, c = int(logits_BChw.shape[0]), int(logits_BChw.shape[1])
    h, w = int(size[0]), int(size[1])
    logits = logits_BChw.float()
    if out is None:
        out = logits.new_empty(b, h, w, c)
    top = logits.amax(1, keepdim=True)
    shift = bool((top - logits.amin(1, keepdim=True)).amax() <= SHIFT_RANGE)
    if shift:
        logits = logits - top
    logits = logits.contiguous(memory_format=torch.channels_last)
    torch.ops.aten.upsample_bilinear2d.out(logits, [h, w], False, out=out.permute(0, 3, 1, 2))
    if shift:
        flat = out.view(-1, c).exp_()
        # the per-pixel sums as a matrix-vector product: faster than sum(1) over a few classes
        flat.div_(torch.mv(flat, flat.new_ones(c)).unsqueeze(1))
    else:
        torch.softmax(out, -1, out=out)
    return out.permute(0, 3, 1, 2)


class SpareOutput:
    """Memory of an adapter's last MC output, handed out again once nothing uses it.

    ``T`` samples of per-pixel probabilities fill a large ``[K, U, C]`` buffer (440 MB for
    4 x 256x256 images, 21 classes, ``T = 20``). A fresh one costs the kernel's page faults
    on its first write (about 0.19 s for that size on a 2-core CPU, as much as the samples'
    own compute for a light network), every batch again: glibc maps buffers that large
    afresh and returns them on free. Pool scoring drops a batch's predictions before it
    predicts the next, so the adapter keeps the memory of its last output and reuses it when
    nothing refers to it any more: no tensor (the storage's use count, read through
    ``torch._C._storage_Use_Count``), no storage handle (``untyped_storage()``,
    ``storage()``: its Python reference count) and no other process (shared memory), so
    predictions a caller still holds are never overwritten. Memory more than twice the size
    asked for is not handed out (a small view of it would save or pickle all of it). CPU only
    (a GPU's caching allocator already reuses memory). The adapter keeps that one output's
    memory between calls; :meth:`clear` lets it go. Not thread-safe, as ``predict`` is not.
    """

    def __init__(self) -> None:
        self._storage: torch.UntypedStorage | None = None

    def take(self, shape: Sequence[int], like: Tensor) -> Tensor:
        """A contiguous float tensor of ``shape`` with ``like``'s dtype and device: the kept
        memory when it is large enough and unused, else fresh memory (then kept)."""
        dtype, device = like.dtype, like.device
        if device.type != "cpu" or not hasattr(torch._C, "_storage_Use_Count"):
            return like.new_empty(*shape)
        nbytes = math.prod(shape) * dtype.itemsize
        kept = self._storage
        if (
            kept is not None
            and nbytes <= kept.nbytes() <= 2 * nbytes  # a view of far more would save it all
            and torch._C._storage_Use_Count(kept._cdata) == 1  # no tensor holds it
            and sys.getrefcount(kept) == 3  # nor a storage handle (this, ``kept``, the call)
            and not kept.is_shared()  # nor another process (torch.multiprocessing)
        ):
            strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]  # contiguous
            return torch.empty(0, dtype=dtype, device=device).set_(kept, 0, shape, strides)
        self._storage = None  # let the old memory go before taking new
        fresh = like.new_empty(*shape)
        self._storage = fresh.untyped_storage()
        return fresh

    def clear(self) -> None:
        """Let the kept memory go (it is freed once the caller's predictions are)."""
        self._storage = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_storage": None}  # a copied or pickled adapter starts without kept memory


def pixel_predictions(
    probs_BCHWK: Tensor | Iterable[Tensor],
    sizes: Sequence[tuple[int, int]],
    units: Units | None,
    region_maps: Sequence[Tensor],
    cost: str,
    num_samples: int = 1,
    spare: SpareOutput | None = None,
) -> Predictions:
    """Per-pixel :class:`Predictions` of a padded batch of probability maps.

    Args:
        probs_BCHWK: softmax probabilities of the padded batch, ``K`` samples last; or an
            iterable of ``num_samples`` maps ``[B, C, H, W]`` (MC dropout), each written
            straight into the per-pixel output as it is drawn: no ``[B, C, H, W, K]``
            stack, and one sample's map alive at a time (a map is copied before the next
            is drawn, so the iterable may reuse one buffer; channels-last maps copy
            fastest). The output is then a view of a ``[K, U, C]`` buffer.
        sizes: every image's own ``(h, w)``; pixels of the padding are no units.
        units: the pixels to return (``None``: every pixel of every image, row-major).
        region_maps: every image's ``[h, w]`` region ids (:meth:`PixelRegions.region_map`).
        cost: ``"pixels"`` or ``"clicks"`` (see :class:`PixelRegions`).
        num_samples: ``K`` when the samples come one by one.
        spare: where the ``[K, U, C]`` output of samples given one by one takes its memory
            (see :class:`SpareOutput`; ``None``: fresh memory).
    """
    counts = torch.tensor([h * w for h, w in sizes])
    starts = torch.cumsum(counts, 0) - counts
    rows = None if units is None else starts[units.owner_U.cpu()] + units.unit_U.cpu()
    probs = _unit_probs(probs_BCHWK, sizes, counts, rows, num_samples, spare)
    device = probs.device
    regions = torch.cat([m.flatten() for m in region_maps]).to(device)
    if cost == "clicks":  # each pixel carries 1 / (its region's size): a region costs 1
        per_pixel = [(1.0 / torch.bincount(m.flatten()).double())[m.flatten()] for m in region_maps]
        cost_all = torch.cat(per_pixel).float().to(device)
    else:
        cost_all = torch.ones(len(regions), device=device)
    if units is None or rows is None:
        owner = torch.repeat_interleave(torch.arange(len(sizes)), counts)
        units = Units(owner, torch.cat([torch.arange(int(n)) for n in counts]))
        region_U, cost_U = regions, cost_all
    else:
        rows = rows.to(device)
        region_U, cost_U = regions[rows], cost_all[rows]
    return Predictions(
        probs,
        units.owner_U.to(device),
        "softmax",
        unit_U=units.unit_U.to(device),
        region_U=region_U,
        cost_U=cost_U,
    )


def _unit_probs(
    probs: Tensor | Iterable[Tensor],
    sizes: Sequence[tuple[int, int]],
    counts: Tensor,
    rows: Tensor | None,
    num_samples: int,
    spare: SpareOutput | None = None,
) -> Tensor:
    """``[U, C, K]``: the images' own pixels (row-major, padding dropped), or ``rows`` of
    them, from ``[B, C, H, W, K]`` or from ``K`` maps ``[B, C, H, W]`` given one by one."""
    if isinstance(probs, Tensor):
        flat = torch.cat(
            [probs[i, :, :h, :w].flatten(1, 2).movedim(1, 0) for i, (h, w) in enumerate(sizes)]
        )  # [sum h*w, C, K]
        return flat if rows is None else flat[rows.to(flat.device)]
    ends = torch.cumsum(counts, 0).tolist()
    out: Tensor | None = None  # [K, U, C]: each sample's block is contiguous
    k = -1
    for k, sample in enumerate(probs):
        if k >= num_samples:
            raise ValueError(f"more than num_samples={num_samples} probability maps")
        c = int(sample.shape[1])
        if out is None:
            total = int(counts.sum()) if rows is None else len(rows)
            shape = (num_samples, total, c)
            out = sample.new_empty(shape) if spare is None else spare.take(shape, sample)
        if rows is None:  # image by image, [C, h, w] -> [h, w, C] (channels-last: a memcpy)
            for i, (h, w) in enumerate(sizes):
                dest = out[k, ends[i] - h * w : ends[i]].view(h, w, c)
                dest.copy_(sample[i, :, :h, :w].permute(1, 2, 0))
        else:
            flat = torch.cat([sample[i, :, :h, :w].flatten(1).T for i, (h, w) in enumerate(sizes)])
            torch.index_select(flat, 0, rows.to(flat.device), out=out[k])
    if out is None or k != num_samples - 1:
        raise ValueError(f"{k + 1} probability maps for num_samples={num_samples}")
    return out.permute(1, 2, 0)  # [U, C, K], a view: no copy of the whole output
