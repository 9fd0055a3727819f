from __future__ import annotations

import pytest
import torch
from torch import nn

from taskal.adapters import ClassificationAdapter
from taskal.adapters._hooks import capture_outputs
from taskal.models import SmallCNN, torchvision_classifier
from taskal.types import Batch

from .conformance import AdapterConformance


def _batch(channels: int = 1, size: int = 8, n: int = 4) -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch(
        torch.rand(n, channels, size, size, generator=g),
        [f"img{i}" for i in range(n)],
        torch.arange(n) % 3,
    )


class TestSmallCNN(AdapterConformance):
    def make_adapter(self) -> ClassificationAdapter:
        torch.manual_seed(0)
        return ClassificationAdapter(SmallCNN(1, 3, width=8), input_shape=(1, 8, 8))

    def make_batch(self) -> Batch:
        return _batch()

    def test_feature_layers_found(self) -> None:
        info = self.make_adapter().feature_info
        assert [(f.name, f.channels, f.stride) for f in info] == [
            ("block1", 8, 1),
            ("block2", 16, 2),
            ("block3", 32, 4),
        ]


@pytest.mark.filterwarnings("ignore:ResNet has no dropout layer")
class TestTorchvisionResNet(AdapterConformance):
    """A torchvision builder with no dropout: MC dropout is injected before ``fc``."""

    def make_adapter(self) -> ClassificationAdapter:
        torch.manual_seed(0)
        model = torchvision_classifier("resnet18", num_classes=3, in_channels=1)
        return ClassificationAdapter(model, input_shape=(1, 32, 32))

    def make_batch(self) -> Batch:
        return _batch(size=32, n=2)

    def test_resnet_stages_found(self) -> None:
        info = self.make_adapter().feature_info
        assert [f.name for f in info] == ["conv1", "layer1", "layer2", "layer3", "layer4"]
        assert [f.stride for f in info] == [2, 4, 8, 16, 32]
        assert [f.channels for f in info] == [64, 64, 128, 256, 512]

    def test_injected_dropout_warns(self) -> None:
        adapter = self.make_adapter()
        with pytest.warns(UserWarning, match="injecting dropout"):
            adapter.predict(self.make_batch(), n_samples=2)


class TestUserModule(AdapterConformance):
    """A user nn.Module with a named classifier layer and explicit feature layers."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
            self.deep = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.drop = nn.Dropout(0.5)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.deep(torch.relu(self.down(torch.relu(self.stem(x)))))
            return self.head(self.drop(x.mean((2, 3))))

    def make_adapter(self) -> ClassificationAdapter:
        torch.manual_seed(0)
        return ClassificationAdapter(
            self.Net(),
            input_shape=(1, 8, 8),
            classifier="head",
            feature_layers=["stem", "down", "deep"],
        )

    def make_batch(self) -> Batch:
        return _batch()


def test_config_dict_builds_model() -> None:
    adapter = ClassificationAdapter(
        {"type": "SmallCNN", "in_channels": 1, "num_classes": 4, "width": 4}, input_shape=(1, 8, 8)
    )
    assert adapter.num_classes == 4


def test_input_shape_that_does_not_fit() -> None:
    with pytest.raises(ValueError, match=r"input_shape=\(3, 8, 8\) does not fit"):
        ClassificationAdapter(SmallCNN(1, 3, width=4), input_shape=(3, 8, 8))


def test_zero_probability_dropout_is_not_mc_dropout() -> None:
    model = SmallCNN(1, 3, width=4, dropout=0.0)
    adapter = ClassificationAdapter(model, input_shape=(1, 8, 8))
    with pytest.warns(UserWarning, match="no dropout layer with p > 0"):
        probs = adapter.predict(_batch(), n_samples=3).probs_UCK
    assert not torch.allclose(probs[..., 0], probs[..., 1])


def test_bad_classifier_name() -> None:
    with pytest.raises(ValueError, match=r"nn\.Linear"):
        ClassificationAdapter(SmallCNN(1, 3, width=4), input_shape=(1, 8, 8), classifier="block1")


def test_unknown_feature_layer() -> None:
    adapter = ClassificationAdapter(SmallCNN(1, 3, width=4), input_shape=(1, 8, 8))
    with pytest.raises(KeyError, match="exposes"):
        adapter.features(_batch(), ["nope"])


def test_weights_download_refused() -> None:
    with pytest.raises(ValueError, match="never downloads"):
        torchvision_classifier("resnet18", num_classes=3, weights="DEFAULT")


def test_capture_gradients_flow() -> None:
    model = SmallCNN(1, 3, width=4)
    with capture_outputs(model, ["block2"]) as store:
        model(torch.rand(2, 1, 8, 8)).sum().backward()
    assert store["block2"].requires_grad
    assert all(not m._forward_hooks for m in model.modules())


def test_batch_ids_must_match() -> None:
    with pytest.raises(ValueError, match="one stable id per item"):
        Batch(torch.zeros(3, 1, 8, 8), ["a", "b"])
