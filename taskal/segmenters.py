"""A small torchvision segmentation model for CPU simulations and tests.

:func:`small_segmenter` assembles torchvision's own ``FCN`` or ``DeepLabV3`` (with their
``FCNHead`` / ``DeepLabHead``) on a 3-stage convolutional backbone of stride 8, returned
through torchvision's ``IntermediateLayerGetter`` as the shipped models' backbones are, so
:class:`~taskal.adapters.TorchvisionSegmentationAdapter` treats it like them. Nothing is
downloaded.
"""

from __future__ import annotations

from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCN, FCNHead

from taskal.registry import MODELS

ARCHS = ("fcn", "deeplabv3")


def _stage(c_in: int, c_out: int, stride: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, 1, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


@MODELS.register_module(name="small_segmenter")
def small_segmenter(
    num_classes: int, arch: str = "fcn", width: int = 16, in_channels: int = 3
) -> nn.Module:
    """torchvision's ``FCN`` or ``DeepLabV3`` on a small CNN (strides 2, 4, 8; widths
    ``width``, ``2 * width``, ``4 * width``; the last stage dilated).

    Args:
        num_classes: classes the classifier scores, background included.
        arch: ``"fcn"`` (``FCNHead``: 3x3 conv, BN, ReLU, ``Dropout(0.1)``, 1x1 conv) or
            ``"deeplabv3"`` (``DeepLabHead`` with atrous rates 2, 4, 6 for small inputs).
        width: channels of the first stage.
        in_channels: input channels.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if num_classes < 2 or width < 1:
        raise ValueError(f"need num_classes >= 2 and width >= 1, got {num_classes}, {width}")
    body = nn.Sequential()
    body.add_module("layer1", _stage(in_channels, width, 2))
    body.add_module("layer2", _stage(width, 2 * width, 2))
    body.add_module("layer3", _stage(2 * width, 4 * width, 2, dilation=2))
    # every stage is returned (the heads read "out"), so LLAL and the features see 3 levels
    layers = {"layer1": "layer1", "layer2": "layer2", "layer3": "out"}
    backbone = IntermediateLayerGetter(body, return_layers=layers)
    if arch == "fcn":
        return FCN(backbone, FCNHead(4 * width, num_classes))
    return DeepLabV3(backbone, DeepLabHead(4 * width, num_classes, atrous_rates=(2, 4, 6)))
