"""Helpers shared by adapters: forward-hook feature capture and test-time MC dropout."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@contextlib.contextmanager
def capture_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of ``model``'s named submodules during forwards inside the block.

    The hooks are always removed on exit (``try/finally``).
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"no submodule named {missing} in {type(model).__name__}")
    store: dict[str, Tensor] = {}
    handles = []
    try:
        for name in names:

            def hook(_m: nn.Module, _inp: object, out: object, name: str = name) -> None:
                if isinstance(out, (tuple, list)):
                    out = out[0]
                assert isinstance(out, Tensor)
                store[name] = out

            handles.append(modules[name].register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def mc_dropout(
    model: nn.Module, inject_at: nn.Module | None = None, p: float = 0.5
) -> Iterator[None]:
    """Turn dropout on at test time only; BatchNorm and the rest stay in eval mode.

    Every dropout module with ``p > 0`` is switched to train mode. When the model has none
    (torchvision's ViT and Swin hold ``Dropout(p=0)``), dropout with
    probability ``p`` is injected on the input of ``inject_at`` (the classifier) through a
    forward pre-hook, with a warning, as in baal's ``patch_module``. Everything is restored
    on exit.
    """
    modes = {m: m.training for m in model.modules()}
    handle = None
    try:
        model.eval()
        dropouts = [m for m in model.modules() if isinstance(m, _DROPOUT) and m.p > 0]
        for m in dropouts:
            m.train()
        if not dropouts:
            if inject_at is None:
                raise ValueError("the model has no dropout module and no layer to inject it at")
            warnings.warn(
                f"{type(model).__name__} has no dropout layer with p > 0: injecting "
                f"dropout(p={p}) on the classifier input for MC sampling. Train with dropout "
                "there for calibrated samples.",
                stacklevel=3,
            )

            def pre_hook(_m: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
                return (F.dropout(args[0], p=p, training=True), *args[1:])

            handle = inject_at.register_forward_pre_hook(pre_hook)
        yield
    finally:
        if handle is not None:
            handle.remove()
        for module, mode in modes.items():
            module.train(mode)


def probe_feature_shapes(
    model: nn.Module, names: Sequence[str], input_shape: Sequence[int]
) -> dict[str, torch.Size]:
    """Output shapes of named layers for one zero input ``[1, *input_shape]`` in eval mode.

    Used once at construction so ``feature_info`` is known before any forward on data.
    """
    modes = {m: m.training for m in model.modules()}
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad(), capture_outputs(model, names) as store:
            try:
                model(torch.zeros(1, *input_shape, device=device))
            except RuntimeError as err:
                raise ValueError(
                    f"a zero input of input_shape={tuple(input_shape)} does not fit "
                    f"{type(model).__name__} ({err}); pass the (C, H, W) of one real input"
                ) from err
        return {n: out.shape for n, out in store.items()}  # completion order
    finally:
        for m, mode in modes.items():
            m.train(mode)
