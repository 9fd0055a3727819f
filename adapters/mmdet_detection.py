"""The detection adapter for mmdet 3.x detectors: two-stage and dense single-stage.

A unit is a kept detection: a box that survives the head's own ``test_cfg`` (score
threshold, ``nms_pre``, NMS, ``max_per_img``), in original-image xyxy coordinates. Each box
is its own region (``region_U`` = its rank in its image) and costs 1.

* Two-stage (an RPN and a ``StandardRoIHead``, e.g. Faster R-CNN; ``kind="softmax"``):
  ``unit_U = proposal * (C + 1) + class`` and the unit's probabilities are its proposal's
  full softmax over ``C + 1``, background *last* (mmdet's convention; torchvision's is
  first), see :attr:`MMDetAdapter.background`. MC samples re-run the RoI box head on the
  cached RoI features of the fixed proposals (:mod:`taskal.adapters._mmdet_two_stage`).
* Dense (``bbox_head`` an ``AnchorHead`` or ``AnchorFreeHead``: RetinaNet, FCOS, ATSS, ...):
  ``unit_U = anchor * cls_out_channels + class`` over all levels of the padded batch; the
  probabilities are the anchor's full class vector before score filtering and top-k,
  sigmoid or softmax (``C + 1``, background last) as the head is. MC samples re-run the head
  on the cached neck levels (:mod:`taskal.adapters._mmdet_dense`).

The kept boxes are the ones mmdet's own ``model.predict`` returns for the same input: the
adapter calls mmdet's components (``extract_feat``, ``rpn_head.predict``, the RoI extractor
and box head, ``predict_by_feat``, ``multiclass_nms``, ``filter_scores_and_topk``,
``bbox_coder.decode``, ``_bbox_post_process``) and only keeps the indices they select.

Inputs are lists of ``[3, H, W]`` RGB float images in ``[0, 1]`` (as
:class:`~taskal.data.CocoDetectionPool` gives them). The adapter scales them to ``0..255``
in BGR order, as mmdet's ``LoadImageFromFile`` loads images, and hands them to the model's
own ``data_preprocessor`` (``bgr_to_rgb``, mean/std, ``pad_size_divisor``) with
``DetDataSample`` metainfo it builds; images keep their size (``scale_factor`` 1), so boxes
need no rescaling.

Re-scoring given units (``predict(units=...)``): a dense model takes the anchor from
``unit_U`` when that anchor decodes to the unit's box in this model; otherwise (an ensemble
member with other anchors or other weights) each box is scored through this model's anchor
decoding to the very box, else overlapping it most, and counts as not detected (zero, or
all background for a softmax head) below IoU ``match_iou``. A two-stage model recomputes
its proposals (deterministic in eval mode); when every given unit is one of its own
detections, the unit is re-scored on its proposal, otherwise (the reference member of an
ensemble fixed them) every given box is pooled as a proposal through this model's RoI head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from mmdet.models.dense_heads import AnchorFreeHead, AnchorHead
from mmdet.models.roi_heads import StandardRoIHead
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData
from torch import Tensor, nn

from taskal.adapters import _mmdet_dense, _mmdet_two_stage
from taskal.adapters._detection import DenseCache, check_box_units, check_match_iou
from taskal.adapters._hooks import (
    CapturedFeatures,
    capture_outputs,
    detach_levels,
    ensure_dropout,
    eval_mode,
    feature_names,
    has_dropout,
    mc_dropout,
)
from taskal.registry import ADAPTERS, MODELS, build
from taskal.types import (
    Adapter,
    Batch,
    FeatureInfo,
    FeatureMap,
    Predictions,
    Units,
    as_levels,
    rank_within_owner,
)

#: side of the zero image whose backbone and neck maps give the strides at construction.
_PROBE_SIZE = 256


@ADAPTERS.register_module(name="mmdet_detection")
class MMDetAdapter(Adapter):
    """Wrap an mmdet 3.x two-stage or dense single-stage detector (see the module docstring).

    Args:
        model: the detector, or a :data:`taskal.registry.MODELS` config of one such as
            ``dict(type="mmdet.RetinaNet", ...)`` (an unscoped mmdet type gets ``mmdet.``).
        dropout_p: probability of the dropout added to the re-sampled head when it has none
            (on the input of the box head's ``fc_cls``, or of the dense head's
            classification convolution); added at construction, so it is trained in.
        match_iou: the IoU with which a dense model's anchor box must overlap a given unit's
            box to score it (see the module docstring); unused by two-stage models.
        device: where the model runs.

    Raises:
        TypeError: when ``model`` is neither a two-stage detector with a
            ``StandardRoIHead`` nor a detector with a dense ``AnchorHead`` /
            ``AnchorFreeHead`` that keeps mmdet's standard post-processing.

    Data samples for :meth:`per_sample_loss` are dicts with ``boxes`` ``[N, 4]`` xyxy in
    original-image pixels and ``labels`` ``[N]`` in ``0..C-1`` (mmdet's labels, unshifted),
    or ``DetDataSample`` with ``gt_instances``. Feature layers: ``backbone`` (its output
    stages) and ``neck`` (the FPN levels); maps cover the padded batch.
    """

    task = "det"

    def __init__(
        self,
        model: nn.Module | Mapping[str, Any],
        dropout_p: float = 0.5,
        match_iou: float = 0.5,
        device: str | torch.device = "cpu",
    ) -> None:
        self.match_iou = check_match_iou(match_iou)
        if isinstance(model, Mapping):
            model = _build_detector(model)
        det: Any = model  # mmdet detectors are untyped: their parts are attributes
        if not 0.0 < dropout_p < 1.0:
            raise ValueError(f"dropout_p must lie in (0, 1), got {dropout_p}")
        roi_head = getattr(model, "roi_head", None)
        bbox_head = getattr(model, "bbox_head", None)
        if isinstance(roi_head, StandardRoIHead) and hasattr(model, "rpn_head"):
            _mmdet_two_stage.check_roi_head(roi_head)
            self.two_stage = True
            self.prob_kind = "softmax"
            self._classes = int(roi_head.bbox_head.num_classes) + 1
        elif isinstance(bbox_head, (AnchorHead, AnchorFreeHead)):
            _mmdet_dense.check_head(bbox_head)
            self.two_stage = False
            self.prob_kind = "sigmoid" if bbox_head.use_sigmoid_cls else "softmax"
            self._classes = int(bbox_head.cls_out_channels)
        else:
            raise TypeError(
                "expected an mmdet detector with an RPN and a StandardRoIHead (Faster R-CNN) or "
                f"a dense AnchorHead / AnchorFreeHead (RetinaNet, FCOS), got {type(model).__name__}"
            )
        self._device = torch.device(device)
        self._model = model.to(self._device)
        self._det: Any = det
        self._feature_info, cls_module = self._probe()
        rerun = det.roi_head.bbox_head if self.two_stage else det.bbox_head
        what = f"{type(model).__name__}'s re-sampled head"
        target = self._model.get_submodule(cls_module)
        #: a dense head whose only dropout is the one taskal adds on its class layer's input:
        #: MC samples re-run that layer alone on its cached inputs (None: the whole head)
        self._cls_layer: nn.Module | None = None
        if not self.two_stage and not has_dropout(rerun):
            self._cls_layer = target
        ensure_dropout(rerun, target, dropout_p, what, f"the input of {cls_module}")

    # -- contract -------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def num_classes(self) -> int:
        """Columns of :meth:`predict`'s probabilities (``C + 1`` for softmax heads)."""
        return self._classes

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return list(self._feature_info)

    @property
    def background(self) -> int | None:
        """The background column of :meth:`predict`'s probabilities: ``C`` (mmdet puts it
        last) for two-stage and softmax dense heads, ``None`` for sigmoid heads."""
        return None if self.prob_kind == "sigmoid" else self._classes - 1

    def predict(self, batch: Batch, n_samples: int = 1, units: Units | None = None) -> Predictions:
        return self._predict(batch, n_samples, units)[0]

    def predict_and_embed(self, batch: Batch, n_samples: int = 1) -> tuple[Predictions, Tensor]:
        """One backbone and neck pass gives both (:meth:`embed` pools the levels)."""
        if type(self).embed is not MMDetAdapter.embed:
            return super().predict_and_embed(batch, n_samples)
        predictions, feats = self._predict(batch, n_samples, None)
        return predictions, _pooled(feats)

    def _predict(
        self, batch: Batch, n_samples: int, units: Units | None
    ) -> tuple[Predictions, tuple[Tensor, ...]]:
        """:meth:`predict`, and the levels of ``extract_feat`` it ran on."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if units is not None:
            units = check_box_units(units, batch.image_sizes(), self._device)
        cached: Tensor | DenseCache
        with torch.no_grad():
            with eval_mode(self._model):
                inputs, samples = self._preprocess(batch)
                feats = self._det.extract_feat(inputs)
                if self.two_stage:
                    units, cached, probs = _mmdet_two_stage.two_stage(
                        self._det, feats, samples, units
                    )
                else:
                    with _layer_inputs(self._cls_layer) as cls_inputs:
                        units, cached, probs = _mmdet_dense.dense(
                            self._det.bbox_head, feats, samples, units, self.match_iou
                        )
                    if self._cls_layer is not None:
                        cached.levels = cls_inputs  # the class layer's input, per level
            if n_samples > 1:
                with self.stochastic():
                    draws = [self._resample(cached) for _ in range(n_samples)]
                probs = torch.stack(draws, -1)
            else:
                probs = probs.unsqueeze(-1)
        predictions = Predictions(
            probs.float(),
            units.owner_U,
            self.prob_kind,
            unit_U=units.unit_U,
            boxes_U4=units.boxes_U4,
            region_U=rank_within_owner(units.owner_U),
            cost_U=torch.ones(len(units), device=self._device),
        )
        return predictions, as_levels(feats)

    def features(self, batch: Batch, names: Sequence[str] | None = None) -> dict[str, FeatureMap]:
        names = feature_names(self._feature_info, names)
        with torch.no_grad(), eval_mode(self._model), self.capture_features(names) as store:
            inputs, _ = self._preprocess(batch)
            self._det.extract_feat(inputs)
        return {n: detach_levels(store[n]) for n in names}

    def capture_features(
        self, names: Sequence[str] | None = None
    ) -> contextlib.AbstractContextManager[CapturedFeatures]:
        names = feature_names(self._feature_info, names)
        modules = {f.name: f.module for f in self._feature_info}
        return capture_outputs(self._model, {n: modules[n] for n in names})

    def embed(self, batch: Batch) -> Tensor:
        """Mean over the neck's levels of their global average pools, ``[B, D]``; without a
        neck (levels of different widths) the deepest backbone level's pool."""
        with torch.no_grad(), eval_mode(self._model):
            inputs, _ = self._preprocess(batch)
            feats = as_levels(self._det.extract_feat(inputs))
        return _pooled(feats)

    def per_sample_loss(self, batch: Batch) -> Tensor:
        """The sum of the model's training losses (``model.loss`` through
        ``parse_losses``), one image at a time.

        BatchNorm and dropout stay in eval mode, and the samplers draw from the global RNG
        seeded 0 inside a forked RNG state (the caller's untouched), so an image's loss is
        deterministic. Needs the model's ``train_cfg``.
        """
        targets = self.model_targets(batch)
        losses = []
        devices = [self._device] if self._device.type == "cuda" else []
        with torch.no_grad(), eval_mode(self._model), torch.random.fork_rng(devices=devices):
            for i, target in enumerate(targets):
                torch.manual_seed(0)
                one = Batch([batch.inputs[i]], [batch.ids[i]])
                inputs, samples = self._preprocess(one, [target])
                loss, _ = self._det.parse_losses(self._det.loss(inputs, samples))
                losses.append(loss.float())
        return torch.stack(losses)

    def model_targets(self, batch: Batch) -> list[DetDataSample]:
        """``DetDataSample`` with ``gt_instances`` (``bboxes`` xyxy, ``labels`` ``0..C-1``)
        from ``batch``'s data samples, on the device; the image metainfo is added when the
        batch is preprocessed.

        Raises:
            ValueError: when an item has no ground truth (a batch from selection).
        """
        samples = batch.data_samples
        targets = []
        for s in samples or [None] * len(batch):
            if isinstance(s, DetDataSample) and "gt_instances" in s:
                boxes, labels = s.gt_instances.bboxes, s.gt_instances.labels
            elif isinstance(s, Mapping) and "boxes" in s and "labels" in s:
                boxes, labels = s["boxes"], s["labels"]
            else:
                raise ValueError(
                    "per_sample_loss needs batch.data_samples with ground truth: one dict per "
                    "image with 'boxes' [N, 4] xyxy and 'labels' [N] in 0..C-1, or a "
                    f"DetDataSample with gt_instances; got {type(s).__name__}"
                )
            gt = InstanceData(
                bboxes=torch.as_tensor(boxes, device=self._device).float().reshape(-1, 4),
                labels=torch.as_tensor(labels, device=self._device).long().reshape(-1),
            )
            targets.append(DetDataSample(gt_instances=gt))
        return targets

    def stochastic(self) -> contextlib.AbstractContextManager[None]:
        return mc_dropout(self._model)

    # -- helpers --------------------------------------------------------------------------
    def _resample(self, cached: Tensor | DenseCache) -> Tensor:
        """Probabilities of the units from one run of the re-sampled head on cached inputs."""
        if self.two_stage:
            assert isinstance(cached, Tensor)
            return _mmdet_two_stage.resample(self._det, cached)
        assert isinstance(cached, DenseCache)
        if self._cls_layer is not None:
            head, layer = self._det.bbox_head, self._cls_layer
            return _mmdet_dense.unit_probs(head, [layer(x) for x in cached.levels], cached)
        return _mmdet_dense.resample(self._det.bbox_head, cached)

    def _preprocess(
        self, batch: Batch, samples: list[DetDataSample] | None = None
    ) -> tuple[Tensor, list[DetDataSample]]:
        """The padded, normalized batch and its data samples, from the model's own
        ``data_preprocessor``; ``samples`` (e.g. with ground truth) get the metainfo."""
        images = [x.to(self._device) for x in batch.inputs]
        for x in images:
            # checked here: mmengine's preprocessor silently keeps 3 channels of any image
            if not x.is_floating_point() or x.dim() != 3 or x.shape[0] != 3:
                raise ValueError(
                    f"the mmdet adapter takes [3, H, W] float RGB images in [0, 1], got a "
                    f"{x.dtype} tensor of shape {tuple(x.shape)}"
                )
        if samples is None:
            samples = [DetDataSample() for _ in images]
        for x, sample in zip(images, samples, strict=True):
            h, w = int(x.shape[-2]), int(x.shape[-1])
            sample.set_metainfo(dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0)))
        # mmdet's pipelines load BGR images in 0..255; the preprocessor converts from there
        bgr = [x.flip(0) * 255.0 for x in images]
        data = self._det.data_preprocessor(dict(inputs=bgr, data_samples=samples), False)
        return data["inputs"], data["data_samples"]

    def _probe(self) -> tuple[list[FeatureInfo], str]:
        """Feature layers from one zero image, and the module that gets injected dropout:
        the box head's ``fc_cls``, or the dense head's module that outputs the class maps."""
        spec = {"backbone": "backbone"}
        if getattr(self._det, "with_neck", False):
            spec["neck"] = "neck"
        x = torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE, device=self._device)
        with torch.no_grad(), eval_mode(self._model):
            with capture_outputs(self._model, spec) as store:
                feats = self._det.extract_feat(x)
            cls_module = self._cls_module(feats)
        infos = []
        for name, module in spec.items():
            levels = as_levels(store[name])
            strides = tuple(max(1, round(_PROBE_SIZE / t.shape[-1])) for t in levels)
            channels = tuple(int(t.shape[1]) for t in levels)
            same = len(set(channels)) == 1
            infos.append(FeatureInfo(name, channels[0] if same else channels, strides, module))
        return infos, cls_module

    def _cls_module(self, feats: tuple[Tensor, ...]) -> str:
        """Name of the module whose input gets dropout (see :meth:`_probe`)."""
        if self.two_stage:
            head = self._det.roi_head.bbox_head
            return "roi_head.bbox_head.fc_cls" if hasattr(head, "fc_cls") else "roi_head.bbox_head"
        head = self._det.bbox_head
        names = [n for n, _ in head.named_modules() if n]
        with capture_outputs(head, names, skip_non_tensors=True) as store:
            cls_maps = head(feats)[0]
        for name in store:
            if as_levels(store[name])[0] is cls_maps[0]:
                return f"bbox_head.{name}"
        raise TypeError(
            f"found no module of {type(head).__name__} that outputs its class maps; add "
            "dropout to the head so that MC sampling has something to sample"
        )


def _pooled(feats: tuple[Tensor, ...]) -> Tensor:
    """``[B, D]``: the mean over the levels of their global average pools; levels of
    different widths (no neck): the deepest one's pool."""
    pooled = [x.mean((2, 3)) for x in feats]
    if len({p.shape[1] for p in pooled}) > 1:
        return pooled[-1].detach()
    return torch.stack(pooled).mean(0).detach()


@contextlib.contextmanager
def _layer_inputs(layer: nn.Module | None) -> Iterator[list[Tensor]]:
    """The inputs of every call of ``layer`` during the block, recorded before any injected
    dropout (nothing for ``None``); the hook is always removed."""
    store: list[Tensor] = []
    if layer is None:
        yield store
        return

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        store.append(args[0])

    handle = layer.register_forward_pre_hook(hook, prepend=True)
    try:
        yield store
    finally:
        handle.remove()


def _build_detector(cfg: Mapping[str, Any]) -> nn.Module:
    """Build a detector config from :data:`MODELS`; an unscoped mmdet type gets ``mmdet.``."""
    cfg = dict(cfg)
    name = cfg.get("type")
    if isinstance(name, str) and "." not in name and MODELS.get(name) is None:
        cfg["type"] = f"mmdet.{name}"
    model = build(MODELS, cfg)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model config {cfg!r} built a {type(model).__name__}, not an nn.Module")
    return model


__all__ = ["MMDetAdapter"]
