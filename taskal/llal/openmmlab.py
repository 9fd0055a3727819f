"""Learning Loss for OpenMMLab models (mmdet detectors, mmseg segmentors), trained inside
mmengine's training loop.

:class:`LLALDetector` and :class:`LLALSegmentor` are registered mmengine models that wrap a
model their task's adapter accepts (:class:`~taskal.adapters.MMDetAdapter`,
:class:`~taskal.adapters.MMSegAdapter`). In ``loss`` mode every image of the batch runs the
model's own ``loss`` on its own (Learning Loss needs each image's loss, and OpenMMLab
averages over the batch), the adapter's feature layers are captured on the way, and a
:class:`~taskal.llal.LossPredictionModule` on them is trained by the margin ranking loss
against the per-image losses. The model's objective is the mean of those losses, as in a
plain batch; ``predict`` and ``tensor`` modes are the model's own. :class:`LLALStopGradHook`
stops the module's gradient into the model after ``stop_grad_fraction`` of the schedule
(the paper's 120 of 200 epochs; iterations for an iteration-based loop). Nothing of mmdet
or mmseg is changed: the wrapper calls the model's public methods.

After training, :meth:`LLALModel.adapter` gives the model's adapter with the loss predictor
attached, ready for the ``llal`` strategy.
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


class LLALModel(BaseModel):
    """An OpenMMLab model and a loss-prediction module on its feature layers, trained
    jointly (see the module docstring); subclasses name the task's adapter.

    Args:
        model: a built model, or its config (built with taskal's ``MODELS``).
        layers: the adapter's feature layers the module reads (at least three maps in all);
            ``None``: the subclass's default.
        hidden: width of each per-map branch (128 in the paper).
        weight: λ, the ranking loss's weight (1.0 in the paper).
        margin: ξ, the ranking margin (1.0 in the paper).
        dropout_p: passed to the adapter, which adds dropout before the re-sampled
            classifier when the head has none, so the model trains with the dropout MC
            sampling uses later.
    """

    #: what the wrapped model is, for messages.
    kind: str = "model"
    #: the adapter's feature layers read by default (``None``: all of them).
    default_layers: tuple[str, ...] | None = None

    def __init__(
        self,
        model: nn.Module | dict[str, Any],
        layers: tuple[str, ...] | None = None,
        hidden: int = 128,
        weight: float = 1.0,
        margin: float = 1.0,
        dropout_p: float = 0.5,
    ) -> None:
        from taskal.registry import build

        built = build(MODELS, dict(model)) if isinstance(model, dict) else model
        if not isinstance(built, BaseModel):
            raise TypeError(f"expected an {self.kind} (a BaseModel), got {type(built).__name__}")
        super().__init__(data_preprocessor=built.data_preprocessor)
        if not weight >= 0 or not margin >= 0:
            raise ValueError(f"weight and margin must be >= 0, got {weight}, {margin}")
        self.wrapped = built
        self._adapter = self._make_adapter(built, dropout_p)
        infos = {f.name: f for f in self._adapter.feature_info}
        layers = layers or self.default_layers or tuple(infos)
        unknown = [n for n in layers if n not in infos]
        if unknown:
            raise ValueError(
                f"unknown feature layers {unknown}; the {self.kind} has {sorted(infos)}"
            )
        self.loss_predictor = LossPredictionModule([infos[n] for n in layers], hidden)
        self._modules_of = {n: _module_name(built, infos[n].module) for n in layers}
        self.weight = float(weight)
        self.margin = float(margin)
        #: set by :class:`LLALStopGradHook`: stop the module's gradient into the model.
        self.detach_features = False

    def _make_adapter(self, model: nn.Module, dropout_p: float) -> Any:
        raise NotImplementedError

    def forward(
        self, inputs: Tensor, data_samples: Any = None, mode: str = "tensor"
    ) -> dict[str, Tensor] | Any:
        if mode == "loss":
            return self.loss(inputs, data_samples)
        return self.wrapped(inputs, data_samples, mode=mode)

    def loss(self, inputs: Tensor, data_samples: list[Any]) -> dict[str, Tensor]:
        """``loss_task`` (the mean per-image loss) and ``loss_llal`` (λ x ranking)."""
        per_image, predicted = [], []
        for i, sample in enumerate(data_samples):
            with capture_outputs(self.wrapped, self._modules_of) as feats:
                losses = self.wrapped.loss(inputs[i : i + 1], [sample])
            total, _ = self.wrapped.parse_losses(losses)
            per_image.append(total)
            predicted.append(self.loss_predictor(feats, detach=self.detach_features))
        loss_B = torch.stack(per_image)
        rank = loss_ranking_loss(torch.cat(predicted), loss_B, self.margin)
        return {"loss_task": loss_B.mean(), "loss_llal": self.weight * rank}

    def adapter(self) -> Any:
        """The model's adapter with the loss predictor attached."""
        self.loss_predictor.eval()
        self._adapter.attach_loss_predictor(self.loss_predictor)
        return self._adapter


@MODELS.register_module(name="LLALDetector")
class LLALDetector(LLALModel):
    """An mmdet detector (:class:`~taskal.adapters.MMDetAdapter` accepts it) and a loss
    predictor on its neck's levels by default (``layers=("neck",)``: every FPN level)."""

    kind = "mmdet detector"
    default_layers = ("neck",)

    def _make_adapter(self, model: nn.Module, dropout_p: float) -> Any:
        from taskal.adapters import MMDetAdapter

        return MMDetAdapter(model, dropout_p=dropout_p)

    @property
    def detector(self) -> nn.Module:
        return self.wrapped


@MODELS.register_module(name="LLALSegmentor")
class LLALSegmentor(LLALModel):
    """An mmseg ``EncoderDecoder`` (:class:`~taskal.adapters.MMSegAdapter` accepts it) and a
    loss predictor on all its adapter's feature layers by default (a UNet's encoder stages;
    a ResNet's stages and the decoder). Per-image losses follow the heads' averaging
    (``avg_non_ignore=True`` from :func:`~taskal.training_mmseg.train_mmseg`: the mean over
    labeled pixels)."""

    kind = "mmseg segmentor"

    def _make_adapter(self, model: nn.Module, dropout_p: float) -> Any:
        from taskal.adapters import MMSegAdapter

        return MMSegAdapter(model, dropout_p=dropout_p)

    @property
    def segmentor(self) -> nn.Module:
        return self.wrapped


class LLALStopGradHook(Hook):
    """Detach the loss predictor's input once ``stop_grad_fraction`` of the schedule has
    passed: from epoch ``round(fraction * max_epochs)`` of an epoch-based loop, or from
    iteration ``round(fraction * max_iters)`` of an iteration-based one (mmseg's).

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
        if _by_epoch(runner):
            stop = round(self.stop_grad_fraction * runner.max_epochs)
            _llal_model(runner).detach_features = runner.epoch >= stop

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        if not _by_epoch(runner):
            stop = round(self.stop_grad_fraction * runner.max_iters)
            _llal_model(runner).detach_features = runner.iter >= stop


def _by_epoch(runner: Any) -> bool:
    from mmengine.runner import EpochBasedTrainLoop

    return isinstance(runner.train_loop, EpochBasedTrainLoop)


def _llal_model(runner: Any) -> LLALModel:
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    if not isinstance(model, LLALModel):
        raise TypeError(
            f"LLALStopGradHook needs an LLALDetector or LLALSegmentor, got {type(model).__name__}"
        )
    return model


def _module_name(model: nn.Module, module: nn.Module | str | None) -> str:
    """The dotted name of a feature layer's module (given by name or as the module)."""
    if isinstance(module, str):
        return module
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("a feature layer's module is not part of the model")


__all__ = ["LLALDetector", "LLALModel", "LLALSegmentor", "LLALStopGradHook"]
