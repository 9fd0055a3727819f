"""The small torchvision detectors taskal builds for CPU demos and simulations."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

from taskal.adapters import TorchvisionDetectionAdapter
from taskal.detectors import small_detector
from taskal.registry import MODELS, build

pytestmark = pytest.mark.filterwarnings("ignore:.*has no dropout with p > 0")


@pytest.mark.parametrize(
    "arch, cls", [("retinanet", RetinaNet), ("fcos", FCOS), ("faster_rcnn", FasterRCNN)]
)
def test_builds_trains_and_predicts_in_the_adapter(arch: str, cls: type) -> None:
    torch.manual_seed(0)
    model = build(MODELS, dict(type="small_detector", arch=arch, num_classes=3, width=4))
    assert isinstance(model, cls)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]), "labels": torch.tensor([2])},
    ]
    model.train()
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    adapter = TorchvisionDetectionAdapter(model)
    assert [f.name for f in adapter.feature_info] == ["body", "fpn"]
    assert len(adapter.feature_info[1].strides) == 4  # strides 4..32


def test_bad_arguments() -> None:
    with pytest.raises(KeyError, match="unknown small detector arch"):
        small_detector("yolo", 3)
    with pytest.raises(ValueError, match="one size per FPN level"):
        small_detector("retinanet", 3, anchor_sizes=(8, 16))
    with pytest.raises(ValueError, match="width and fpn_channels"):
        small_detector("retinanet", 3, width=0)
