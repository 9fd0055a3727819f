"""Small torchvision detectors that train from scratch on a CPU (demos, simulations, tests).

torchvision's own builders (``retinanet_resnet50_fpn``, ...) put a ResNet-50 under every
detector, which needs minutes per round on two CPU cores. :func:`small_detector` assembles
the same torchvision detector classes (``RetinaNet``, ``FCOS``, ``FasterRCNN``) around a
four-stage convolutional backbone and a narrow FPN instead; nothing of torchvision is
copied, only its public building blocks are combined.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from taskal.registry import MODELS

ARCHS = ("retinanet", "fcos", "faster_rcnn")


def _stage(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convolutions with BatchNorm and ReLU, the first with stride 2."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def small_backbone(width: int = 16, fpn_channels: int = 64) -> BackboneWithFPN:
    """Four stride-2 stages (``width``, 2x, 4x, 8x channels) under an FPN.

    The FPN reads the stages at strides 4, 8 and 16 (levels ``"0"``..``"2"``) and adds a
    max-pooled level at stride 32 (``"pool"``), as torchvision names them.
    """
    if width < 1 or fpn_channels < 1:
        raise ValueError(f"width and fpn_channels must be >= 1, got {width}, {fpn_channels}")
    widths = [width, 2 * width, 4 * width, 8 * width]
    body = nn.Sequential(
        OrderedDict(
            s1=_stage(3, widths[0]),
            s2=_stage(widths[0], widths[1]),
            s3=_stage(widths[1], widths[2]),
            s4=_stage(widths[2], widths[3]),
        )
    )
    return BackboneWithFPN(
        body,
        {"s2": "0", "s3": "1", "s4": "2"},
        widths[1:],
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


@MODELS.register_module(name="small_detector")
def small_detector(
    arch: str,
    num_classes: int,
    image_size: int = 96,
    width: int = 16,
    fpn_channels: int = 64,
    anchor_sizes: tuple[int, ...] = (12, 24, 48, 96),
    detections_per_img: int = 50,
    **kwargs: Any,
) -> nn.Module:
    """A torchvision ``RetinaNet``, ``FCOS`` or ``FasterRCNN`` on :func:`small_backbone`.

    Args:
        arch: ``"retinanet"``, ``"fcos"`` or ``"faster_rcnn"``.
        num_classes: as torchvision counts them: ``C`` for RetinaNet and FCOS, ``C + 1``
            (background first) for Faster R-CNN.
        image_size: ``min_size`` and ``max_size`` of the detector's transform: images of
            this size are not resized.
        width: channels of the backbone's first stage (doubled at each of the four).
        fpn_channels: channels of every FPN level (and of the heads).
        anchor_sizes: one anchor size per FPN level (strides 4, 8, 16, 32), in pixels of
            the resized image; RetinaNet and Faster R-CNN add ratios 0.5, 1 and 2.
        detections_per_img: boxes kept per image after NMS.
        **kwargs: passed to the detector class (``score_thresh``, ``nms_thresh``, ...).
    """
    if arch not in ARCHS:
        raise KeyError(f"unknown small detector arch {arch!r}; choose one of {ARCHS}")
    if len(anchor_sizes) != 4:
        raise ValueError(
            f"anchor_sizes needs one size per FPN level (4), got {tuple(anchor_sizes)}"
        )
    backbone = small_backbone(width, fpn_channels)
    sizes = dict(min_size=image_size, max_size=image_size)
    if arch == "fcos":
        anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((1.0,),) * 4)
        return FCOS(
            backbone,
            num_classes,
            anchor_generator=anchors,
            detections_per_img=detections_per_img,
            **sizes,
            **kwargs,
        )
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 4)
    if arch == "retinanet":
        return RetinaNet(
            backbone,
            num_classes,
            anchor_generator=anchors,
            detections_per_img=detections_per_img,
            **sizes,
            **kwargs,
        )
    hidden = 4 * fpn_channels
    kwargs = {
        "rpn_pre_nms_top_n_train": 500,
        "rpn_post_nms_top_n_train": 250,
        "rpn_pre_nms_top_n_test": 250,
        "rpn_post_nms_top_n_test": 100,
        "box_batch_size_per_image": 128,
        **kwargs,
    }
    return FasterRCNN(
        backbone,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], output_size=5, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_channels * 5 * 5, hidden),
        box_predictor=FastRCNNPredictor(hidden, num_classes),
        box_detections_per_img=detections_per_img,
        **sizes,
        **kwargs,
    )


__all__ = ["ARCHS", "small_backbone", "small_detector"]
