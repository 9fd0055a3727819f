"""How :class:`~taskal.adapters.mmseg_segmentation.MMSegAdapter` runs an mmseg segmentor.

mmseg's ``EncoderDecoder.inference`` runs the backbone and decode head on the whole padded
batch (``mode='whole'``) or on overlapping crops (``mode='slide'``), upsamples each output
to its window with the head's ``predict_by_feat`` and averages overlapping windows. The
adapter takes the same steps with mmseg's components (``extract_feat``,
``decode_head.forward``, ``predict_by_feat``), but keeps every window's input of the
decode head's ``cls_seg`` (its dropout and ``conv_seg``), so that an MC sample re-runs only
``cls_seg`` on the cached windows and rebuilds the map through the same
:func:`assemble` as the deterministic pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.nn.modules.utils import _pair

from taskal.adapters._hooks import capture_outputs
from taskal.types import as_levels

#: the parts of a decode head that ``cls_seg`` runs.
_CLS_PARTS = ("dropout", "conv_seg")
_CONV = "<conv_seg>"
#: a window of the padded batch: ``(y1, y2, x1, x2)``.
Window = tuple[int, int, int, int]


def windows(test_cfg: Any, height: int, width: int) -> list[Window]:
    """The windows mmseg's ``inference`` runs the decode head on, for a padded batch.

    ``mode='whole'`` (or no ``test_cfg``): the whole batch. ``mode='slide'``: crops of
    ``crop_size`` every ``stride`` pixels, the last row and column moved back inside the
    image, as ``EncoderDecoder.slide_inference`` places them.

    Raises:
        ValueError: for a test mode other than ``'whole'`` and ``'slide'``.
    """
    mode = (test_cfg or {}).get("mode", "whole")
    if mode == "whole":
        return [(0, height, 0, width)]
    if mode != "slide":
        raise ValueError(f"mmseg test_cfg mode must be 'whole' or 'slide', got {mode!r}")
    h_stride, w_stride = _pair(test_cfg["stride"])
    h_crop, w_crop = _pair(test_cfg["crop_size"])
    rows = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    cols = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * h_stride + h_crop, height), min(c * w_stride + w_crop, width)
            out.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return out


def assemble(
    head: Any, window_logits: Sequence[Tensor], wins: Sequence[Window], shape: Sequence[int]
) -> Tensor:
    """Seg logits ``[B, C, H, W]`` of a padded batch of ``shape`` ``(H, W)`` from the decode
    head's outputs on ``wins`` (each ``[B, C, h, w]`` at the head's stride).

    Each window's logits are resized to the window by ``head.predict_by_feat`` (bilinear,
    the head's ``align_corners``), summed into the map and divided by how many windows
    cover each pixel, as ``slide_inference`` does; one whole window is ``whole_inference``.
    """
    first = window_logits[0]
    whole = len(wins) == 1 and tuple(first.shape[-2:]) == (int(shape[0]), int(shape[1]))
    if whole and type(head).predict_by_feat is BaseDecodeHead.predict_by_feat:
        # one window at full resolution (a stride-1 decoder such as UNet's): the resize to
        # the same size and the division by a count of one leave every value as it is
        return first
    preds = first.new_zeros(first.shape[0], first.shape[1], int(shape[0]), int(shape[1]))
    count = first.new_zeros(1, 1, int(shape[0]), int(shape[1]))
    for logits, (y1, y2, x1, x2) in zip(window_logits, wins, strict=True):
        meta = dict(img_shape=(y2 - y1, x2 - x1), pad_shape=(y2 - y1, x2 - x1))
        preds[:, :, y1:y2, x1:x2] += head.predict_by_feat(logits, [meta])
        count[:, :, y1:y2, x1:x2] += 1
    return preds / count


@contextlib.contextmanager
def capture_cls_input(head: Any) -> Iterator[list[Tensor]]:
    """Record the input of ``head.conv_seg`` at every call during the block: in eval mode,
    the input of ``cls_seg`` (dropout is the identity). The pre-hook runs before any
    injected dropout and is always removed."""
    store: list[Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        store.append(args[0])

    handle = head.conv_seg.register_forward_pre_hook(hook, prepend=True)
    try:
        yield store
    finally:
        handle.remove()


def run_windows(
    seg: Any, inputs: Tensor, wins: Sequence[Window]
) -> tuple[list[Tensor], list[Tensor]]:
    """The decode head's logits on every window of ``inputs`` ``[B, 3, H, W]`` and the input
    of its ``cls_seg`` there (one backbone pass per window; the auxiliary head is unused).
    :func:`decoder_module` checked at construction that ``forward`` ends with ``cls_seg``.
    """
    head = seg.decode_head
    logits, cached = [], []
    for y1, y2, x1, x2 in wins:
        with capture_cls_input(head) as store:
            logits.append(head.forward(seg.extract_feat(inputs[:, :, y1:y2, x1:x2])))
        cached.append(store[-1])
    return logits, cached


def decoder_module(head: nn.Module, feats: Any) -> tuple[str | None, Tensor]:
    """Run ``head.forward(feats)`` once and find the submodule whose output is the input of
    ``cls_seg``: the outermost one (not the dropout or ``conv_seg``), or ``None`` when the
    head computes that input outside a module. Returns it and the input itself.

    Raises:
        TypeError: when ``forward`` does not return the output of its one ``conv_seg`` call
            (a head that does more after ``cls_seg`` cannot be re-sampled by re-running it).
    """
    spec = {n: n for n, _ in head.named_modules() if n and n.split(".")[0] not in _CLS_PARTS}
    spec[_CONV] = "conv_seg"
    capture = capture_outputs(head, spec, skip_non_tensors=True)
    with capture as outs, capture_cls_input(head) as store:
        out = head.forward(feats)
    conv_out = as_levels(outs[_CONV]) if _CONV in outs else ()
    if len(store) != 1 or len(conv_out) != 1 or out is not conv_out[0]:
        raise TypeError(
            f"{type(head).__name__}.forward must end with one call of cls_seg (dropout, "
            f"conv_seg) and return its logits; it called conv_seg {len(store)} times and "
            f"returned a {type(out).__name__}"
        )
    found = [n for n in outs if n != _CONV and any(t is store[0] for t in as_levels(outs[n]))]
    found.sort(key=lambda n: n.count("."))  # outermost first (hooks fire inner first)
    return (found[0] if found else None), store[0]


def folded_cls_seg(head: Any) -> tuple[float, Tensor, Tensor | None] | None:
    """``(p, weight [C_out, C_in], bias)`` when ``head.cls_seg`` is mmseg's own on an
    ``nn.Dropout2d(p)`` and a plain 1x1 ``conv_seg`` with no hooks anywhere (what
    :func:`sampled_cls_seg` can stand in for), else ``None``."""
    drop: Any = getattr(head, "dropout", None)
    conv: Any = getattr(head, "conv_seg", None)
    plain_conv = (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )
    if (
        type(head).cls_seg is not BaseDecodeHead.cls_seg
        or type(drop) is not nn.Dropout2d
        or not 0.0 < drop.p < 1.0
        or not plain_conv
        or any(m._forward_hooks or m._forward_pre_hooks for m in (drop, conv))
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
    ):
        return None
    return float(drop.p), conv.weight.flatten(1), conv.bias


def sampled_cls_seg(x: Tensor, p: float, weight: Tensor, bias: Tensor | None, n: int) -> Tensor:
    """``[n, B, C_out, h, w]``: ``n`` samples of ``Dropout2d(p)`` then a 1x1 convolution
    (``weight`` ``[C_out, C_in]``, ``bias``) on ``x`` ``[B, C_in, h, w]``.

    ``Dropout2d`` zeroes whole channels of each image and scales the rest by ``1 / (1 - p)``,
    and a 1x1 convolution is linear in its channels, so each sample's mask folds into the
    weights: ``conv(x * m / (1 - p)) = (W * m / (1 - p)) x``. All ``n`` samples are then one
    batched product that reads ``x`` once, instead of ``n`` dropouts and convolutions. The
    masks (``u >= p`` for uniform ``u`` from torch's global generator, one per image and
    channel and sample) have ``Dropout2d``'s distribution; they are not the masks
    ``Dropout2d`` itself would draw under the same seed.
    """
    b, c_in, h, w = (int(v) for v in x.shape)
    c_out = int(weight.shape[0])
    keep = torch.rand(n, b, c_in, dtype=x.dtype, device=x.device).ge_(p).mul_(1.0 / (1.0 - p))
    masked = keep[:, :, None, :] * weight.to(x.dtype)[None, None]  # [n, B, C_out, C_in]
    weights = masked.transpose(0, 1).reshape(b, n * c_out, c_in)
    out = torch.bmm(weights, x.reshape(b, c_in, h * w))  # [B, n * C_out, h * w]
    if bias is not None:
        out += bias.to(x.dtype).repeat(n)[None, :, None]
    return out.view(b, n, c_out, h, w).transpose(0, 1)
