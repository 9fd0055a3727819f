"""Learning Loss for an mmdet 3.x detector, trained inside mmengine's training loop.

:class:`LLALDetector` is a registered mmengine model that wraps any detector
:class:`~taskal.adapters.MMDetAdapter` accepts. In ``loss`` mode every image of the batch
runs the detector's own ``loss`` on its own (Learning Loss needs each image's loss, and
mmdet averages over the batch), the neck's levels are captured on the way, and a
:class:`~taskal.llal.LossPredictionModule` on them is trained by the margin ranking loss
against the per-image detection losses. The detector's objective is the mean of those
losses, as in a plain batch; ``predict`` and ``tensor`` modes are the detector's own.
:class:`LLALStopGradHook` stops the module's gradient into the detector after
``stop_grad_fraction`` of the epochs (the paper's 120 of 200). Nothing of mmdet is
changed: the wrapper calls the detector's public methods.

After training, :meth:`LLALDetector.adapter` gives the detector's adapter with the loss
predictor attached, ready for the ``llal`` strategy.
"""

from __future__ import annotations

from typing import Any

import torch
from mmengine.hooks import Hook
from mmengine.model import BaseModel, is_model_wrapper
from torch import Tensor, nn

from taskal.adapters._hooks import capture_outputs
from taskal.functional.llal import loss_ranking_loss
from taskal.llal.module import LossPredictionModule
from taskal.registry import MODELS


@MODELS.register_module(name="LLALDetector")
class LLALDetector(BaseModel):
    """An mmdet detector and a loss-prediction module on its neck, trained jointly.

    Args:
        detector: a built mmdet detector, or its config (built with taskal's ``MODELS``,
            e.g. ``dict(type="mmdet.RetinaNet", ...)``).
        layers: the adapter's feature layers the module reads (``"neck"``: every FPN
            level; at least three maps in all).
        hidden: width of each per-map branch (128 in the paper).
        weight: λ, the ranking loss's weight (1.0 in the paper).
        margin: ξ, the ranking margin (1.0 in the paper).
        dropout_p: passed to :class:`~taskal.adapters.MMDetAdapter`, which adds dropout
            before the re-sampled classifier when the head has none, so the detector
            trains with the dropout MC sampling uses later.
    """

    def __init__(
        self,
        detector: nn.Module | dict[str, Any],
        layers: tuple[str, ...] = ("neck",),
        hidden: int = 128,
        weight: float = 1.0,
        margin: float = 1.0,
        dropout_p: float = 0.5,
    ) -> None:
        from taskal.adapters import MMDetAdapter
        from taskal.registry import build

        det = build(MODELS, dict(detector)) if isinstance(detector, dict) else detector
        if not isinstance(det, BaseModel):
            raise TypeError(f"expected an mmdet detector (a BaseModel), got {type(det).__name__}")
        super().__init__(data_preprocessor=det.data_preprocessor)
        if not weight >= 0 or not margin >= 0:
            raise ValueError(f"weight and margin must be >= 0, got {weight}, {margin}")
        self.detector = det
        self._adapter = MMDetAdapter(det, dropout_p=dropout_p)
        infos = {f.name: f for f in self._adapter.feature_info}
        unknown = [n for n in layers if n not in infos]
        if unknown:
            raise ValueError(f"unknown feature layers {unknown}; the detector has {sorted(infos)}")
        self.loss_predictor = LossPredictionModule([infos[n] for n in layers], hidden)
        self._modules_of = {n: _module_name(det, infos[n].module) for n in layers}
        self.weight = float(weight)
        self.margin = float(margin)
        #: set by :class:`LLALStopGradHook`: stop the module's gradient into the detector.
        self.detach_features = False

    def forward(
        self, inputs: Tensor, data_samples: Any = None, mode: str = "tensor"
    ) -> dict[str, Tensor] | Any:
        if mode == "loss":
            return self.loss(inputs, data_samples)
        return self.detector(inputs, data_samples, mode=mode)

    def loss(self, inputs: Tensor, data_samples: list[Any]) -> dict[str, Tensor]:
        """``loss_det`` (the mean per-image detection loss) and ``loss_llal`` (λ x ranking)."""
        per_image, predicted = [], []
        for i, sample in enumerate(data_samples):
            with capture_outputs(self.detector, self._modules_of) as feats:
                losses = self.detector.loss(inputs[i : i + 1], [sample])
            total, _ = self.detector.parse_losses(losses)
            per_image.append(total)
            predicted.append(self.loss_predictor(feats, detach=self.detach_features))
        loss_B = torch.stack(per_image)
        rank = loss_ranking_loss(torch.cat(predicted), loss_B, self.margin)
        return {"loss_det": loss_B.mean(), "loss_llal": self.weight * rank}

    def adapter(self) -> Any:
        """The detector's :class:`~taskal.adapters.MMDetAdapter`, loss predictor attached."""
        self.loss_predictor.eval()
        self._adapter.attach_loss_predictor(self.loss_predictor)
        return self._adapter


class LLALStopGradHook(Hook):
    """Detach the loss predictor's input from epoch ``round(fraction * max_epochs)`` on.

    Args:
        stop_grad_fraction: the fraction of the schedule after which the gradient stops
            (0.6: the paper's 120 of 200 epochs).
    """

    priority = "NORMAL"

    def __init__(self, stop_grad_fraction: float = 0.6) -> None:
        if not 0.0 <= stop_grad_fraction <= 1.0:
            raise ValueError(f"stop_grad_fraction must lie in [0, 1], got {stop_grad_fraction}")
        self.stop_grad_fraction = stop_grad_fraction

    def before_train_epoch(self, runner: Any) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if not isinstance(model, LLALDetector):
            raise TypeError(f"LLALStopGradHook needs an LLALDetector, got {type(model).__name__}")
        stop = round(self.stop_grad_fraction * runner.max_epochs)
        model.detach_features = runner.epoch >= stop


def _module_name(model: nn.Module, module: nn.Module | str | None) -> str:
    """The dotted name of a feature layer's module (given by name or as the module)."""
    if isinstance(module, str):
        return module
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("a feature layer's module is not part of the detector")


__all__ = ["LLALDetector", "LLALStopGradHook"]
