"""Toy detection and segmentation adapters: real ``nn.Module`` s that run on CPU in ms.

They implement the whole adapter contract the way the OpenMMLab adapters must, so the
conformance template can check box and pixel units without mmdet or mmseg:

* :class:`ToyBoxAdapter`: a two-level backbone (strides 4 and 8) and a head shared across
  levels (called once per level, like RetinaNet's), one anchor per cell and level, softmax
  (``C + 1`` with background) or sigmoid (``C``) scores, dropout in the head. A deterministic
  pass keeps the top anchors after NMS: the units are those anchors. MC samples re-run only
  the head on cached backbone features and gather exactly those anchors.
* :class:`ToyPixelAdapter`: an encoder, ``Dropout2d`` and a 1x1 classifier; every pixel is a
  unit (``unit_U = h * W + w``) and falls in a square patch region. MC samples re-run only
  the decoder on the cached encoder output.

Both take lists of differently sized images, padded to a common size as mmdet's data
preprocessor does, and dict data samples with ground truth for ``per_sample_loss``.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F

from taskal.adapters._hooks import (
    CapturedFeatures,
    capture_outputs,
    detach_levels,
    eval_mode,
    feature_names,
    mc_dropout,
)
from taskal.types import (
    PROB_KINDS,
    Adapter,
    Batch,
    FeatureInfo,
    FeatureMap,
    Predictions,
    Units,
)


def pad_batch(inputs: Tensor | list[Tensor], divisor: int) -> tuple[Tensor, list[tuple[int, int]]]:
    """Images padded bottom-right into one ``[B, C, H, W]`` tensor (H, W multiples of
    ``divisor``) and the ``(h, w)`` of every image."""
    images = list(inputs)
    sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in images]
    hp = -(-max(h for h, _ in sizes) // divisor) * divisor
    wp = -(-max(w for _, w in sizes) // divisor) * divisor
    out = images[0].new_zeros(len(images), images[0].shape[0], hp, wp)
    for i, x in enumerate(images):
        out[i, :, : x.shape[-2], : x.shape[-1]] = x
    return out, sizes


def _gather_index(units: Units, offsets: Tensor, counts: Tensor, what: str) -> Tensor:
    """Rows of a per-batch ``[sum_i n_i, ...]`` tensor that hold ``units``."""
    owner, unit = units.owner_U.long().cpu(), units.unit_U.long().cpu()
    if len(owner) and (
        int(owner.min()) < 0
        or int(owner.max()) >= len(counts)
        or bool((unit < 0).any())
        or bool((unit >= counts[owner]).any())
    ):
        raise ValueError(f"units name {what} that this batch does not have")
    return offsets[owner] + unit


class _ToyAdapter(Adapter):
    """What both toys share: the model, its feature layers, modes and capture."""

    def __init__(self, model: nn.Module, infos: list[FeatureInfo], num_classes: int) -> None:
        self._model = model
        self._infos = infos
        self._classes = num_classes

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def num_classes(self) -> int:
        return self._classes

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return list(self._infos)

    def capture_features(
        self, names: Sequence[str] | None = None
    ) -> contextlib.AbstractContextManager[CapturedFeatures]:
        modules = {f.name: f.module for f in self._infos}
        names = feature_names(self._infos, names)
        return capture_outputs(self._model, {n: modules[n] for n in names})

    def features(self, batch: Batch, names: Sequence[str] | None = None) -> dict[str, FeatureMap]:
        names = feature_names(self._infos, names)
        with torch.no_grad(), eval_mode(self._model), self.capture_features(names) as store:
            self._model(self._pad(batch)[0])
        return {n: detach_levels(store[n]) for n in names}

    def stochastic(self) -> contextlib.AbstractContextManager[None]:
        return mc_dropout(self._model)

    def _pad(self, batch: Batch) -> tuple[Tensor, list[tuple[int, int]]]:
        raise NotImplementedError

    @staticmethod
    def _samples(batch: Batch, keys: Sequence[str]) -> list[dict[str, Tensor]]:
        samples = batch.data_samples or []
        if len(samples) != len(batch) or not all(any(k in s for k in keys) for s in samples):
            raise ValueError(
                f"per_sample_loss needs a data sample with {' or '.join(keys)} per item; got "
                f"{len(samples)} samples with keys {[sorted(s) for s in samples]}"
            )
        return samples


# -- boxes --------------------------------------------------------------------------------
class ToyBackbone(nn.Module):
    """Stride-4 and stride-8 maps, returned as a tuple (like an FPN)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, 2, 1),
            nn.ReLU(),
        )
        self.down = nn.Sequential(nn.Conv2d(width, width, 3, 2, 1), nn.ReLU())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        p4 = self.stem(x)
        return p4, self.down(p4)


class ToyBoxHead(nn.Module):
    """Class logits ``[B, n_out, H, W]`` and box deltas ``[B, 4, H, W]`` of one level."""

    def __init__(self, width: int, n_out: int, dropout: float) -> None:
        super().__init__()
        self.tower = nn.Conv2d(width, width, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.cls = nn.Conv2d(width, n_out, 1)
        self.reg = nn.Conv2d(width, 4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = self.drop(F.relu(self.tower(x)))
        return self.cls(t), self.reg(t)


class ToyDetector(nn.Module):
    strides = (4, 8)

    def __init__(self, n_out: int, width: int = 8, dropout: float = 0.3) -> None:
        super().__init__()
        self.backbone = ToyBackbone(width)
        self.head = ToyBoxHead(width, n_out, dropout)

    def forward(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [self.head(f) for f in self.backbone(x)]


class ToyBoxAdapter(_ToyAdapter):
    """Detection units: anchors kept after NMS (``unit_U`` = the anchor's index in its image).

    Args:
        num_classes: foreground classes ``C``.
        kind: ``"softmax"`` (``C + 1`` scores, background last) or ``"sigmoid"`` (``C``).
        score_thr, iou_thr, max_per_image: the deterministic pass's box selection.
    """

    task = "det"

    def __init__(
        self,
        num_classes: int = 2,
        kind: str = "softmax",
        width: int = 8,
        score_thr: float = 0.05,
        iou_thr: float = 0.5,
        max_per_image: int = 6,
    ) -> None:
        if kind not in PROB_KINDS:
            raise ValueError(f"kind must be one of {PROB_KINDS}, got {kind!r}")
        n_out = num_classes + 1 if kind == "softmax" else num_classes
        infos = [
            FeatureInfo("stem", width, (4,), module="backbone.stem"),
            FeatureInfo("levels", width, ToyDetector.strides, module="backbone"),
            FeatureInfo("tower", width, ToyDetector.strides, module="head.tower"),
        ]
        self.net = ToyDetector(n_out, width)
        super().__init__(self.net, infos, n_out)
        self.prob_kind = kind
        self.foreground = num_classes
        self.score_thr, self.iou_thr, self.max_per_image = score_thr, iou_thr, max_per_image

    def predict(self, batch: Batch, n_samples: int = 1, units: Units | None = None) -> Predictions:
        x, sizes = self._pad(batch)
        with torch.no_grad():
            with eval_mode(self._model):
                levels = self.net.backbone(x)  # cached: the samples re-run only the head
                if units is None:
                    units = self._detect(levels, sizes)
            if units.boxes_U4 is None:
                raise ValueError("box units need boxes_U4; pass Predictions.units()")
            with self.stochastic() if n_samples > 1 else eval_mode(self._model):
                probs = [self._score(levels, sizes, units) for _ in range(n_samples)]
        return Predictions(
            torch.stack(probs, -1),
            units.owner_U,
            self.prob_kind,
            unit_U=units.unit_U,
            boxes_U4=units.boxes_U4,
            region_U=units.unit_U,
            cost_U=torch.ones(len(units)),
        )

    def embed(self, batch: Batch) -> Tensor:
        with torch.no_grad(), eval_mode(self._model):
            return self.net.backbone(self._pad(batch)[0])[-1].mean((2, 3))

    def per_sample_loss(self, batch: Batch) -> Tensor:
        samples = self._samples(batch, ["boxes"])
        x, sizes = self._pad(batch)
        with torch.no_grad(), eval_mode(self._model):
            logits, boxes, _ = self._dense(self.net(x), sizes)
        losses = []
        for i, (h, w) in enumerate(sizes):
            gt_boxes, gt_labels = samples[i]["boxes"].float(), samples[i]["labels"].long()
            anchors = self._anchors(h, w)
            iou = torchvision.ops.box_iou(anchors, gt_boxes)
            best, match = iou.max(1) if len(gt_boxes) else (iou.new_zeros(len(anchors)), None)
            pos = best >= 0.3
            target = torch.full((len(anchors),), self.foreground, dtype=torch.long)
            if match is not None:
                target[pos] = gt_labels[match[pos]]
            if self.prob_kind == "softmax":
                cls = F.cross_entropy(logits[i], target)
            else:
                onehot = F.one_hot(target, self.foreground + 1)[:, : self.foreground].float()
                cls = F.binary_cross_entropy_with_logits(logits[i], onehot)
            reg = boxes[i].new_zeros(())
            if match is not None and pos.any():
                reg = F.l1_loss(boxes[i][pos], gt_boxes[match[pos]]) / max(h, w)
            losses.append(cls + reg)
        return torch.stack(losses)

    # -- helpers ------------------------------------------------------------------------
    def _pad(self, batch: Batch) -> tuple[Tensor, list[tuple[int, int]]]:
        return pad_batch(batch.inputs, max(ToyDetector.strides))

    def _anchors(self, h: int, w: int) -> Tensor:
        """``[A, 4]`` xyxy anchors of an ``h x w`` image: one square per cell and level."""
        out = []
        for s in ToyDetector.strides:
            ys, xs = torch.meshgrid(
                torch.arange(-(-h // s)), torch.arange(-(-w // s)), indexing="ij"
            )
            cx, cy = (xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s
            out.append(torch.stack([cx - 2 * s, cy - 2 * s, cx + 2 * s, cy + 2 * s], 1))
        return torch.cat(out)

    def _dense(
        self, outs: list[tuple[Tensor, Tensor]], sizes: list[tuple[int, int]]
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Per image: logits ``[A_i, n_out]`` and boxes ``[A_i, 4]``; counts ``A_i``."""
        logits, boxes = [], []
        for i, (h, w) in enumerate(sizes):
            per_level_logits, per_level_deltas = [], []
            for (cls, reg), s in zip(outs, ToyDetector.strides, strict=True):
                hl, wl = -(-h // s), -(-w // s)
                per_level_logits.append(cls[i, :, :hl, :wl].flatten(1).T)
                per_level_deltas.append(reg[i, :, :hl, :wl].flatten(1).T * s)
            logits.append(torch.cat(per_level_logits))
            decoded = self._anchors(h, w) + torch.cat(per_level_deltas)
            limits = torch.tensor([w, h, w, h], dtype=decoded.dtype)
            boxes.append(decoded.clamp(min=torch.zeros(4), max=limits))
        return logits, boxes, torch.tensor([len(t) for t in logits])

    def _probs(self, logits: Tensor) -> Tensor:
        return logits.softmax(-1) if self.prob_kind == "softmax" else logits.sigmoid()

    def _detect(self, levels: Sequence[Tensor], sizes: list[tuple[int, int]]) -> Units:
        """The deterministic pass: top anchors after score threshold and NMS, per image."""
        logits, boxes, _ = self._dense([self.net.head(f) for f in levels], sizes)
        owners, ids, kept_boxes = [], [], []
        for i, (lg, bx) in enumerate(zip(logits, boxes, strict=True)):
            score = self._probs(lg)[:, : self.foreground].max(1).values
            cand = torch.nonzero(score > self.score_thr).flatten()
            keep = torchvision.ops.nms(bx[cand], score[cand], self.iou_thr)
            keep = cand[keep[: self.max_per_image]]
            owners.append(torch.full_like(keep, i))
            ids.append(keep)
            kept_boxes.append(bx[keep])
        return Units(torch.cat(owners), torch.cat(ids), torch.cat(kept_boxes))

    def _score(
        self, levels: Sequence[Tensor], sizes: list[tuple[int, int]], units: Units
    ) -> Tensor:
        """``[U, n_out]`` probabilities of exactly ``units``, from one run of the head."""
        logits, _, counts = self._dense([self.net.head(f) for f in levels], sizes)
        offsets = torch.cumsum(counts, 0) - counts
        rows = _gather_index(units, offsets, counts, "anchors")
        return self._probs(torch.cat(logits)[rows])


# -- pixels -------------------------------------------------------------------------------
class ToySegmenter(nn.Module):
    def __init__(self, num_classes: int, width: int = 8, dropout: float = 0.3) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU())
        down = nn.Sequential(nn.Conv2d(width, width, 3, 2, 1), nn.ReLU())
        self.encoder = nn.Sequential(OrderedDict(stem=stem, down=down))
        self.decoder = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(width, num_classes, 1))

    def decode(self, feats: Tensor, size: tuple[int, int]) -> Tensor:
        return F.interpolate(self.decoder(feats), size=size, mode="bilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encoder(x), (x.shape[-2], x.shape[-1]))


class ToyPixelAdapter(_ToyAdapter):
    """Segmentation units: every pixel (``unit_U = h * W + w``), in ``patch x patch`` regions."""

    task = "seg"
    prob_kind = "softmax"

    def __init__(self, num_classes: int = 3, width: int = 8, patch: int = 4) -> None:
        infos = [
            FeatureInfo("stem", width, (1,), module="encoder.stem"),
            FeatureInfo("encoder", width, (2,), module="encoder"),
        ]
        self.net = ToySegmenter(num_classes, width)
        super().__init__(self.net, infos, num_classes)
        self.patch = patch

    def predict(self, batch: Batch, n_samples: int = 1, units: Units | None = None) -> Predictions:
        x, sizes = self._pad(batch)
        counts = torch.tensor([h * w for h, w in sizes])
        if units is None:
            owner = torch.repeat_interleave(torch.arange(len(sizes)), counts)
            units = Units(owner, torch.cat([torch.arange(int(n)) for n in counts]))
        rows = _gather_index(units, torch.cumsum(counts, 0) - counts, counts, "pixels")
        size = (x.shape[-2], x.shape[-1])
        with torch.no_grad():
            with eval_mode(self._model):
                feats = self.net.encoder(x)  # cached: the samples re-run only the decoder
            with self.stochastic() if n_samples > 1 else eval_mode(self._model):
                probs = [
                    self._flat(self.net.decode(feats, size), sizes)[rows] for _ in range(n_samples)
                ]
        widths = torch.tensor([w for _, w in sizes])[units.owner_U.long()]
        row, col = units.unit_U // widths, units.unit_U % widths
        region = (row // self.patch) * (-(-widths // self.patch)) + col // self.patch
        return Predictions(
            torch.stack(probs, -1),
            units.owner_U,
            self.prob_kind,
            unit_U=units.unit_U,
            region_U=region,
            cost_U=torch.ones(len(units)),
        )

    def embed(self, batch: Batch) -> Tensor:
        x, sizes = self._pad(batch)
        with torch.no_grad(), eval_mode(self._model):
            feats = self.net.encoder(x)
        return torch.stack(
            [feats[i, :, : -(-h // 2), : -(-w // 2)].mean((1, 2)) for i, (h, w) in enumerate(sizes)]
        )

    def per_sample_loss(self, batch: Batch) -> Tensor:
        samples = self._samples(batch, ["gt_sem_seg", "masks"])
        x, sizes = self._pad(batch)
        with torch.no_grad(), eval_mode(self._model):
            logits = self.net(x)
        losses = []
        for i, (h, w) in enumerate(sizes):
            mask = samples[i].get("gt_sem_seg", samples[i].get("masks"))
            assert mask is not None
            losses.append(
                F.cross_entropy(logits[i : i + 1, :, :h, :w], mask[None].long(), ignore_index=255)
            )
        return torch.stack(losses)

    def _pad(self, batch: Batch) -> tuple[Tensor, list[tuple[int, int]]]:
        return pad_batch(batch.inputs, 2)

    @staticmethod
    def _flat(logits: Tensor, sizes: list[tuple[int, int]]) -> Tensor:
        """``[sum_i h_i * w_i, C]`` pixel probabilities of every image's own area."""
        probs = logits.float().softmax(1)
        return torch.cat([probs[i, :, :h, :w].flatten(1).T for i, (h, w) in enumerate(sizes)])
