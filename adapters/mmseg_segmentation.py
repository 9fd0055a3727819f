"""The segmentation adapter for mmseg 1.x ``EncoderDecoder`` segmentors.

A unit is a pixel of an image at its own size (``unit_U = row * W + col``), its
probabilities the softmax of the seg logits that mmseg's own ``model.inference`` computes
before its argmax (``test_cfg`` ``mode='whole'`` or ``'slide'``), cropped to the image. For
a batch of same-size images they equal mmseg's exactly; in a batch of mixed sizes a smaller
image is scored padded to the largest (zeros after normalization at its bottom and right,
slide windows placed on the padded batch), where mmseg would score it alone.
Pixels group into square patches or SLIC superpixels
(:class:`~taskal.adapters._segmentation.PixelRegions`) for region queries; a pixel costs 1
(budgets in labeled pixels) or ``1 / region size`` (``cost="clicks"``).

MC dropout re-runs only the decode head's ``cls_seg`` (its ``Dropout2d``, ``dropout_ratio``
0.1 by default, and ``conv_seg``) on the inputs of ``cls_seg`` cached during the
deterministic pass, one per window in slide mode, and rebuilds the map as the deterministic
pass does (:mod:`taskal.adapters._mmseg_inference`): the backbone runs once per window, not
once per sample. A head built with ``dropout_ratio=0`` gets dropout injected on
``conv_seg``'s input at construction (with a warning), so it is trained in. The auxiliary
head is used only by :meth:`MMSegAdapter.per_sample_loss`.

Inputs are lists of ``[3, H, W]`` float RGB images in ``[0, 1]``. The adapter scales them
to ``0..255`` in BGR order, as mmseg's ``LoadImageFromFile`` loads images, and hands each to
the model's own ``data_preprocessor`` (``bgr_to_rgb``, mean/std, its test-time padding);
the normalized images are padded bottom-right with zeros (mmseg's default ``pad_val``) to a common
size, a multiple of the preprocessor's ``size_divisor`` (its ``test_cfg``'s first), which
mmseg's UNet needs (sides divisible by 16). Each image gets ``SegDataSample`` metainfo
(``img_shape`` and ``ori_shape`` its own size, ``pad_shape`` the batch's, ``scale_factor``
1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from mmengine.structures import PixelData
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.models.segmentors import CascadeEncoderDecoder, DepthEstimator, EncoderDecoder
from mmseg.structures import SegDataSample
from torch import Tensor, nn

from taskal.adapters import _mmseg_inference as infer
from taskal.adapters._hooks import (
    CapturedFeatures,
    capture_outputs,
    detach_levels,
    ensure_dropout,
    eval_mode,
    feature_names,
    mc_dropout,
)
from taskal.adapters._segmentation import (
    PixelRegions,
    SpareOutput,
    check_pixel_units,
    pad_images,
    pixel_predictions,
)
from taskal.registry import ADAPTERS, MODELS, build
from taskal.types import Adapter, Batch, FeatureInfo, FeatureMap, Predictions, Units, as_levels

#: side of the zero image that gives the feature maps' strides at construction.
_PROBE_SIZE = 64
#: the most bytes of logits one batched product of MC samples makes (see _draws).
_CHUNK_BYTES = 4 * 2**20
#: taskal's label for an unlabeled pixel.
UNLABELED = 255


@ADAPTERS.register_module(name="mmseg_segmentation")
class MMSegAdapter(Adapter):
    """Wrap an mmseg 1.x ``EncoderDecoder`` (see the module docstring).

    Args:
        model: the segmentor, or a :data:`~taskal.registry.MODELS` config of one such as
            ``dict(type="mmseg.EncoderDecoder", ...)`` (an unscoped mmseg type gets
            ``mmseg.``).
        regions: :class:`PixelRegions` or a dict of its fields (patches of 16 pixels by
            default).
        dropout_p: probability of the dropout injected on ``conv_seg``'s input when the
            decode head has none (``dropout_ratio=0``).
        device: where the model runs.

    Raises:
        TypeError: ``model`` is not an ``EncoderDecoder`` (a ``CascadeEncoderDecoder`` or
            ``DepthEstimator`` neither), or its decode head is no ``BaseDecodeHead`` whose
            ``forward`` ends with ``cls_seg``.
        ValueError: the decode head is binary (``out_channels=1``, sigmoid) or trained with
            a sigmoid loss: its logits are no softmax logits. Or ``dropout_p`` outside
            ``(0, 1)``, or a ``test_cfg`` mode other than ``'whole'`` and ``'slide'``.

    Data samples for :meth:`per_sample_loss` are dicts with ``gt_sem_seg`` ``[H, W]`` long
    class indices (255: unlabeled, ignored) or ``SegDataSample`` with ``gt_sem_seg``.
    Feature layers, maps of one whole-image pass over the padded batch (also in slide
    mode): ``backbone`` (its output levels), ``neck`` if the model has one, ``decoder`` (the
    module that outputs the input of ``cls_seg``). A layer is listed only while the layers
    run shallow to deep (finest strides not decreasing, every layer's levels fine to
    coarse). mmseg's ``UNet`` returns its decoder path coarse to fine (strides 16 to 1), so a
    UNet segmentor exposes its encoder stages instead, ``encoder0`` (stride 1) to
    ``encoder4`` (stride 16): what LLAL reads.
    """

    task = "seg"
    prob_kind = "softmax"

    def __init__(
        self,
        model: nn.Module | Mapping[str, Any],
        regions: PixelRegions | Mapping[str, Any] | None = None,
        dropout_p: float = 0.1,
        device: str | torch.device = "cpu",
    ) -> None:
        if isinstance(model, Mapping):
            model = _build_segmentor(model)
        _check_segmentor(model)
        if not 0.0 < dropout_p < 1.0:
            raise ValueError(f"dropout_p must lie in (0, 1), got {dropout_p}")
        seg: Any = model  # mmseg segmentors are untyped: their parts are attributes
        infer.windows(seg.test_cfg, 1, 1)  # a bad test mode fails here, not at predict
        self.regions = PixelRegions.of(regions)
        self._spare = SpareOutput()  # the memory of the last MC output, reused
        self._device = torch.device(device)
        self._model = model.to(self._device)
        self._seg = seg
        self._head: Any = seg.decode_head
        pre = seg.data_preprocessor
        test_pad = getattr(pre, "test_cfg", None) or {}
        divisor = test_pad.get("size_divisor") or getattr(pre, "size_divisor", None)
        #: padded batches have sides that are multiples of this (the preprocessor's).
        self.size_divisor = int(divisor or 1)
        self._feature_info, self._decoder_stride = self._probe()
        head = self._head
        checked = head.dropout if isinstance(head.dropout, nn.Module) else head.conv_seg
        what = f"{type(head).__name__} (the decode head of {type(model).__name__})"
        ensure_dropout(checked, head.conv_seg, dropout_p, what, "the input of its conv_seg")

    # -- contract -------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def num_classes(self) -> int:
        return int(self._head.num_classes)

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return list(self._feature_info)

    def predict(self, batch: Batch, n_samples: int = 1, units: Units | None = None) -> Predictions:
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        inputs, samples = self.preprocess(batch.inputs)
        sizes = _sizes(samples)
        if units is not None:
            units = check_pixel_units(units, sizes)
        shape = inputs.shape[-2:]
        wins = infer.windows(self._seg.test_cfg, *shape)
        with torch.no_grad():
            with eval_mode(self._model):
                logits, cached = infer.run_windows(self._seg, inputs, wins)
            maps = [self.regions.region_map(img) for img in batch.inputs]
            if n_samples > 1:
                with self.stochastic():
                    draws = self._draws(cached, wins, shape, n_samples)
                    return pixel_predictions(
                        draws, sizes, units, maps, self.regions.cost, n_samples, self._spare
                    )
            probs = self._softmax(logits, wins, shape).unsqueeze(-1)
        return pixel_predictions(probs, sizes, units, maps, self.regions.cost)

    def features(self, batch: Batch, names: Sequence[str] | None = None) -> dict[str, FeatureMap]:
        names = feature_names(self._feature_info, names)
        inputs, _ = self.preprocess(batch.inputs)
        with torch.no_grad(), eval_mode(self._model), self.capture_features(names) as store:
            self._head.forward(self._seg.extract_feat(inputs))
        return {n: detach_levels(store[n]) for n in names}

    def capture_features(
        self, names: Sequence[str] | None = None
    ) -> contextlib.AbstractContextManager[CapturedFeatures]:
        names = feature_names(self._feature_info, names)
        modules = {f.name: f.module for f in self._feature_info}
        return capture_outputs(self._model, {n: modules[n] for n in names})

    def embed(self, batch: Batch) -> Tensor:
        """``[B, D]``: the input of the decode head's ``cls_seg`` (its last feature map, one
        whole-image pass) averaged over each image's own area."""
        inputs, samples = self.preprocess(batch.inputs)
        with torch.no_grad(), eval_mode(self._model), infer.capture_cls_input(self._head) as s:
            self._head.forward(self._seg.extract_feat(inputs))
        fmap, stride = s[0], self._decoder_stride
        return torch.stack(
            [
                fmap[i, :, : -(-h // stride), : -(-w // stride)].mean((1, 2))
                for i, (h, w) in enumerate(_sizes(samples))
            ]
        ).detach()

    def per_sample_loss(self, batch: Batch) -> Tensor:
        """``[B]``: the sum of the model's training losses (``model.loss`` through
        ``parse_losses``: the decode head's and the auxiliary heads'), one image at a time.

        Pixels labeled 255 (and the padding) carry the decode head's ``ignore_index`` and
        add nothing to the numerator; whether they count in the mean's denominator is the
        loss's ``avg_non_ignore`` (mmseg's default ``False``: they do). BatchNorm and
        dropout stay in eval mode, and a sampler (OHEM) draws from the global RNG seeded 0
        inside a forked RNG state, so an image's loss is deterministic.
        """
        targets = self.model_targets(batch)
        losses = []
        devices = [self._device] if self._device.type == "cuda" else []
        with torch.no_grad(), eval_mode(self._model), torch.random.fork_rng(devices=devices):
            for image, target in zip(batch.inputs, targets, strict=True):
                torch.manual_seed(0)
                inputs, samples = self.preprocess([image], [target])
                loss, _ = self._seg.parse_losses(self._seg.loss(inputs, samples))
                losses.append(loss.float())
        return torch.stack(losses)

    def model_targets(self, batch: Batch) -> list[SegDataSample]:
        """A new ``SegDataSample`` per item with ``gt_sem_seg`` ``[1, H, W]`` (255 mapped to
        the decode head's ``ignore_index``) on the device; :meth:`preprocess` adds the
        metainfo and pads the map.

        Raises:
            ValueError: an item without ``gt_sem_seg`` (a batch from selection), or a map
                whose shape is not its image's.
        """
        samples = batch.data_samples or [None] * len(batch)
        out = []
        for img, s in zip(batch.inputs, samples, strict=True):
            mask: Any = None
            if isinstance(s, SegDataSample) and "gt_sem_seg" in s:
                mask = s.gt_sem_seg.data
            elif isinstance(s, Mapping):
                mask = s.get("gt_sem_seg")
            if mask is None:
                raise ValueError(
                    "per_sample_loss needs batch.data_samples with ground truth: one dict per "
                    "image with 'gt_sem_seg' [H, W] class indices, or a SegDataSample with "
                    f"gt_sem_seg; got {type(s).__name__}"
                )
            mask = torch.as_tensor(mask, device=self._device).long()
            if mask.dim() == 3 and mask.shape[0] == 1:
                mask = mask[0]
            if tuple(mask.shape) != tuple(img.shape[-2:]):
                raise ValueError(
                    f"gt_sem_seg of shape {tuple(mask.shape)} does not match its image "
                    f"{tuple(img.shape[-2:])}"
                )
            mask = mask.masked_fill(mask == UNLABELED, int(self._head.ignore_index))
            out.append(SegDataSample(gt_sem_seg=PixelData(data=mask[None])))
        return out

    def stochastic(self) -> contextlib.AbstractContextManager[None]:
        return mc_dropout(self._model)

    # -- shared with training -------------------------------------------------------------
    def preprocess(
        self, images: Sequence[Tensor] | Tensor, samples: list[SegDataSample] | None = None
    ) -> tuple[Tensor, list[SegDataSample]]:
        """The batch ``[B, 3, H, W]`` as the model's ``data_preprocessor`` makes each image,
        padded with zeros to a common size (a multiple of :attr:`size_divisor`), and a
        ``SegDataSample`` per image with its metainfo (``samples``, e.g. with ground truth,
        get it and their ``gt_sem_seg`` padded with ``ignore_index``).

        Raises:
            ValueError: an image that is not a ``[3, H, W]`` float tensor.
        """
        images = _check_rgb(images)
        pre = self._seg.data_preprocessor
        normed = []
        for x in images:
            # mmseg's pipelines load BGR images in 0..255; the preprocessor converts from there
            bgr = x.to(self._device).flip(0) * 255.0
            normed.append(
                pre(dict(inputs=[bgr], data_samples=[SegDataSample()]), False)["inputs"][0]
            )
        inputs, _ = pad_images(normed, self.size_divisor)
        hp, wp = int(inputs.shape[-2]), int(inputs.shape[-1])
        samples = samples if samples is not None else [SegDataSample() for _ in images]
        for x, sample in zip(images, samples, strict=True):
            h, w = int(x.shape[-2]), int(x.shape[-1])
            pad = [0, wp - w, 0, hp - h]
            sample.set_metainfo(
                dict(
                    img_shape=(h, w),
                    ori_shape=(h, w),
                    pad_shape=(hp, wp),
                    padding_size=pad,
                    scale_factor=(1.0, 1.0),
                )
            )
            if "gt_sem_seg" in sample:
                gt = sample.gt_sem_seg.data
                fill = int(self._head.ignore_index)
                sample.gt_sem_seg = PixelData(data=F.pad(gt, pad, value=fill))
        return inputs, samples

    # -- helpers --------------------------------------------------------------------------
    def _softmax(self, logits: list[Tensor], wins: list[infer.Window], shape: Any) -> Tensor:
        """Softmax maps ``[B, C, H, W]`` of the padded batch from per-window head logits."""
        return infer.assemble(self._head, logits, wins, shape).float().softmax(1)

    def _draws(
        self, cached: list[Tensor], wins: list[infer.Window], shape: Any, n_samples: int
    ) -> Iterator[Tensor]:
        """``n_samples`` MC softmax maps ``[B, C, H, W]`` from ``cls_seg`` re-run on the
        cached windows; with mmseg's own ``cls_seg`` (``Dropout2d`` and a 1x1 ``conv_seg``)
        the samples come in chunks of one batched product each
        (:func:`~taskal.adapters._mmseg_inference.sampled_cls_seg`) of at most
        :data:`_CHUNK_BYTES` of logits."""
        folded = infer.folded_cls_seg(self._head)
        if folded is None:
            for _ in range(n_samples):
                yield self._softmax([self._head.cls_seg(c) for c in cached], wins, shape)
            return
        per_sample = sum(c[:, :1].numel() for c in cached) * self.num_classes * 4
        chunk = max(1, min(n_samples, _CHUNK_BYTES // max(per_sample, 1)))
        for start in range(0, n_samples, chunk):
            n = min(chunk, n_samples - start)
            logits = [infer.sampled_cls_seg(c, *folded, n) for c in cached]
            for k in range(n):
                yield self._softmax([window[k] for window in logits], wins, shape)

    def _probe(self) -> tuple[list[FeatureInfo], int]:
        """Feature layers from one zero image, and the stride of ``cls_seg``'s input."""
        spec = {"backbone": "backbone"}
        if getattr(self._seg, "with_neck", False):
            spec["neck"] = "neck"
        side = -(-_PROBE_SIZE // self.size_divisor) * self.size_divisor
        x = torch.zeros(1, 3, side, side, device=self._device)
        with torch.no_grad(), eval_mode(self._model):
            with capture_outputs(self._model, spec) as store:
                feats = self._seg.extract_feat(x)
            decoder, cls_input = infer.decoder_module(self._head, feats)
        levels = {name: as_levels(store[name]) for name in spec}
        stages = getattr(self._seg.backbone, "encoder", None)
        coarse_first = [t.shape[-1] for t in levels["backbone"]] != sorted(
            (t.shape[-1] for t in levels["backbone"]), reverse=True
        )
        if coarse_first and isinstance(stages, nn.ModuleList):
            # UNet: its output runs coarse to fine; its encoder stages run fine to coarse
            return self._encoder_stages(stages, x), max(1, round(side / cls_input.shape[-1]))
        if decoder is not None:
            spec["decoder"] = f"decode_head.{decoder}"
            levels["decoder"] = (cls_input,)
        infos = []
        for name, module in spec.items():
            strides = tuple(max(1, round(side / t.shape[-1])) for t in levels[name])
            channels = tuple(int(t.shape[1]) for t in levels[name])
            same = len(set(channels)) == 1
            infos.append(FeatureInfo(name, channels[0] if same else channels, strides, module))
        return _shallow_to_deep(infos), max(1, round(side / cls_input.shape[-1]))

    def _encoder_stages(self, stages: nn.ModuleList, x: Tensor) -> list[FeatureInfo]:
        """One layer per encoder stage (``encoder0`` ... from the input down), each the
        output of ``backbone.encoder.<i>``."""
        names = {f"encoder{i}": f"backbone.encoder.{i}" for i in range(len(stages))}
        with torch.no_grad(), eval_mode(self._model), capture_outputs(self._model, names) as store:
            self._seg.extract_feat(x)
        side = x.shape[-1]
        return [
            FeatureInfo(
                name,
                int(as_levels(store[name])[0].shape[1]),
                (max(1, round(side / as_levels(store[name])[0].shape[-1])),),
                module,
            )
            for name, module in names.items()
        ]


def _shallow_to_deep(infos: list[FeatureInfo]) -> list[FeatureInfo]:
    """The layers whose levels run fine to coarse, walking back from the deepest and keeping
    one only while its finest stride is not coarser than the next kept layer's."""
    kept: list[FeatureInfo] = []
    for info in reversed(infos):
        if list(info.strides) != sorted(info.strides):
            continue
        if kept and info.strides[0] > kept[-1].strides[0]:
            continue
        kept.append(info)
    return kept[::-1]


def _check_segmentor(model: nn.Module) -> None:
    """Refuse what the adapter cannot wrap (see :class:`MMSegAdapter`'s ``Raises``)."""
    if not isinstance(model, EncoderDecoder) or isinstance(
        model, CascadeEncoderDecoder | DepthEstimator
    ):
        raise TypeError(
            "the mmseg adapter wraps an mmseg EncoderDecoder (not a CascadeEncoderDecoder or "
            f"DepthEstimator) whose decode head is a BaseDecodeHead; got {type(model).__name__}"
        )
    head: Any = model.decode_head
    if not isinstance(head, BaseDecodeHead) or not isinstance(head.conv_seg, nn.Conv2d):
        raise TypeError(
            f"the mmseg adapter needs a BaseDecodeHead with conv_seg, got {type(head).__name__}"
        )
    losses = head.loss_decode if isinstance(head.loss_decode, nn.ModuleList) else [head.loss_decode]
    if head.out_channels == 1 or any(getattr(loss, "use_sigmoid", False) for loss in losses):
        raise ValueError(
            f"{type(head).__name__} is a binary or sigmoid head (out_channels="
            f"{head.out_channels}, use_sigmoid loss): the mmseg adapter takes softmax heads "
            "only; give the head out_channels=num_classes and a softmax CrossEntropyLoss"
        )


def _build_segmentor(cfg: Mapping[str, Any]) -> nn.Module:
    """Build a segmentor config from :data:`MODELS`; an unscoped mmseg type gets ``mmseg.``."""
    cfg = dict(cfg)
    name = cfg.get("type")
    if isinstance(name, str) and "." not in name and MODELS.get(name) is None:
        cfg["type"] = f"mmseg.{name}"
    model = build(MODELS, cfg)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model config {cfg!r} built a {type(model).__name__}, not an nn.Module")
    return model


def _sizes(samples: Sequence[SegDataSample]) -> list[tuple[int, int]]:
    return [(int(s.img_shape[0]), int(s.img_shape[1])) for s in samples]


def _check_rgb(images: Sequence[Tensor] | Tensor) -> list[Tensor]:
    images = list(images)
    for x in images:
        # checked here: mmengine's preprocessor silently keeps 3 channels of any image
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[0] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"the mmseg adapter takes [3, H, W] float RGB in [0, 1], got {shape}")
        if not x.is_floating_point():
            raise ValueError(
                f"the mmseg adapter takes [3, H, W] float RGB in [0, 1], got {x.dtype}"
            )
    return images


__all__ = ["MMSegAdapter"]
