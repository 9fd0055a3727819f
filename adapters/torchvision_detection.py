"""The detection adapter for torchvision's Faster R-CNN, RetinaNet and FCOS.

A unit is a kept detection: a box that survives the model's own score threshold, NMS and
``detections_per_img``, in original-image xyxy coordinates (the transform's resize undone).
Each box is its own region (``region_U`` = its rank in its image) and costs 1.

* Faster R-CNN (two-stage, ``kind="softmax"``): the adapter runs transform, backbone, RPN,
  RoI pooling, box head and predictor itself and mirrors ``RoIHeads.postprocess_detections``
  while keeping each box's proposal and class: ``unit_U = proposal * (C + 1) + class`` and the
  unit's probabilities are its proposal's full softmax over ``C + 1`` (background first).
  MC samples re-run box head and predictor on the cached pooled features of the fixed
  proposals.
* RetinaNet and FCOS (dense, ``kind="sigmoid"``): the full per-anchor class logits are taken
  before score filtering and top-k, and the head's post-processing is mirrored keeping the
  anchor: ``unit_U = anchor * C + class`` (``anchor`` counts over all levels of the padded
  image). The probabilities are the anchor's sigmoid class vector (FCOS's centerness only
  ranks boxes, as in torchvision). MC samples re-run only ``cls_logits`` (and the dropout
  before it) on the classification tower's cached outputs; a tower with dropout of its own
  is re-run whole on the cached FPN maps.

Re-scoring given units (``predict(units=...)``): a dense model takes the anchor from
``unit_U`` (members built with the same anchor generator and transform share anchors). A
two-stage model recomputes its proposals (deterministic in eval mode); when every given unit
is one of its own detections (its proposal exists and the decoded box matches), the unit is
re-scored on its proposal, otherwise (the reference member of an ensemble fixed them) every
given box is pooled as a proposal through this model's RoI head.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms, remove_small_boxes

from taskal.adapters._detection import (
    DenseCache,
    check_box_units,
    check_match_iou,
    match_boxes,
    same_boxes,
)
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
from taskal.registry import ADAPTERS, MODELS
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

#: side of the zero image whose backbone maps give the strides at construction.
_PROBE_SIZE = 256
_DETECTOR_PREFIXES = ("fasterrcnn_", "retinanet_", "fcos_")


@MODELS.register_module(name="torchvision_detection")
def torchvision_detector(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, weights_backbone=None, ...)``.

    Args:
        name: a Faster R-CNN, RetinaNet or FCOS builder, e.g. ``"retinanet_resnet50_fpn"``.
        num_classes: classes of the detector (torchvision counts background for Faster
            R-CNN: ``num_classes = C + 1``).
        **kwargs: passed to the builder (``min_size``, ``max_size``, ``score_thresh``, ...).
            ``weights`` and ``weights_backbone`` must be ``None``: taskal downloads nothing.
    """
    import torchvision

    for key in ("weights", "weights_backbone"):
        if kwargs.pop(key, None) is not None:
            raise ValueError(
                f"taskal never downloads weights: pass {key}=None and load a local checkpoint "
                "into the built detector instead."
            )
    available = [
        n
        for n in torchvision.models.list_models(module=torchvision.models.detection)
        if n.startswith(_DETECTOR_PREFIXES)
    ]
    if name not in available:
        raise KeyError(f"unknown torchvision detector {name!r}; available: {sorted(available)}")
    return torchvision.models.get_model(
        name, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
    )


@ADAPTERS.register_module(name="torchvision_detection")
class TorchvisionDetectionAdapter(Adapter):
    """Wrap a torchvision ``FasterRCNN``, ``RetinaNet`` or ``FCOS`` (see the module docstring).

    Args:
        model: the detector, or a :data:`taskal.registry.MODELS` config such as
            ``dict(type="torchvision_detection", name="fcos_resnet50_fpn", num_classes=3)``.
        dropout_p: probability of the dropout added to the re-sampled head when it has none.
        device: where the model runs.

    Inputs are lists of ``[3, H, W]`` float images in ``[0, 1]`` (torchvision's convention);
    data samples are torchvision target dicts (``boxes`` xyxy, ``labels``) for
    :meth:`per_sample_loss`, with taskal's foreground labels ``0..C-1`` (as
    :class:`~taskal.data.CocoDetectionPool` gives them): for Faster R-CNN, whose class 0 is
    the background, the adapter shifts them by one, so build it with ``C + 1`` classes.
    Feature layers: ``body`` (the backbone's levels) and ``fpn`` for a ``BackboneWithFPN``,
    else ``backbone``; maps cover the resized, padded batch.
    """

    task = "det"

    def __init__(
        self,
        model: nn.Module | dict[str, Any],
        dropout_p: float = 0.5,
        device: str | torch.device = "cpu",
        match_iou: float = 0.5,
    ) -> None:
        if isinstance(model, dict):
            from taskal.models import build_model

            model = build_model(model)
        det: Any = model  # torchvision is untyped: its submodules are attributes
        sampled: nn.Module
        rerun: nn.Module
        if isinstance(model, GeneralizedRCNN) and hasattr(model, "roi_heads"):
            self.two_stage = True
            self.prob_kind = "softmax"
            sampled = det.roi_heads.box_predictor
            rerun = nn.ModuleList([det.roi_heads.box_head, sampled])
            self._classes = int(det.roi_heads.box_predictor.cls_score.out_features)
        elif isinstance(model, (RetinaNet, FCOS)):
            self.two_stage = False
            self.prob_kind = "sigmoid"
            rerun = det.head.classification_head
            sampled = det.head.classification_head.cls_logits
            self._classes = int(det.head.classification_head.num_classes)
        else:
            raise TypeError(
                f"expected a torchvision FasterRCNN, RetinaNet or FCOS, got {type(model).__name__}"
            )
        if not 0.0 < dropout_p < 1.0:
            raise ValueError(f"dropout_p must lie in (0, 1), got {dropout_p}")
        self.match_iou = check_match_iou(match_iou)
        self._device = torch.device(device)
        self._model = model.to(self._device)
        self._det: Any = self._model  # the same detector, for torchvision's untyped attributes
        self._feature_info = self._probe_feature_info()
        #: the dense classification tower, cached so MC samples re-run only ``cls_logits``
        #: (None: two-stage, or a tower with dropout of its own, re-run whole).
        self._tower: str | None = None
        if not self.two_stage and not has_dropout(det.head.classification_head.conv):
            self._tower = "head.classification_head.conv"
        where = "box predictor" if self.two_stage else "classification head's cls_logits"
        what = f"{type(model).__name__}'s re-sampled head"
        ensure_dropout(rerun, sampled, dropout_p, what, f"the input of its {where}")

    # -- contract -------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def num_classes(self) -> int:
        return self._classes

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return list(self._feature_info)

    def predict(self, batch: Batch, n_samples: int = 1, units: Units | None = None) -> Predictions:
        return self._predict(batch, n_samples, units)[0]

    def predict_and_embed(self, batch: Batch, n_samples: int = 1) -> tuple[Predictions, Tensor]:
        """One backbone pass gives both (:meth:`embed` pools the backbone's levels)."""
        if type(self).embed is not TorchvisionDetectionAdapter.embed:
            return super().predict_and_embed(batch, n_samples)
        predictions, feats = self._predict(batch, n_samples, None)
        return predictions, _pooled(feats)

    def _predict(
        self, batch: Batch, n_samples: int, units: Units | None
    ) -> tuple[Predictions, OrderedDict[str, Tensor]]:
        """:meth:`predict`, and the backbone's levels it ran on."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        images, original = self._images(batch)
        if units is not None:
            units = check_box_units(units, original, self._device)
        cached: Tensor | DenseCache
        with torch.no_grad():
            with eval_mode(self._model):
                image_list, feats = self._forward_backbone(images)
                if self.two_stage:
                    units, cached, probs = self._two_stage(image_list, feats, original, units)
                else:
                    units, cached, probs = self._dense(image_list, feats, original, units)
            if n_samples > 1:
                with self.stochastic():
                    samples = [self._resample(cached, units) for _ in range(n_samples)]
                probs = torch.stack(samples, -1)
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
        return predictions, feats

    def features(self, batch: Batch, names: Sequence[str] | None = None) -> dict[str, FeatureMap]:
        names = feature_names(self._feature_info, names)
        images, _ = self._images(batch)
        with torch.no_grad(), eval_mode(self._model), self.capture_features(names) as store:
            self._forward_backbone(images)
        return {n: detach_levels(store[n]) for n in names}

    def capture_features(
        self, names: Sequence[str] | None = None
    ) -> contextlib.AbstractContextManager[CapturedFeatures]:
        names = feature_names(self._feature_info, names)
        modules = {f.name: f.module for f in self._feature_info}
        return capture_outputs(self._model, {n: modules[n] for n in names})

    def embed(self, batch: Batch) -> Tensor:
        """Mean over the backbone's output levels (the FPN) of their global average pools."""
        images, _ = self._images(batch)
        with torch.no_grad(), eval_mode(self._model):
            _, feats = self._forward_backbone(images)
        return _pooled(feats)

    def per_sample_loss(self, batch: Batch) -> Tensor:
        """The sum of the model's training losses, one image at a time.

        The detector, its RPN and RoI heads compute losses as in training, but the transform,
        BatchNorm and dropout stay in eval mode and the RoI sampling draws from a generator
        seeded 0 (the caller's RNG untouched), so an image's loss is deterministic.
        """
        images, _ = self._images(batch)
        targets = self.model_targets(batch)
        losses = []
        devices = [self._device] if self._device.type == "cuda" else []
        with torch.no_grad(), self._loss_mode(), torch.random.fork_rng(devices=devices):
            for image, target in zip(images, targets, strict=True):
                torch.manual_seed(0)
                out = self._model([image], [target])
                losses.append(torch.stack([v.float() for v in out.values()]).sum())
        return torch.stack(losses)

    @property
    def background(self) -> int | None:
        """The background column of :meth:`predict`'s probabilities: 0 for Faster R-CNN
        (softmax over ``C + 1``, background first), ``None`` for RetinaNet and FCOS."""
        return 0 if self.two_stage else None

    def model_targets(self, batch: Batch) -> list[dict[str, Tensor]]:
        """torchvision targets of ``batch``'s data samples, on the device, with taskal's
        labels ``0..C-1`` moved past the background column when there is one."""
        return _targets(batch, self._device, first_label=0 if self.background is None else 1)

    def stochastic(self) -> contextlib.AbstractContextManager[None]:
        return mc_dropout(self._model)

    # -- two-stage ------------------------------------------------------------------------
    def _two_stage(
        self,
        image_list: ImageList,
        feats: OrderedDict[str, Tensor],
        original: list[tuple[int, int]],
        units: Units | None,
    ) -> tuple[Units, Tensor, Tensor]:
        """Units, their pooled RoI features and their softmax ``[U, C + 1]``."""
        heads = self._det.roi_heads
        proposals, _ = self._det.rpn(image_list, feats)
        pooled = heads.box_roi_pool(feats, proposals, image_list.image_sizes)
        logits, deltas = heads.box_predictor(heads.box_head(pooled))
        boxes = heads.box_coder.decode(deltas, proposals)  # [N, C + 1, 4], resized image
        counts = torch.tensor([len(p) for p in proposals], device=self._device)
        offsets = torch.cumsum(counts, 0) - counts
        rows: Tensor | None
        if units is None:
            units, rows = self._two_stage_detect(logits, boxes, counts, image_list, original)
        else:
            rows = self._own_rows(units, boxes, counts, offsets, image_list, original)
        if rows is not None:
            return units, pooled[rows], logits[rows].softmax(-1)
        pooled = self._pool_boxes(feats, units, image_list, original)
        return units, pooled, self._resample(pooled, units)

    def _two_stage_detect(
        self,
        logits: Tensor,
        boxes: Tensor,
        counts: Tensor,
        image_list: ImageList,
        original: list[tuple[int, int]],
    ) -> tuple[Units, Tensor]:
        """``RoIHeads.postprocess_detections``, keeping each kept box's proposal and class."""
        heads = self._det.roi_heads
        c1 = logits.shape[1]
        owners, ids, kept, rows = [], [], [], []
        start = 0
        for i, n in enumerate(counts.tolist()):
            scores = logits[start : start + n].softmax(-1)[:, 1:].reshape(-1)
            size = torch.tensor(image_list.image_sizes[i], device=self._device).expand(n, 2)
            b = _clip(boxes[start : start + n, 1:].reshape(n, -1, 4), size[:, None])
            b = b.reshape(-1, 4)
            flat = torch.where(scores > heads.score_thresh)[0]
            flat = flat[remove_small_boxes(b[flat], min_size=1e-2)]
            labels = flat % (c1 - 1) + 1
            keep = batched_nms(b[flat], scores[flat], labels, heads.nms_thresh)
            flat = flat[keep[: heads.detections_per_img]]
            proposal = torch.div(flat, c1 - 1, rounding_mode="floor")
            owner = torch.full_like(flat, i)
            owners.append(owner)
            ids.append(proposal * c1 + flat % (c1 - 1) + 1)
            kept.append(self._to_original(b[flat], owner, image_list, original))
            rows.append(start + proposal)
            start += n
        return Units(torch.cat(owners), torch.cat(ids), torch.cat(kept)), torch.cat(rows)

    def _own_rows(
        self,
        units: Units,
        boxes: Tensor,
        counts: Tensor,
        offsets: Tensor,
        image_list: ImageList,
        original: list[tuple[int, int]],
    ) -> Tensor | None:
        """Rows of the units' proposals when all are this model's detections, else None."""
        c1 = boxes.shape[1]
        proposal = torch.div(units.unit_U, c1, rounding_mode="floor")
        if bool((proposal >= counts[units.owner_U]).any()):
            return None
        rows = offsets[units.owner_U] + proposal
        sizes = torch.tensor(image_list.image_sizes, device=self._device)[units.owner_U]
        b = _clip(boxes[rows, units.unit_U % c1], sizes)
        b = self._to_original(b, units.owner_U, image_list, original)
        assert units.boxes_U4 is not None
        return rows if torch.allclose(b, units.boxes_U4, atol=1e-4) else None

    def _pool_boxes(
        self,
        feats: OrderedDict[str, Tensor],
        units: Units,
        image_list: ImageList,
        original: list[tuple[int, int]],
    ) -> Tensor:
        """RoI features of the units' own boxes, pooled as proposals, in unit order."""
        assert units.boxes_U4 is not None
        resized = torch.tensor(image_list.image_sizes, device=self._device)[units.owner_U]
        orig = torch.tensor(original, device=self._device)[units.owner_U]
        scale = (resized / orig).flip(1).repeat(1, 2).float()  # (w, h, w, h) ratios
        rois = units.boxes_U4.float() * scale
        order = torch.sort(units.owner_U, stable=True).indices
        per_image = [rois[order][units.owner_U[order] == i] for i in range(len(original))]
        pooled = self._det.roi_heads.box_roi_pool(feats, per_image, image_list.image_sizes)
        return pooled[torch.argsort(order)]

    # -- dense ----------------------------------------------------------------------------
    def _dense(
        self,
        image_list: ImageList,
        feats: OrderedDict[str, Tensor],
        original: list[tuple[int, int]],
        units: Units | None,
    ) -> tuple[Units, DenseCache, Tensor]:
        """Units, what MC samples re-run on, and the units' sigmoid class vectors ``[U, C]``."""
        levels = list(feats.values())
        tower = self._tower
        capture = capture_outputs(self._model, {"tower": tower}) if tower else None
        with capture if capture is not None else contextlib.nullcontext() as store:
            out = self._det.head(levels)
        cached = list(as_levels(store["tower"])) if store is not None else levels
        anchors = self._det.anchor_generator(image_list, levels)
        if units is None:
            units = self._dense_detect(out, anchors, levels, image_list, original)
            lookup, found = units, None
        else:
            lookup, found = self._match_anchors(units, out, anchors, image_list, original)
        cache = DenseCache(cached, lookup, found)
        return units, cache, self._dense_probs(out["cls_logits"], cache)

    def _decode(
        self,
        reg: Tensor,
        ref: Tensor,
        i: int,
        image_list: ImageList,
        original: list[tuple[int, int]],
    ) -> Tensor:
        """Boxes of anchors ``ref`` with regressions ``reg`` in image ``i``'s original pixels."""
        model = self._det
        if isinstance(model, FCOS):
            decoded = model.box_coder.decode(reg, ref)
        else:
            decoded = model.box_coder.decode_single(reg, ref)
        size = torch.tensor(image_list.image_sizes[i], device=self._device)
        owner = torch.full((len(ref),), i, device=self._device)
        return self._to_original(
            _clip(decoded, size.expand(len(ref), 2)), owner, image_list, original
        )

    def _match_anchors(
        self,
        units: Units,
        out: dict[str, Tensor],
        anchors: list[Tensor],
        image_list: ImageList,
        original: list[tuple[int, int]],
    ) -> tuple[Units, Tensor | None]:
        """The anchors that score given units: their own when every unit is this model's box
        (its anchor exists and decodes to the unit's box), otherwise, per unit, this model's
        anchor whose decoded box overlaps the unit's box most (an anchor decoding to the
        very box first); a unit no anchor overlaps with IoU >= ``match_iou`` is not detected
        by this model (probabilities 0)."""
        assert units.boxes_U4 is not None
        c, n_anchors = self._classes, out["cls_logits"].shape[1]
        anchor = torch.div(units.unit_U, c, rounding_mode="floor")
        if len(units) == 0:
            return units, None
        if bool((anchor < n_anchors).all()):
            own = torch.cat(
                [
                    self._decode(
                        out["bbox_regression"][i, anchor[m]],
                        anchors[i][anchor[m]],
                        i,
                        image_list,
                        original,
                    )
                    for i in range(len(original))
                    if bool((m := units.owner_U == i).any())
                ]
            )
            order = torch.argsort(units.owner_U, stable=True)
            if same_boxes(own, units.boxes_U4[order]):
                return units, None
        matched = torch.empty_like(units.unit_U)
        found = torch.zeros(len(units), dtype=torch.bool, device=self._device)
        for i in range(len(original)):
            mine = torch.nonzero(units.owner_U == i).flatten()
            if not len(mine):
                continue
            boxes = self._decode(out["bbox_regression"][i], anchors[i], i, image_list, original)
            best, found[mine] = match_boxes(units.boxes_U4[mine], boxes, self.match_iou)
            matched[mine] = best * c + units.unit_U[mine] % c
        return Units(units.owner_U, matched, units.boxes_U4), found

    def _dense_detect(
        self,
        out: dict[str, Tensor],
        anchors: list[Tensor],
        levels: list[Tensor],
        image_list: ImageList,
        original: list[tuple[int, int]],
    ) -> Units:
        """The head's ``postprocess_detections``, keeping each kept box's anchor and class."""
        model, c = self._det, self._classes
        hw = [x.shape[2] * x.shape[3] for x in levels]
        per_anchor = out["cls_logits"].shape[1] // sum(hw)
        bounds = torch.cumsum(torch.tensor([0, *hw]), 0) * per_anchor
        owners, ids, kept = [], [], []
        for i in range(len(original)):
            size = torch.tensor(image_list.image_sizes[i], device=self._device)
            boxes, scores, flat = [], [], []
            for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
                s = out["cls_logits"][i, start:end].sigmoid()
                if isinstance(model, FCOS):
                    s = torch.sqrt(s * out["bbox_ctrness"][i, start:end].sigmoid())
                s = s.flatten()
                idx = torch.where(s > model.score_thresh)[0]
                top, order = s[idx].topk(min(idx.numel(), model.topk_candidates))
                idx = idx[order]
                anchor = torch.div(idx, c, rounding_mode="floor")
                reg, ref = out["bbox_regression"][i, start:end][anchor], anchors[i][start:end]
                if isinstance(model, FCOS):
                    decoded = model.box_coder.decode(reg, ref[anchor])
                else:
                    decoded = model.box_coder.decode_single(reg, ref[anchor])
                boxes.append(_clip(decoded, size.expand(len(anchor), 2)))
                scores.append(top)
                flat.append((start + anchor) * c + idx % c)
            b, f = torch.cat(boxes), torch.cat(flat)
            keep = batched_nms(b, torch.cat(scores), f % c, model.nms_thresh)
            keep = keep[: model.detections_per_img]
            owner = torch.full_like(f[keep], i)
            owners.append(owner)
            ids.append(f[keep])
            kept.append(self._to_original(b[keep], owner, image_list, original))
        return Units(torch.cat(owners), torch.cat(ids), torch.cat(kept))

    def _dense_probs(self, cls_logits: Tensor, cache: DenseCache) -> Tensor:
        lookup = cache.lookup
        anchor = torch.div(lookup.unit_U, self._classes, rounding_mode="floor")
        probs = cls_logits[lookup.owner_U, anchor].sigmoid()
        if cache.found is not None:
            probs = probs * cache.found[:, None]
        return probs

    # -- shared helpers -------------------------------------------------------------------
    def _forward_backbone(self, images: list[Tensor]) -> tuple[ImageList, OrderedDict[str, Tensor]]:
        """The transform (normalize, resize, pad) and the backbone, as the detector runs them."""
        image_list, _ = self._det.transform(images)
        feats = self._det.backbone(image_list.tensors)
        if isinstance(feats, Tensor):
            feats = OrderedDict([("0", feats)])
        return image_list, feats

    def _resample(self, cached: Tensor | DenseCache, units: Units) -> Tensor:
        """Probabilities of ``units`` from one run of the re-sampled head on cached inputs."""
        if self.two_stage:
            assert isinstance(cached, Tensor)
            heads = self._det.roi_heads
            return heads.box_predictor(heads.box_head(cached))[0].softmax(-1)
        assert isinstance(cached, DenseCache)
        head = self._det.head.classification_head
        if self._tower is None:
            return self._dense_probs(head(cached.levels), cached)
        # only cls_logits samples: run it on the cached tower outputs and lay the logits out
        # as torchvision's classification head does ([N, H * W * A, C] over the levels)
        per_level = []
        for t in cached.levels:
            logits = head.cls_logits(t)
            n, _, h, w = logits.shape
            logits = logits.view(n, -1, self._classes, h, w).permute(0, 3, 4, 1, 2)
            per_level.append(logits.reshape(n, -1, self._classes))
        return self._dense_probs(torch.cat(per_level, 1), cached)

    def _to_original(
        self, boxes: Tensor, owner: Tensor, image_list: ImageList, original: list[tuple[int, int]]
    ) -> Tensor:
        """Boxes of the resized images in their owners' original coordinates, clipped."""
        orig = torch.tensor(original, dtype=torch.float32, device=self._device)[owner]
        resized = torch.tensor(image_list.image_sizes, dtype=torch.float32, device=self._device)
        ratio = (orig / resized[owner]).flip(1).repeat(1, 2)  # (w, h, w, h)
        return _clip(boxes * ratio, orig)

    def _images(self, batch: Batch) -> tuple[list[Tensor], list[tuple[int, int]]]:
        images = [x.to(self._device) for x in batch.inputs]
        for x in images:
            if not x.is_floating_point() or x.dim() != 3:
                raise ValueError(
                    f"torchvision detectors take [C, H, W] float images in [0, 1], got a "
                    f"{x.dtype} tensor of shape {tuple(x.shape)}"
                )
        return images, batch.image_sizes()

    @contextlib.contextmanager
    def _loss_mode(self) -> Iterator[None]:
        """Losses switched on (detector, RPN, RoI heads) with every other module in eval."""
        with eval_mode(self._model):
            self._model.training = True
            for name in ("rpn", "roi_heads"):
                if hasattr(self._model, name):
                    self._model.get_submodule(name).training = True
            yield

    def _probe_feature_info(self) -> list[FeatureInfo]:
        """Channels and strides from the backbone on one zero image (resized, padded size)."""
        backbone = self._det.backbone
        children = dict(backbone.named_children())
        if "body" in children and "fpn" in children:
            spec = {"body": "backbone.body", "fpn": "backbone.fpn"}
        else:
            spec = {"backbone": "backbone"}
        x = torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE, device=self._device)
        with torch.no_grad(), eval_mode(self._model), capture_outputs(self._model, spec) as store:
            backbone(x)
        infos = []
        for name, module in spec.items():
            levels = as_levels(store[name])
            strides = tuple(max(1, round(_PROBE_SIZE / t.shape[-1])) for t in levels)
            channels = tuple(int(t.shape[1]) for t in levels)
            same = len(set(channels)) == 1
            infos.append(FeatureInfo(name, channels[0] if same else channels, strides, module))
        return infos


def _clip(boxes: Tensor, size_hw: Tensor) -> Tensor:
    """``boxes [..., 4]`` clipped to images of ``size_hw [..., 2]`` (height, width)."""
    limits = size_hw.flip(-1).to(boxes.dtype)  # (width, height)
    x = torch.minimum(boxes[..., 0::2].clamp(min=0), limits[..., :1])
    y = torch.minimum(boxes[..., 1::2].clamp(min=0), limits[..., 1:])
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)


def _targets(batch: Batch, device: torch.device, first_label: int = 0) -> list[dict[str, Tensor]]:
    """torchvision targets from the data samples; taskal's labels ``0..C-1`` are shifted to
    start at ``first_label`` (1 for Faster R-CNN, whose class 0 is the background)."""
    samples = batch.data_samples
    if samples is None or any(
        not isinstance(s, dict) or "boxes" not in s or "labels" not in s for s in samples
    ):
        raise ValueError(
            "per_sample_loss needs batch.data_samples with torchvision targets: one dict per "
            "image with 'boxes' [N, 4] xyxy and 'labels' [N]"
        )
    return [
        {
            "boxes": torch.as_tensor(s["boxes"], device=device).float().reshape(-1, 4),
            "labels": torch.as_tensor(s["labels"], device=device).long().reshape(-1) + first_label,
        }
        for s in samples
    ]


def _pooled(feats: OrderedDict[str, Tensor]) -> Tensor:
    """``[B, D]``: the mean over the backbone's levels of their global average pools."""
    return torch.stack([x.mean((2, 3)) for x in feats.values()]).mean(0).detach()


__all__ = ["TorchvisionDetectionAdapter", "torchvision_detector"]
