"""The classification adapter: torchvision classifiers and user ``nn.Module`` s.

A unit is an image: ``probs_UCK`` is ``[B, C, K]`` (softmax), ``owner_U`` is ``arange(B)``
and ``unit_U`` is zero.

MC dropout runs the network once and re-runs only the part that holds every active dropout
on that part's cached input. The part is found at the first MC call, from the modules that
:func:`~taskal.adapters._hooks.mc_dropout` switches on: the smallest module holding all of
them whose output is the model's output (``fc`` with the dropout injected on its input for a
ResNet, the ``classifier`` ``Sequential`` of a VGG, MobileNet or EfficientNet), or else that
module followed by the classifier, when its output is the classifier's input and the
classifier's output is the model's (``dropout`` then ``fc`` for
:class:`~taskal.models.SmallCNN`). The first MC sample is a full pass that records the
part's input; the part is then replayed from the same RNG state and must give the very same
logits with the very same number of random draws, so that no work after the part and no
dropout outside it goes unnoticed. A part that passes serves the other ``T - 1`` samples,
which equal those of ``T`` full passes from the same RNG state (the masks are drawn in the
same order). When none passes (dropout elsewhere in the network, work after the part, a
device whose RNG cannot be replayed), every sample is a full pass;
:attr:`ClassificationAdapter.mc_rerun` tells which.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from taskal.adapters._hooks import (
    CapturedFeatures,
    active_dropout,
    capture_outputs,
    detach_levels,
    ensure_dropout,
    eval_mode,
    feature_names,
    mc_dropout,
    probe_feature_shapes,
    rng_state,
    set_rng_state,
)
from taskal.registry import ADAPTERS
from taskal.types import (
    Adapter,
    Batch,
    FeatureInfo,
    FeatureMap,
    Predictions,
    Units,
    check_unit_alignment,
)

#: layouts of a 4-D feature layer: channels first (convolutions) or channels last (Swin).
NCHW, NHWC = "NCHW", "NHWC"


@ADAPTERS.register_module(name="classification")
class ClassificationAdapter(Adapter):
    """Wrap an image classifier that returns logits ``[B, C]``.

    Args:
        model: the classifier, or a :data:`taskal.registry.MODELS` config such as
            ``dict(type="torchvision", name="resnet18", num_classes=10)``.
        input_shape: ``(C, H, W)`` of one input. At construction the model runs on zeros of
            this shape and of a larger one to learn the feature layers' channels, strides and
            layout (channels-last layers such as Swin's are permuted to ``[B, C, H, W]``).
        classifier: name of the final linear layer (default: the last ``nn.Linear``). Its
            input is the embedding.
        feature_layers: layers exposed by :meth:`features`, shallow to deep (default: at each
            stride the shallowest depth-1/2 module holding a convolution or linear layer, e.g.
            ``conv1, layer1..layer4`` for a ResNet, ``features.1, .3, .5`` and ``features``
            for a Swin).
        dropout_p: probability of the dropout that is added when the model has none.
        device: where the model runs.

    A model without dropout (``p > 0``), such as torchvision's ResNets, gets dropout on the
    classifier input at construction, with a warning: it is active whenever the classifier is
    in train mode, so the model trains with the dropout that MC sampling uses.
    """

    task = "cls"
    prob_kind = "softmax"

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
        head = dict(model.named_modules()).get(self._classifier_name)
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"classifier {self._classifier_name!r} must name an nn.Linear layer of the model"
            )
        self._classifier: nn.Linear = head
        if not 0.0 < dropout_p < 1.0:
            raise ValueError(f"dropout_p must lie in (0, 1), got {dropout_p}")
        self.dropout_p = dropout_p
        self._layouts: dict[str, str] = {}
        self._feature_info = self._learn_feature_info(feature_layers)
        where = f"the classifier input ({self._classifier_name!r})"
        ensure_dropout(model, head, dropout_p, type(model).__name__, where)
        #: the active dropout modules the MC part was found for, and that part (None: full
        #: re-runs); None until the first MC call.
        self._mc: tuple[tuple[str, ...], _Rerun | None] | None = None

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

    @property
    def mc_rerun(self) -> tuple[str, ...] | None:
        """The modules an MC sample re-runs on the cached input, in call order (``("fc",)``,
        ``("classifier",)``, ``("dropout", "fc")``); ``None`` before the first MC call and
        when every sample is a full pass (see the module docstring)."""
        if self._mc is None or self._mc[1] is None:
            return None
        return self._mc[1].names

    def predict(self, batch: Batch, n_samples: int = 1, units: Units | None = None) -> Predictions:
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        x = self._inputs(batch)
        owner_U = torch.arange(x.shape[0], device=self._device)
        images = Units(owner_U, torch.zeros_like(owner_U))
        if units is not None:
            check_unit_alignment(
                images, units, "the caller (units for an image classifier: one per item)"
            )
            images = Units(units.owner_U.to(self._device), units.unit_U.to(self._device))
        with torch.no_grad():
            if n_samples > 1:
                with self.stochastic():
                    logits = self._mc_logits(x, n_samples)
            else:
                with eval_mode(self._model):
                    logits = [self._model(x)]
        probs = [F.softmax(t.float(), dim=1) for t in logits]
        return Predictions(
            torch.stack(probs, dim=-1), images.owner_U, self.prob_kind, unit_U=images.unit_U
        )

    def features(self, batch: Batch, names: Sequence[str] | None = None) -> dict[str, FeatureMap]:
        names = feature_names(self._feature_info, names)
        x = self._inputs(batch)
        with torch.no_grad(), eval_mode(self._model), self.capture_features(names) as store:
            self._model(x)
        return {n: detach_levels(store[n]) for n in names}

    def capture_features(
        self, names: Sequence[str] | None = None
    ) -> contextlib.AbstractContextManager[CapturedFeatures]:
        names = feature_names(self._feature_info, names)
        to_nchw = {n: _nhwc_to_nchw for n in names if self._layouts.get(n) == NHWC}
        return capture_outputs(self._model, names, to_nchw)

    def embed(self, batch: Batch) -> Tensor:
        store: list[Tensor] = []

        def pre_hook(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
            store.append(args[0].detach().flatten(1))

        x = self._inputs(batch)
        handle = self._classifier.register_forward_pre_hook(pre_hook, prepend=True)
        try:
            with torch.no_grad(), eval_mode(self._model):
                self._model(x)
        finally:
            handle.remove()
        return store[-1]

    def predict_and_embed(self, batch: Batch, n_samples: int = 1) -> tuple[Predictions, Tensor]:
        """One deterministic forward gives both (the classifier's input is the embedding);
        MC sampling keeps two calls."""
        if n_samples != 1 or type(self).embed is not ClassificationAdapter.embed:
            return super().predict_and_embed(batch, n_samples)
        store: list[Tensor] = []

        def pre_hook(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
            store.append(args[0].detach().flatten(1))

        handle = self._classifier.register_forward_pre_hook(pre_hook, prepend=True)
        try:
            predictions = self.predict(batch)
        finally:
            handle.remove()
        return predictions, store[-1]

    def per_sample_loss(self, batch: Batch) -> Tensor:
        if batch.targets is None:
            raise ValueError("per_sample_loss needs batch.targets (the class indices [B])")
        x = self._inputs(batch)
        with torch.no_grad(), eval_mode(self._model):
            logits = self._model(x)
        targets = torch.as_tensor(batch.targets, device=self._device).long()
        return F.cross_entropy(logits.float(), targets, reduction="none")

    def stochastic(self) -> contextlib.AbstractContextManager[None]:
        return mc_dropout(self._model)

    def last_layer(self) -> tuple[Tensor, Tensor | None]:
        bias = None if self._classifier.bias is None else self._classifier.bias.detach()
        return self._classifier.weight.detach(), bias

    # -- helpers --------------------------------------------------------------------------
    def _mc_logits(self, x: Tensor, n_samples: int) -> list[Tensor]:
        """``n_samples`` MC logits (dropout on): one full pass, then the MC part re-run on
        its cached input, or full passes when there is no MC part."""
        active = tuple(active_dropout(self._model))
        call: _Call | None = None
        if self._mc is None or self._mc[0] != active:  # first MC call, or dropout changed
            first, rerun, call = self._find_rerun(x, active)
            self._mc = (active, rerun)
        elif (rerun := self._mc[1]) is None:
            first = self._model(x)
        else:
            with _record_calls({rerun.names[0]: rerun.modules[0]}) as calls:
                first = self._model(x)
            found = calls[rerun.names[0]]
            call = found[0] if len(found) == 1 else None
        logits = [first]
        for _ in range(n_samples - 1):
            logits.append(self._model(x) if rerun is None or call is None else rerun(call))
        return logits

    def _find_rerun(
        self, x: Tensor, active: tuple[str, ...]
    ) -> tuple[Tensor, _Rerun | None, _Call | None]:
        """The first MC sample (a full pass), the MC part that reproduces it and the part's
        recorded call (``None, None`` when no candidate does; see the module docstring)."""
        modules = dict(self._model.named_modules())
        chain = _ancestors(_common_prefix(active))
        head_name = self._classifier_name
        watched = {n: modules[n] for n in dict.fromkeys([*chain, head_name])}
        before = rng_state(self._device)
        with _record_calls(watched) as calls:
            out = self._model(x)
        after = rng_state(self._device)
        once = {n: c[0] for n, c in calls.items() if len(c) == 1}
        candidates: list[tuple[str, ...]] = [
            (n,) for n in chain if n in once and once[n].out is out
        ]
        head = once.get(head_name)
        if head is not None and head.out is out and len(head.args) == 1 and not head.kwargs:
            candidates += [
                (n, head_name)
                for n in chain
                if n in once
                and not (head_name == n or head_name.startswith(n + "."))
                and once[n].out is head.args[0]
            ]
        if before is None or after is None:
            return out, None, None  # no RNG to replay from
        for names in candidates:
            rerun = _Rerun(names, tuple(modules[n] for n in names))
            set_rng_state(self._device, before)
            replay = rerun(once[names[0]])
            now = rng_state(self._device)
            same_draws = now is not None and torch.equal(now, after)
            set_rng_state(self._device, after)
            if same_draws and _same_tensor(replay, out):
                return out, rerun, once[names[0]]
        return out, None, None

    def _inputs(self, batch: Batch) -> Tensor:
        """The batch as one ``[B, C, H, W]`` tensor on the device (a list is stacked)."""
        if isinstance(batch.inputs, Tensor):
            return batch.inputs.to(self._device)
        sizes = {tuple(x.shape) for x in batch.inputs}
        if len(sizes) > 1:
            raise ValueError(
                f"a classifier takes same-size inputs, got shapes {sorted(sizes)}; resize or "
                "crop the images in the dataset transform"
            )
        return torch.stack([x.to(self._device) for x in batch.inputs])

    def _learn_feature_info(self, names: Sequence[str] | None) -> list[FeatureInfo]:
        candidates = list(names) if names is not None else _feature_candidates(self._model)
        shapes = probe_feature_shapes(self._model, candidates, self.input_shape)
        layouts = _layouts(self._model, shapes, self.input_shape, explicit=names is not None)
        if names is not None:
            bad = [n for n in names if layouts.get(n) is None]
            if bad:
                raise ValueError(
                    f"feature layers {bad} do not output [B, C, H, W] (or [B, H, W, C]) maps; "
                    f"their output shapes are {[shapes.get(n) for n in bad]}"
                )
            chosen = list(names)
        else:  # per stride: the shallowest single-level module, the last completed among equals
            by_stride: dict[int, str] = {}
            for n, levels in shapes.items():
                layout = layouts.get(n)
                if layout is None or len(levels) != 1:
                    continue
                stride = _strides(self.input_shape, levels, layout)[0]
                best = by_stride.get(stride)
                if best is None or n.count(".") <= best.count("."):
                    by_stride[stride] = n
            chosen = [by_stride[k] for k in sorted(by_stride)]
        infos = []
        for n in chosen:
            layout = layouts[n]
            assert layout is not None
            self._layouts[n] = layout
            channels = {int(s[1] if layout == NCHW else s[3]) for s in shapes[n]}
            if len(channels) != 1:
                raise ValueError(
                    f"feature layer {n!r} has levels with different channels {channels}"
                )
            strides = _strides(self.input_shape, shapes[n], layout)
            infos.append(FeatureInfo(n, channels.pop(), strides, module=n))
        return infos


@dataclass
class _Call:
    """One call of a module: its arguments (before its other pre-hooks, so before an
    injected dropout), a copy of them taken then (an in-place dropout inside the module
    overwrites the originals), and its output (after its forward hooks)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    saved: tuple[tuple[Any, ...], dict[str, Any]]
    out: Any = None


@dataclass(frozen=True)
class _Rerun:
    """The MC part: modules called in order, the first on a copy of a recorded call's
    arguments (a fresh one per run, so in-place dropout never reaches the cache)."""

    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]

    def __call__(self, call: _Call) -> Any:
        args, kwargs = _copy(call.saved)
        out = self.modules[0](*args, **kwargs)
        for module in self.modules[1:]:
            out = module(out)
        return out


def _copy(
    saved: tuple[tuple[Any, ...], dict[str, Any]],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Arguments with every tensor cloned."""
    args, kwargs = saved
    return (
        tuple(a.clone() if isinstance(a, Tensor) else a for a in args),
        {k: v.clone() if isinstance(v, Tensor) else v for k, v in kwargs.items()},
    )


@contextlib.contextmanager
def _record_calls(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, list[_Call]]]:
    """Every call of ``modules`` during the block, per name (the hooks are always removed)."""
    calls: dict[str, list[_Call]] = {n: [] for n in modules}
    handles = []
    try:
        for name, module in modules.items():

            def pre(
                _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name
            ) -> None:
                calls[name].append(_Call(args, dict(kwargs), _copy((args, kwargs))))

            def post(_m: nn.Module, _args: Any, out: Any, name: str = name) -> None:
                calls[name][-1].out = out

            handles.append(module.register_forward_pre_hook(pre, prepend=True, with_kwargs=True))
            handles.append(module.register_forward_hook(post))
        yield calls
    finally:
        for h in handles:
            h.remove()


def _common_prefix(names: Sequence[str]) -> str:
    """The deepest module name that is or contains every one of ``names`` (``""``: root)."""
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _ancestors(name: str) -> list[str]:
    """``name`` and the modules containing it, deepest first, without the root."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _same_tensor(a: Any, b: Tensor) -> bool:
    return isinstance(a, Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _strides(
    input_shape: Sequence[int], levels: Sequence[torch.Size], layout: str
) -> tuple[int, ...]:
    width_axis = 3 if layout == NCHW else 2
    return tuple(max(1, round(input_shape[-1] / int(s[width_axis]))) for s in levels)


def _layouts(
    model: nn.Module,
    shapes: Mapping[str, tuple[torch.Size, ...]],
    input_shape: Sequence[int],
    explicit: bool,
) -> dict[str, str | None]:
    """``NCHW``/``NHWC`` for every 4-D layer whose spatial axes grow with the input, else None.

    The model runs a second time on a larger input (H and W doubled, else 1.5 times): the axes
    that grow are the spatial ones. A layer named explicitly whose 4-D output does not grow
    (a pooled ``[B, C, 1, 1]``) is read as ``NCHW``. When no larger input fits the model (a
    ViT with a fixed size), every 4-D layer is read as ``NCHW``, with a warning.
    """
    c, h, w = input_shape[-3:]
    larger = None
    for scale in (2.0, 1.5):
        try:
            larger = probe_feature_shapes(
                model, list(shapes), (c, round(h * scale), round(w * scale))
            )
            break
        except ValueError:
            continue
    out: dict[str, str | None] = {}
    for name, levels in shapes.items():
        if any(len(s) != 4 for s in levels):
            out[name] = None
        elif larger is None:
            out[name] = NCHW
        else:
            other = larger.get(name, ())
            pairs = list(zip(levels, other, strict=True)) if len(other) == len(levels) else []
            found = {_layout(a, b) for a, b in pairs}
            if explicit and pairs and all(a == b for a, b in pairs):
                out[name] = NCHW  # a pooled [B, C, 1, 1] named on purpose
            else:
                out[name] = found.pop() if len(found) == 1 else None
    if larger is None:
        warnings.warn(
            f"{type(model).__name__} accepts no input larger than {tuple(input_shape)}, so the "
            "layout of its feature layers cannot be probed: reading them as [B, C, H, W]",
            UserWarning,
            stacklevel=4,
        )
    return out


def _layout(a: torch.Size, b: torch.Size) -> str | None:
    """The layout of a 4-D layer from its shapes ``a`` and ``b`` at a small and a large input."""
    grown = {i for i in (1, 2, 3) if a[i] != b[i]}
    if grown and grown <= {2, 3}:
        return NCHW
    if grown and grown <= {1, 2}:
        return NHWC
    return None


def _nhwc_to_nchw(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2)


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer; pass classifier='<layer name>'"
        )
    return names[-1]


def _feature_candidates(model: nn.Module) -> list[str]:
    """Submodules at depth 1-2 that are or hold a Conv2d or Linear, in registration order."""
    out = []
    for name, module in model.named_modules():
        if not name or name.count(".") > 1:
            continue
        if any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules()):
            out.append(name)
    return out
