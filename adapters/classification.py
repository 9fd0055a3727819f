"""The classification adapter: torchvision classifiers and user ``nn.Module`` s.

A unit is an image: ``probs_UCK`` is ``[B, C, K]`` and ``owner_U`` is ``arange(B)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from taskal.adapters._hooks import capture_outputs, mc_dropout, probe_feature_shapes
from taskal.registry import ADAPTERS
from taskal.types import Adapter, Batch, FeatureInfo, Predictions


@ADAPTERS.register_module(name="classification")
class ClassificationAdapter(Adapter):
    """Wrap an image classifier that returns logits ``[B, C]``.

    Args:
        model: the classifier, or a :data:`taskal.registry.MODELS` config such as
            ``dict(type="torchvision", name="resnet18", num_classes=10)``.
        input_shape: ``(C, H, W)`` of one input; used once to learn the feature layers'
            channels and strides before any forward on data.
        classifier: name of the final linear layer (default: the last ``nn.Linear``). Its
            input is the embedding; MC dropout is injected there if the model has none.
        feature_layers: layers exposed by :meth:`features`, shallow to deep (default: the
            shallowest module at each stride among the top two levels that contain a
            convolution, e.g. ``conv1, layer1..layer4`` for a ResNet).
        dropout_p: probability of injected MC dropout (only when the model has none).
        device: where the model runs.
    """

    task = "cls"

    def __init__(
        self,
        model: nn.Module | dict[str, Any],
        input_shape: Sequence[int] = (3, 224, 224),
        classifier: str | None = None,
        feature_layers: Sequence[str] | None = None,
        dropout_p: float = 0.5,
        device: str | torch.device = "cpu",
    ) -> None:
        if isinstance(model, dict):
            from taskal.models import build_model

            model = build_model(model)
        self._device = torch.device(device)
        self._model = model.to(self._device)
        self.input_shape = tuple(input_shape)
        self._classifier_name = classifier or _last_linear(model)
        modules = dict(model.named_modules())
        head = modules.get(self._classifier_name)
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"classifier {self._classifier_name!r} must name an nn.Linear layer of the model"
            )
        self._classifier: nn.Linear = head
        if not 0.0 < dropout_p < 1.0:
            raise ValueError(f"dropout_p must lie in (0, 1), got {dropout_p}")
        self.dropout_p = dropout_p
        self._feature_info = self._learn_feature_info(feature_layers)

    # -- contract -------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_classes(self) -> int:
        return int(self._classifier.out_features)

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return list(self._feature_info)

    def predict(self, batch: Batch, n_samples: int = 1) -> Predictions:
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        x = batch.inputs.to(self._device)
        context = self.stochastic() if n_samples > 1 else self._eval()
        with torch.no_grad(), context:
            probs = [F.softmax(self._model(x).float(), dim=1) for _ in range(n_samples)]
        probs_UCK = torch.stack(probs, dim=-1)
        return Predictions(probs_UCK, torch.arange(len(batch), device=self._device))

    def features(self, batch: Batch, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        names = self._check_names(names)
        with torch.no_grad(), self._eval(), self.capture_features(names) as store:
            self._model(batch.inputs.to(self._device))
        return {n: store[n].detach() for n in names}

    def capture_features(
        self, names: Sequence[str] | None = None
    ) -> contextlib.AbstractContextManager[dict[str, Tensor]]:
        return capture_outputs(self._model, self._check_names(names))

    def embed(self, batch: Batch) -> Tensor:
        store: list[Tensor] = []

        def pre_hook(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
            store.append(args[0].detach().flatten(1))

        handle = self._classifier.register_forward_pre_hook(pre_hook)
        try:
            with torch.no_grad(), self._eval():
                self._model(batch.inputs.to(self._device))
        finally:
            handle.remove()
        return store[-1]

    def per_sample_loss(self, batch: Batch) -> Tensor:
        if batch.targets is None:
            raise ValueError("per_sample_loss needs batch.targets (the labels)")
        with torch.no_grad(), self._eval():
            logits = self._model(batch.inputs.to(self._device))
        return F.cross_entropy(logits, batch.targets.to(self._device), reduction="none")

    def stochastic(self) -> contextlib.AbstractContextManager[None]:
        return mc_dropout(self._model, inject_at=self._classifier, p=self.dropout_p)

    def last_layer(self) -> tuple[Tensor, Tensor | None]:
        bias = None if self._classifier.bias is None else self._classifier.bias.detach()
        return self._classifier.weight.detach(), bias

    # -- helpers --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _eval(self) -> Iterator[None]:
        modes = {m: m.training for m in self._model.modules()}
        try:
            self._model.eval()
            yield
        finally:
            for m, mode in modes.items():
                m.train(mode)

    def _check_names(self, names: Sequence[str] | None) -> list[str]:
        known = [f.name for f in self._feature_info]
        if names is None:
            return known
        unknown = [n for n in names if n not in known]
        if unknown:
            raise KeyError(f"unknown feature layers {unknown}; this adapter exposes {known}")
        return list(names)

    def _learn_feature_info(self, names: Sequence[str] | None) -> list[FeatureInfo]:
        candidates = list(names) if names is not None else _conv_containers(self._model)
        shapes = probe_feature_shapes(self._model, candidates, self.input_shape)
        spatial = {n: s for n, s in shapes.items() if len(s) == 4}
        if names is not None:
            bad = [n for n in names if n not in spatial]
            if bad:
                raise ValueError(f"feature layers {bad} do not output [B, C, H, W] maps")
            chosen = list(names)
        else:  # per stride: the shallowest module, the last completed among equals
            by_stride: dict[int, str] = {}
            for n, s in spatial.items():
                stride = _stride(self.input_shape, s)
                best = by_stride.get(stride)
                if best is None or n.count(".") <= best.count("."):
                    by_stride[stride] = n
            chosen = [by_stride[k] for k in sorted(by_stride)]
        return [
            FeatureInfo(n, int(spatial[n][1]), _stride(self.input_shape, spatial[n]))
            for n in chosen
        ]


def _stride(input_shape: Sequence[int], shape: torch.Size) -> int:
    return max(1, round(input_shape[-1] / int(shape[-1])))


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer; pass classifier='<layer name>'"
        )
    return names[-1]


def _conv_containers(model: nn.Module) -> list[str]:
    """Submodules at depth 1-2 that are or contain a Conv2d, in registration order."""
    out = []
    for name, module in model.named_modules():
        if not name or name.count(".") > 1:
            continue
        if any(isinstance(m, nn.Conv2d) for m in module.modules()):
            out.append(name)
    return out
