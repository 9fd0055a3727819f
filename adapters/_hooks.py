"""Helpers shared by adapters: forward-hook feature capture and MC dropout."""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from taskal.types import FeatureInfo, FeatureMap, as_levels

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class CapturedFeatures(Mapping[str, FeatureMap]):
    """Read-only ``{layer: map}`` that forward hooks fill while a capture is open.

    Every call of a hooked module appends its output as one level, and a module returning a
    tuple, list or dict of tensors (an FPN) adds each tensor as a level. A layer with exactly
    one level maps to that ``Tensor``, otherwise to the tuple of its levels in call order.
    Only layers that were called are keys, in the order of their first call.
    """

    def __init__(self) -> None:
        self._levels: dict[str, list[Tensor]] = {}

    def __getitem__(self, name: str) -> FeatureMap:
        levels = self._levels[name]
        return levels[0] if len(levels) == 1 else tuple(levels)

    def __iter__(self) -> Iterator[str]:
        return iter(self._levels)

    def __len__(self) -> int:
        return len(self._levels)

    def clear(self) -> None:
        """Forget everything recorded so far (to reuse an open capture for another forward)."""
        self._levels.clear()

    def _record(self, name: str, levels: list[Tensor]) -> None:
        self._levels.setdefault(name, []).extend(levels)


def feature_names(infos: Sequence[FeatureInfo], names: Sequence[str] | None) -> list[str]:
    """``names`` checked against an adapter's feature layers (all of them for ``None``)."""
    known = [f.name for f in infos]
    if names is None:
        return known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown feature layers {unknown}; this adapter exposes {known}")
    return list(names)


def detach_levels(x: FeatureMap) -> FeatureMap:
    """A captured layer with every level detached (same single-map or tuple form)."""
    levels = tuple(t.detach() for t in as_levels(x))
    return levels[0] if len(levels) == 1 else levels


def output_levels(out: object) -> list[Tensor]:
    """The tensors of a module output: itself, or the tensor items of a tuple/list/dict."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, Tensor)]
    return []


@contextlib.contextmanager
def capture_outputs(
    model: nn.Module,
    layers: Sequence[str] | Mapping[str, str],
    transforms: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
    skip_non_tensors: bool = False,
) -> Iterator[CapturedFeatures]:
    """Record the outputs of ``model``'s submodules during the forwards inside the block.

    Args:
        model: the model whose submodules are hooked.
        layers: module names, or ``{key: module name}`` to record under other keys.
        transforms: per key, a function applied to every level as it is recorded (e.g. a
            permute from ``[B, H, W, C]`` to ``[B, C, H, W]``).
        skip_non_tensors: ignore outputs that hold no tensor instead of raising a
            ``TypeError`` from inside the forward (for probing many candidate layers).

    Yields:
        a :class:`CapturedFeatures`. Captured tensors keep their autograd graph. The hooks are
        always removed on exit (``try/finally``), also when the forward raises.
    """
    spec = dict(layers) if isinstance(layers, Mapping) else {n: n for n in layers}
    modules = dict(model.named_modules())
    missing = [m for m in spec.values() if m not in modules]
    if missing:
        raise KeyError(f"no submodule named {missing} in {type(model).__name__}")
    transforms = transforms or {}
    store = CapturedFeatures()
    handles: list[RemovableHandle] = []
    try:
        for key, module_name in spec.items():

            def hook(_m: nn.Module, _inp: object, out: object, key: str = key) -> None:
                levels = output_levels(out)
                if not levels and skip_non_tensors:
                    return
                if not levels:
                    raise TypeError(
                        f"layer {key!r} returned a {type(out).__name__} holding no tensor; "
                        "expose a layer that outputs a tensor or a tuple/list/dict of tensors"
                    )
                fn = transforms.get(key)
                store._record(key, [fn(t) for t in levels] if fn else levels)

            handles.append(modules[module_name].register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


class InjectedDropout:
    """Forward pre-hook: dropout on a module's first input while that module is training.

    Registered once and kept (baal's ``patch_module`` also patches before training), so the
    model trains with the dropout that MC sampling later switches on. A class rather than a
    closure so that a hooked model still pickles and deep-copies.
    """

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x = args[0]
        return (sampled_dropout(x, self.p) if module.training else x, *args[1:])


def sampled_dropout(x: Tensor, p: float) -> Tensor:
    """``F.dropout(x, p, training=True)``: each element kept with probability ``1 - p`` and
    scaled by ``1 / (1 - p)``, zeroed otherwise.

    Without autograd on a CPU float tensor the mask is a uniform draw compared with ``p`` in
    place (``P(u >= p) = 1 - p``), which takes a half to a fifth of the time of
    ``F.dropout``'s Bernoulli sampling there (an MC sample of a segmentation head or a
    dense detector drops a whole feature map). The draws come from torch's global
    generator, so ``torch.manual_seed`` fixes them as it fixes ``F.dropout``'s; the masks
    differ from ``F.dropout``'s under one seed.
    Elsewhere (a GPU, half precision, a tensor that needs gradients) it is ``F.dropout``.
    """
    if (
        x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or x.requires_grad
        or not 0.0 < p < 1.0
    ):
        return F.dropout(x, p=p, training=True)
    keep = torch.empty_like(x).uniform_().ge_(p)  # x's memory layout, as F.dropout keeps it
    return keep.mul_(x).mul_(1.0 / (1.0 - p))


def inject_dropout(module: nn.Module, p: float) -> RemovableHandle:
    """Add :class:`InjectedDropout` on ``module``'s input; returns the hook's handle."""
    return module.register_forward_pre_hook(InjectedDropout(p))


def ensure_dropout(checked: nn.Module, target: nn.Module, p: float, what: str, where: str) -> None:
    """Inject dropout(p) on ``target``'s input when ``checked`` has none, with a warning.

    Adapters call this at construction, so the model trains with the dropout that MC
    sampling uses later. ``what`` names the checked part and ``where`` the target in the
    warning ("<what> has no dropout with p > 0: taskal adds dropout(p) on <where> ...").
    """
    if has_dropout(checked):
        return
    inject_dropout(target, p)
    warnings.warn(
        f"{what} has no dropout with p > 0: taskal adds dropout(p={p}) on {where}, active in "
        "training and MC sampling",
        UserWarning,
        stacklevel=3,
    )


def has_dropout(model: nn.Module) -> bool:
    """Whether ``model`` holds a dropout module with ``p > 0`` or an injected dropout."""
    for m in model.modules():
        if isinstance(m, _DROPOUT) and m.p > 0:
            return True
        if any(isinstance(h, InjectedDropout) for h in m._forward_pre_hooks.values()):
            return True
    return False


def _sampled_forward(self: nn.Dropout, input: Tensor) -> Tensor:
    """``nn.Dropout.forward`` through :func:`sampled_dropout`: the module's own ``p`` and
    train/eval flag, read at every call."""
    return sampled_dropout(input, self.p) if self.training else input


@contextlib.contextmanager
def mc_dropout(model: nn.Module) -> Iterator[None]:
    """Turn dropout on at test time only; BatchNorm and the rest stay in eval mode.

    Every dropout module with ``p > 0``, and every module carrying an
    :class:`InjectedDropout`, is switched to train mode; all modes are restored on exit.
    Plain ``nn.Dropout`` modules sample through :func:`sampled_dropout` inside the block (the
    same distribution, faster on the CPU); their own ``forward`` is back on exit.

    Raises:
        ValueError: when the model has no dropout at all (nothing would be sampled).
    """
    modes = {m: m.training for m in model.modules()}
    swapped: list[nn.Module] = []
    try:
        model.eval()
        active = [
            m
            for m in model.modules()
            if (isinstance(m, _DROPOUT) and m.p > 0)
            or any(isinstance(h, InjectedDropout) for h in m._forward_pre_hooks.values())
        ]
        if not active:
            raise ValueError(
                f"{type(model).__name__} has no dropout with p > 0, so MC-dropout samples "
                "would all be equal; add dropout to the model or inject it (inject_dropout)"
            )
        for m in active:
            m.train()
            if type(m) is nn.Dropout and not m.inplace and "forward" not in vars(m):
                # the same distribution, sampled faster on the CPU (see sampled_dropout)
                m.forward = types.MethodType(_sampled_forward, m)  # type: ignore[method-assign]
                swapped.append(m)
        yield
    finally:
        for m in swapped:
            vars(m).pop("forward", None)
        _restore(modes)


def _restore(modes: Mapping[nn.Module, bool]) -> None:
    """Give every module back its own train/eval flag (flag by flag: ``Module.train`` would
    walk each module's whole subtree again)."""
    for module, mode in modes.items():
        module.training = mode


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` inside the block; every module's mode is restored on exit."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        _restore(modes)


def probe_feature_shapes(
    model: nn.Module, names: Sequence[str], input_shape: Sequence[int]
) -> dict[str, tuple[torch.Size, ...]]:
    """Output shapes (one per level) of named layers for a zero input ``[1, *input_shape]``.

    Runs in eval mode without gradients; used at construction so ``feature_info`` is known
    before any forward on data. Layers come in the order of their first call.

    Raises:
        ValueError: when the model does not accept an input of that shape.
    """
    device = next(model.parameters()).device
    capture = capture_outputs(model, names, skip_non_tensors=True)
    with torch.no_grad(), eval_mode(model), capture as store:
        try:
            model(torch.zeros(1, *input_shape, device=device))
        except (RuntimeError, AssertionError, ValueError) as err:  # ViT asserts its size
            raise ValueError(
                f"a zero input of input_shape={tuple(input_shape)} does not fit "
                f"{type(model).__name__} ({err}); pass the (C, H, W) of one real input"
            ) from err
    return {n: tuple(t.shape for t in as_levels(store[n])) for n in store}


def active_dropout(model: nn.Module) -> list[str]:
    """Names of the modules :func:`mc_dropout` switches on: dropout modules with ``p > 0``
    and modules carrying an :class:`InjectedDropout`, in registration order."""
    return [
        name
        for name, m in model.named_modules()
        if (isinstance(m, _DROPOUT) and m.p > 0)
        or any(isinstance(h, InjectedDropout) for h in m._forward_pre_hooks.values())
    ]


def rng_state(device: torch.device) -> Tensor | None:
    """The state of the generator that dropout on ``device`` draws from (CPU or CUDA);
    ``None`` for other devices."""
    if device.type == "cpu":
        return torch.get_rng_state()
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return None


def set_rng_state(device: torch.device, state: Tensor | None) -> None:
    """Restore a state from :func:`rng_state` (nothing for ``None``)."""
    if state is None:
        return
    if device.type == "cpu":
        torch.set_rng_state(state)
    elif device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
