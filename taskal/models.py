"""Model builders registered in :data:`taskal.registry.MODELS`.

``torchvision`` builds any torchvision classification architecture with ``weights=None``
(taskal never downloads weights); ``SmallCNN`` is a compact network for small images such
as scikit-learn's 8x8 digits, with dropout before its classifier for MC sampling.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from taskal.registry import MODELS, build


@MODELS.register_module(name="torchvision")
def torchvision_classifier(
    name: str, num_classes: int, in_channels: int = 3, **kwargs: Any
) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=...)``.

    Args:
        name: a torchvision classification builder, e.g. ``"resnet18"``.
        num_classes: output classes.
        in_channels: 3 for RGB; other values replace the first convolution.
        **kwargs: passed to the builder. ``weights`` must be ``None``: no downloads.
    """
    import torchvision

    if kwargs.pop("weights", None) is not None:
        raise ValueError(
            "taskal never downloads weights: pass weights=None and load a local "
            "checkpoint into the built model instead."
        )
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise KeyError(f"unknown torchvision classifier {name!r}; available: {sorted(available)}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                new = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    child.kernel_size,  # type: ignore[arg-type]
                    child.stride,  # type: ignore[arg-type]
                    child.padding,  # type: ignore[arg-type]
                    bias=child.bias is not None,
                )
                setattr(parent, child_name, new)
                return
    raise ValueError("found no 3-channel first convolution to replace")


def _block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


@MODELS.register_module()
class SmallCNN(nn.Module):
    """Three conv blocks (strides 1, 2, 4), global pooling, dropout, linear classifier.

    Feature layers for LLAL and core-set: ``block1``, ``block2``, ``block3``; the
    classifier is ``fc``.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 16, dropout: float = 0.25
    ) -> None:
        super().__init__()
        self.block1 = _block(in_channels, width, pool=False)
        self.block2 = _block(width, 2 * width, pool=True)
        self.block3 = _block(2 * width, 4 * width, pool=True)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(self.dropout(self.pool(x)))


def build_model(cfg: dict[str, Any]) -> nn.Module:
    """Build a model config from :data:`MODELS`."""
    model = build(MODELS, cfg)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model config {cfg!r} built a {type(model).__name__}, not an nn.Module")
    return model


__all__ = ["SmallCNN", "build_model", "torchvision_classifier"]
