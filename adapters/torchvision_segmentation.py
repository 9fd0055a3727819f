"""The segmentation adapter for torchvision's FCN, DeepLabV3 and LR-ASPP models.

A unit is a pixel of an image at its own size (``unit_U = row * W + col``), its
probabilities the softmax of the model's ``"out"`` logits there: torchvision upsamples the
classifier's map to the input size (bilinear), and so does the adapter. Pixels group into
square patches or SLIC superpixels (:class:`~taskal.adapters._segmentation.PixelRegions`)
for region queries; a pixel costs 1 (budgets in labeled pixels) or ``1 / region size``
(``cost="clicks"``).

MC dropout re-runs only the end of the classifier on cached features: for a sequential head
(``FCNHead``, ``DeepLabHead``) its final convolution and the dropout directly before it
(``FCNHead`` has ``Dropout(0.1)`` there; other heads get dropout injected on the final
convolution's input at construction, so it is trained in). ``LRASPPHead`` re-runs whole on
the cached backbone maps (it is two 1x1 convolutions and a pooled gate), with dropout
injected before its ``high_classifier``.

Inputs are lists of ``[3, H, W]`` float RGB images in ``[0, 1]`` (a pool's images),
normalized with ``mean`` / ``std`` (ImageNet's by default, as torchvision's weights expect)
and padded bottom-right with zeros to a common size, a multiple of ``size_divisor``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import segmentation as tv_seg
from torchvision.models.segmentation.lraspp import LRASPPHead

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
    upsampled_softmax,
)
from taskal.registry import ADAPTERS, MODELS, build
from taskal.types import Adapter, Batch, FeatureInfo, FeatureMap, Predictions, Units, as_levels

#: torchvision's segmentation builders, all built without weights.
TORCHVISION_SEGMENTERS = (
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: side of the zero image that gives the feature maps' strides at construction.
_PROBE_SIZE = 64
IGNORE_INDEX = 255


@MODELS.register_module(name="torchvision_segmentation")
def torchvision_segmenter(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """One of torchvision's segmentation models, built without any weights (no download)."""
    if name not in TORCHVISION_SEGMENTERS:
        raise ValueError(
            f"unknown torchvision segmenter {name!r}; choose from {TORCHVISION_SEGMENTERS}"
        )
    for key in ("weights", "weights_backbone"):
        if kwargs.get(key) is not None:
            raise ValueError(f"taskal never downloads weights: {key} must be None")
        kwargs[key] = None
    model: nn.Module = getattr(tv_seg, name)(num_classes=num_classes, **kwargs)
    return model


@ADAPTERS.register_module(name="torchvision_segmentation")
class TorchvisionSegmentationAdapter(Adapter):
    """Wrap a torchvision segmentation model (see the module docstring).

    Args:
        model: the model (``backbone`` returning a dict with ``"out"``, ``classifier``), or a
            :data:`~taskal.registry.MODELS` config of one.
        regions: :class:`PixelRegions` or a dict of its fields (patches of 16 pixels by
            default).
        dropout_p: probability of the dropout injected when the re-sampled part has none.
        mean: per-channel mean subtracted from ``[0, 1]`` inputs.
        std: per-channel std dividing them.
        size_divisor: padded batches have sides that are multiples of this.
        device: where the model runs.

    Data samples for :meth:`per_sample_loss` are dicts with ``gt_sem_seg`` ``[H, W]`` long
    class indices (255: unlabeled, ignored). Feature layers: ``backbone`` (its output maps,
    ``aux`` before ``out`` when the model has both) and ``decoder`` (what the re-sampled part
    reads; sequential heads only).
    """

    task = "seg"
    prob_kind = "softmax"

    def __init__(
        self,
        model: nn.Module | Mapping[str, Any],
        regions: PixelRegions | Mapping[str, Any] | None = None,
        dropout_p: float = 0.1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        size_divisor: int = 1,
        device: str | torch.device = "cpu",
    ) -> None:
        if isinstance(model, Mapping):
            built = build(MODELS, dict(model))
            if not isinstance(built, nn.Module):
                raise TypeError(f"model config {model!r} built a {type(built).__name__}")
            model = built
        classifier = getattr(model, "classifier", None)
        if not isinstance(getattr(model, "backbone", None), nn.Module) or not isinstance(
            classifier, nn.Module
        ):
            raise TypeError(
                "expected a torchvision segmentation model with .backbone and .classifier "
                f"(FCN, DeepLabV3, LRASPP), got {type(model).__name__}"
            )
        if not 0.0 < dropout_p < 1.0:
            raise ValueError(f"dropout_p must lie in (0, 1), got {dropout_p}")
        if size_divisor < 1:
            raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
        self.regions = PixelRegions.of(regions)
        self._spare = SpareOutput()  # the memory of the last MC output, reused
        self._device = torch.device(device)
        self._model = model.to(self._device)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self._device)[:, None, None]
        self._std = torch.tensor(std, dtype=torch.float32, device=self._device)[:, None, None]
        self.size_divisor = size_divisor
        self._head: Any = classifier
        if isinstance(classifier, nn.Sequential) and isinstance(classifier[-1], nn.Conv2d):
            start = len(classifier) - 1
            if start > 0 and isinstance(classifier[start - 1], nn.Dropout | nn.Dropout2d):
                start -= 1
            self._rerun: nn.Module = nn.Sequential(*list(classifier)[start:])
            self._cache_module = f"classifier.{start}"
            self._decoder = f"classifier.{start - 1}" if start > 0 else None
            target, where = classifier[-1], "the input of its final convolution"
        elif isinstance(classifier, LRASPPHead):
            self._rerun, self._cache_module, self._decoder = classifier, "classifier", None
            target, where = classifier.high_classifier, "the input of its high_classifier"
        else:
            raise TypeError(
                f"{type(classifier).__name__} is neither a sequential head ending in a Conv2d "
                "(FCNHead, DeepLabHead) nor an LRASPPHead"
            )
        self.num_classes_ = self._final_channels()
        ensure_dropout(
            self._rerun, target, dropout_p, f"{type(model).__name__}'s classifier", where
        )
        self._feature_info = self._probe()

    # -- contract -------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def num_classes(self) -> int:
        return self.num_classes_

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return list(self._feature_info)

    def predict(self, batch: Batch, n_samples: int = 1, units: Units | None = None) -> Predictions:
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        x, sizes = self.preprocess(batch.inputs)
        if units is not None:
            units = check_pixel_units(units, sizes)
        with torch.no_grad():
            with eval_mode(self._model), self._capture_rerun_input() as store:
                logits = self._model(x)["out"]
            maps = [self.regions.region_map(img) for img in batch.inputs]
            if n_samples > 1:
                cached = store["input"]
                with self.stochastic():
                    draws = self._draws(cached, x.shape[-2:], n_samples)
                    return pixel_predictions(
                        draws, sizes, units, maps, self.regions.cost, n_samples, self._spare
                    )
            probs = logits.float().softmax(1).unsqueeze(-1)
        return pixel_predictions(probs, sizes, units, maps, self.regions.cost)

    def features(self, batch: Batch, names: Sequence[str] | None = None) -> dict[str, FeatureMap]:
        names = feature_names(self._feature_info, names)
        x, _ = self.preprocess(batch.inputs)
        with torch.no_grad(), eval_mode(self._model), self.capture_features(names) as store:
            self._model(x)
        return {n: detach_levels(store[n]) for n in names}

    def capture_features(
        self, names: Sequence[str] | None = None
    ) -> contextlib.AbstractContextManager[CapturedFeatures]:
        names = feature_names(self._feature_info, names)
        modules = {f.name: f.module for f in self._feature_info}
        return capture_outputs(self._model, {n: modules[n] for n in names})

    def embed(self, batch: Batch) -> Tensor:
        """``[B, D]``: the deepest feature layer averaged over each image's own area."""
        info = self._feature_info[-1]
        x, sizes = self.preprocess(batch.inputs)
        with torch.no_grad(), eval_mode(self._model), self.capture_features([info.name]) as s:
            self._model(x)
        return self._pooled(as_levels(s[info.name])[-1], sizes)

    def predict_and_embed(self, batch: Batch, n_samples: int = 1) -> tuple[Predictions, Tensor]:
        """One forward gives both when it is deterministic (:meth:`embed` reads a layer of
        that forward); MC sampling keeps two calls."""
        if n_samples != 1 or type(self).embed is not TorchvisionSegmentationAdapter.embed:
            return super().predict_and_embed(batch, n_samples)
        info = self._feature_info[-1]
        with self.capture_features([info.name]) as s:
            predictions = self.predict(batch)
        sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in batch.inputs]
        return predictions, self._pooled(as_levels(s[info.name])[-1], sizes)

    def _pooled(self, fmap: Tensor, sizes: Sequence[tuple[int, int]]) -> Tensor:
        """``[B, D]``: ``fmap`` (the deepest feature layer) averaged over each image's area."""
        stride = self._feature_info[-1].strides[-1]
        return torch.stack(
            [
                fmap[i, :, : -(-h // stride), : -(-w // stride)].mean((1, 2))
                for i, (h, w) in enumerate(sizes)
            ]
        ).detach()

    def per_sample_loss(self, batch: Batch) -> Tensor:
        """``[B]`` cross-entropy of the ``"out"`` logits over each image's labeled pixels
        (255 ignored; 0 for an image without any), BatchNorm and dropout in eval mode."""
        targets = self.model_targets(batch)
        x, sizes = self.preprocess(batch.inputs)
        with torch.no_grad(), eval_mode(self._model):
            logits = self._model(x)["out"]
        return torch.stack(
            [
                pixel_loss(logits[i : i + 1, :, :h, :w], t[None])[0]
                for i, ((h, w), t) in enumerate(zip(sizes, targets, strict=True))
            ]
        )

    def model_targets(self, batch: Batch) -> list[Tensor]:
        """Every item's ``[H, W]`` long label map (``gt_sem_seg``) on the device.

        Raises:
            ValueError: an item without ``gt_sem_seg`` (a batch from selection), or a map
                whose shape is not its image's.
        """
        samples = batch.data_samples or [None] * len(batch)
        out = []
        for img, s in zip(batch.inputs, samples, strict=True):
            mask = s.get("gt_sem_seg") if isinstance(s, Mapping) else None
            if mask is None:
                raise ValueError(
                    "per_sample_loss needs batch.data_samples with ground truth: one dict per "
                    f"image with 'gt_sem_seg' [H, W] class indices; got {type(s).__name__}"
                )
            mask = torch.as_tensor(mask, device=self._device).long()
            if tuple(mask.shape) != tuple(img.shape[-2:]):
                raise ValueError(
                    f"gt_sem_seg of shape {tuple(mask.shape)} does not match its image "
                    f"{tuple(img.shape[-2:])}"
                )
            out.append(mask)
        return out

    def stochastic(self) -> contextlib.AbstractContextManager[None]:
        return mc_dropout(self._model)

    # -- shared with training -------------------------------------------------------------
    def preprocess(self, images: Sequence[Tensor] | Tensor) -> tuple[Tensor, list[tuple[int, int]]]:
        """The normalized, padded batch ``[B, 3, H, W]`` on the device and each image's
        ``(h, w)``; padding is 0 after normalization."""
        normed = [(x.to(self._device).float() - self._mean) / self._std for x in _check_rgb(images)]
        return pad_images(normed, self.size_divisor)

    # -- helpers --------------------------------------------------------------------------
    def _capture_rerun_input(self) -> contextlib.AbstractContextManager[dict[str, Any]]:
        return _capture_input(self._model.get_submodule(self._cache_module))

    def _resample(self, cached: Any, size: torch.Size, out: Tensor | None = None) -> Tensor:
        """Softmax maps ``[B, C, H, W]`` (channels-last, in ``out`` ``[B, H, W, C]`` when
        given) from one run of the re-sampled part on ``cached``."""
        return upsampled_softmax(self._rerun(cached), size, out)

    def _draws(self, cached: Any, size: torch.Size, n_samples: int) -> Iterator[Tensor]:
        """``n_samples`` MC softmax maps in one buffer, each draw overwriting the one
        before: the consumer copies a map out before it asks for the next."""
        out: Tensor | None = None
        for _ in range(n_samples):
            probs = self._resample(cached, size, out)
            out = probs.permute(0, 2, 3, 1)
            yield probs

    def _final_channels(self) -> int:
        head = self._head
        final: Any = head[-1] if isinstance(head, nn.Sequential) else head.high_classifier
        return int(final.out_channels)

    def _probe(self) -> list[FeatureInfo]:
        """Feature layers from one zero image: ``backbone`` levels, then ``decoder``."""
        spec = {"backbone": "backbone"}
        if self._decoder is not None:
            spec["decoder"] = self._decoder
        x = torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE, device=self._device)
        with torch.no_grad(), eval_mode(self._model), capture_outputs(self._model, spec) as store:
            self._model(x)
        infos = []
        for name, module in spec.items():
            levels = as_levels(store[name])
            strides = tuple(max(1, round(_PROBE_SIZE / t.shape[-1])) for t in levels)
            channels = tuple(int(t.shape[1]) for t in levels)
            same = len(set(channels)) == 1
            infos.append(FeatureInfo(name, channels[0] if same else channels, strides, module))
        return infos


def pixel_loss(logits: Tensor, target: Tensor) -> Tensor:
    """``[B]`` mean cross-entropy over each image's labeled pixels (``target`` 255 is
    ignored; an image with no labeled pixel gives 0), for logits ``[B, C, H, W]``."""
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    labeled = (target != IGNORE_INDEX).flatten(1).sum(1)
    return per_pixel.flatten(1).sum(1) / labeled.clamp(min=1)


@contextlib.contextmanager
def _capture_input(module: nn.Module) -> Any:
    """Record ``module``'s first input during the block (the hook is always removed)."""
    store: dict[str, Any] = {}

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        store["input"] = args[0]

    handle = module.register_forward_pre_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _check_rgb(images: Sequence[Tensor] | Tensor) -> list[Tensor]:
    images = list(images)
    for x in images:
        if (
            not isinstance(x, Tensor)
            or x.dim() != 3
            or x.shape[0] != 3
            or not x.is_floating_point()
        ):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"the torchvision segmentation adapter takes [3, H, W] float RGB images in "
                f"[0, 1], got {shape}"
            )
    return images


__all__ = ["TorchvisionSegmentationAdapter", "pixel_loss", "torchvision_segmenter"]
