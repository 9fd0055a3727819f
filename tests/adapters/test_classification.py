from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from taskal.adapters import ClassificationAdapter
from taskal.adapters._hooks import capture_outputs, inject_dropout
from taskal.models import SmallCNN, torchvision_classifier
from taskal.types import Batch, Units, as_levels

from .conformance import AdapterConformance

NO_DROPOUT = "ignore:.*has no dropout with p > 0"


def _batch(channels: int = 1, size: int = 8, n: int = 4) -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch(
        torch.rand(n, channels, size, size, generator=g),
        [f"img{i}" for i in range(n)],
        torch.arange(n) % 3,
    )


class TestSmallCNN(AdapterConformance):
    def make_adapter(self, seed: int = 0) -> ClassificationAdapter:
        torch.manual_seed(seed)
        return ClassificationAdapter(SmallCNN(1, 3, width=8), input_shape=(1, 8, 8))

    def make_batch(self) -> Batch:
        return _batch()

    def test_feature_layers_found(self) -> None:
        info = self.make_adapter().feature_info
        assert [(f.name, f.channels, f.strides, f.module) for f in info] == [
            ("block1", 8, (1,), "block1"),
            ("block2", 16, (2,), "block2"),
            ("block3", 32, (4,), "block3"),
        ]

    def test_list_inputs_are_stacked(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        as_list = Batch(list(batch.inputs), batch.ids, batch.targets)
        assert torch.equal(adapter.predict(as_list).probs_UCK, adapter.predict(batch).probs_UCK)
        ragged = Batch([torch.rand(1, 8, 8), torch.rand(1, 9, 8)], ["a", "b"])
        with pytest.raises(ValueError, match="same-size inputs"):
            adapter.predict(ragged)

    def test_units_are_the_images(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        pred = adapter.predict(batch)
        assert torch.equal(pred.owner_U, torch.arange(4))
        assert pred.unit_U is not None and torch.equal(
            pred.unit_U, torch.zeros(4, dtype=torch.long)
        )
        wrong = Units(torch.arange(3), torch.zeros(3, dtype=torch.long))
        with pytest.raises(ValueError, match="units do not match"):
            adapter.predict(batch, units=wrong)


@pytest.mark.filterwarnings(NO_DROPOUT)
class TestTorchvisionResNet(AdapterConformance):
    """A torchvision builder with no dropout: dropout is added before ``fc``."""

    def make_adapter(self, seed: int = 0) -> ClassificationAdapter:
        torch.manual_seed(seed)
        model = torchvision_classifier("resnet18", num_classes=3, in_channels=1)
        return ClassificationAdapter(model, input_shape=(1, 32, 32))

    def make_batch(self) -> Batch:
        return _batch(size=32, n=2)

    def test_resnet_stages_found(self) -> None:
        info = self.make_adapter().feature_info
        assert [f.name for f in info] == ["conv1", "layer1", "layer2", "layer3", "layer4"]
        assert [f.strides for f in info] == [(2,), (4,), (8,), (16,), (32,)]
        assert [f.channels for f in info] == [64, 64, 128, 256, 512]


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

    def make_adapter(self, seed: int = 0) -> ClassificationAdapter:
        torch.manual_seed(seed)
        return ClassificationAdapter(
            self.Net(),
            input_shape=(1, 8, 8),
            classifier="head",
            feature_layers=["stem", "down", "deep"],
        )

    def make_batch(self) -> Batch:
        return _batch()


class TinySwin(torchvision.models.SwinTransformer):
    """torchvision's Swin, narrow and shallow: channels-last ``[B, H, W, C]`` stages."""

    def __init__(self) -> None:
        super().__init__(
            patch_size=[4, 4],
            embed_dim=12,
            depths=[1, 1],
            num_heads=[1, 2],
            window_size=[4, 4],
            num_classes=3,
        )


@pytest.mark.filterwarnings(NO_DROPOUT)
class TestChannelsLastSwin(AdapterConformance):
    """Swin's stages are ``[B, H, W, C]``: features come permuted to ``[B, C, H, W]``."""

    def make_adapter(self, seed: int = 0) -> ClassificationAdapter:
        torch.manual_seed(seed)
        return ClassificationAdapter(TinySwin(), input_shape=(3, 32, 32))

    def make_batch(self) -> Batch:
        g = torch.Generator().manual_seed(0)
        return Batch(torch.rand(2, 3, 32, 32, generator=g), ["a", "b"], torch.tensor([0, 2]))

    def make_bad_batch(self) -> Batch:
        return Batch([torch.zeros(99, 32, 32)], ["bad"])

    def test_channels_last_stages(self) -> None:
        info = self.make_adapter().feature_info
        assert [(f.name, f.channels, f.strides) for f in info] == [
            ("features.1", 12, (4,)),
            ("features", 24, (8,)),
        ]


@pytest.mark.filterwarnings(NO_DROPOUT)
def test_swin_t_stage_widths_and_strides() -> None:
    """torchvision's Swin-T: stages of 96, 192, 384, 768 channels at strides 4 to 32."""
    torch.manual_seed(0)
    model = torchvision.models.swin_t(weights=None, num_classes=3)
    adapter = ClassificationAdapter(model, input_shape=(3, 32, 32))
    assert [f.channels for f in adapter.feature_info] == [96, 192, 384, 768]
    assert [f.strides for f in adapter.feature_info] == [(4,), (8,), (16,), (32,)]
    feats = adapter.features(Batch(torch.rand(1, 3, 32, 32), ["x"]))
    assert [tuple(as_levels(x)[0].shape) for x in feats.values()] == [
        (1, 96, 8, 8),
        (1, 192, 4, 4),
        (1, 384, 2, 2),
        (1, 768, 1, 1),
    ]
    explicit = ClassificationAdapter(
        model, input_shape=(3, 32, 32), feature_layers=["features.1", "features.3"]
    )
    assert [(f.channels, f.strides) for f in explicit.feature_info] == [(96, (4,)), (192, (8,))]


def test_dropout_added_at_construction_is_active_in_training() -> None:
    """A model without dropout trains with the dropout that MC sampling later uses."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = ClassificationAdapter(model, input_shape=(3, 32, 32))
    pooled, fc_in = [], []
    model.avgpool.register_forward_hook(lambda _m, _i, out: pooled.append(out.flatten(1)))
    model.fc.register_forward_pre_hook(lambda _m, args: fc_in.append(args[0]))
    model.train()
    model(torch.rand(8, 3, 32, 32))
    live = pooled[0] != 0  # ReLU zeros are not dropout's
    dropped = (fc_in[0] == 0) & live
    assert 0.35 < float(dropped.sum() / live.sum()) < 0.65, "training drops the classifier input"
    kept = live & ~dropped
    assert torch.allclose(fc_in[0][kept], 2 * pooled[0][kept])  # scaled by 1 / (1 - p)
    model.eval()
    model(torch.rand(4, 3, 32, 32))
    assert torch.equal(fc_in[1], pooled[1]), "no dropout in eval mode"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "ResNet has no dropout with p > 0" in messages[0]
    assert "dropout(p=0.5) on the classifier input" in messages[0]
    batch = Batch(torch.rand(2, 3, 32, 32), ["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, at construction
        a, b = adapter.predict(batch), adapter.predict(batch)
        samples = adapter.predict(batch, n_samples=3).probs_UCK
    assert torch.equal(a.probs_UCK, b.probs_UCK)
    assert not torch.allclose(samples[..., 0], samples[..., 1])
    assert not model.training


def test_dropout_is_added_once_per_model() -> None:
    model = SmallCNN(1, 3, width=4, dropout=0.0)
    with pytest.warns(UserWarning, match="no dropout with p > 0"):
        ClassificationAdapter(model, input_shape=(1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter = ClassificationAdapter(model, input_shape=(1, 8, 8))
    assert len(model.fc._forward_pre_hooks) == 1
    pickle.loads(pickle.dumps(model))  # the added dropout keeps the model picklable
    probs = adapter.predict(_batch(), n_samples=3).probs_UCK
    assert not torch.allclose(probs[..., 0], probs[..., 1])


def test_config_dict_builds_model() -> None:
    adapter = ClassificationAdapter(
        {"type": "SmallCNN", "in_channels": 1, "num_classes": 4, "width": 4}, input_shape=(1, 8, 8)
    )
    assert adapter.num_classes == 4


def test_input_shape_that_does_not_fit() -> None:
    with pytest.raises(ValueError, match=r"input_shape=\(3, 8, 8\) does not fit"):
        ClassificationAdapter(SmallCNN(1, 3, width=4), input_shape=(3, 8, 8))


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


def test_batch_ids_must_match() -> None:
    with pytest.raises(ValueError, match="one stable id per item"):
        Batch(torch.zeros(3, 1, 8, 8), ["a", "b"])


# -- capture_outputs ----------------------------------------------------------------------
class SharedHead(nn.Module):
    """A head called once per level and a neck returning a tuple, as in RetinaNet."""

    def __init__(self) -> None:
        super().__init__()
        self.neck = Neck()
        self.head = nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.head(f) for f in self.neck(x)]


class Neck(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return x, x[..., ::2, ::2], x[..., ::4, ::4]


def test_capture_keeps_every_call_and_every_tuple_element() -> None:
    model = SharedHead()
    x = torch.rand(1, 2, 8, 8, requires_grad=True)
    with capture_outputs(model, ["neck", "head"]) as store:
        outs = model(x)
    assert list(store) == ["neck", "head"]
    head, neck = store["head"], store["neck"]
    assert isinstance(head, tuple) and isinstance(neck, tuple)
    assert [t.shape[-1] for t in head] == [8, 4, 2] == [t.shape[-1] for t in neck]
    assert all(a is b for a, b in zip(head, outs, strict=True))
    torch.stack([t.sum() for t in head]).sum().backward()  # gradients flow through captures
    assert x.grad is not None and not model.head._forward_hooks


def test_capture_single_level_is_a_tensor_and_clear_resets() -> None:
    model = SmallCNN(1, 3, width=4)
    with capture_outputs(model, {"mid": "block2"}) as store:
        model(torch.rand(2, 1, 8, 8)).sum().backward()
        mid = store["mid"]
        assert isinstance(mid, torch.Tensor) and mid.requires_grad
        with pytest.raises(TypeError):
            store["mid"] = mid  # type: ignore[index]
        store.clear()
        assert len(store) == 0 and "mid" not in store
    assert all(not m._forward_hooks for m in model.modules())


def test_capture_removes_hooks_when_the_forward_fails() -> None:
    model = SmallCNN(1, 3, width=4)
    with pytest.raises(RuntimeError), capture_outputs(model, ["block1"]):
        model(torch.rand(2, 5, 8, 8))
    assert all(not m._forward_hooks for m in model.modules())


def test_capture_refuses_an_output_without_tensors() -> None:
    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> None:
            return None

    model = nn.Sequential(Probe())
    with pytest.raises(TypeError, match="holding no tensor"), capture_outputs(model, ["0"]):
        model(torch.rand(1))
    assert not model[0]._forward_hooks


# -- MC dropout on cached features ----------------------------------------------------------
def _full_reruns(adapter: ClassificationAdapter, x: torch.Tensor, n: int) -> torch.Tensor:
    """The reference: ``n`` full forwards under MC dropout, softmax stacked last."""
    with torch.no_grad(), adapter.stochastic():
        return torch.stack([torch.softmax(adapter.model(x).float(), 1) for _ in range(n)], -1)


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]

    def hook(_m: nn.Module, _args: object, _out: object) -> None:
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


class TinyEfficientNetHead(nn.Module):
    """EfficientNet's layout: ``classifier = Sequential(Dropout(inplace=True), Linear)``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.3, inplace=True), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _resnet() -> tuple[nn.Module, str]:
    return torchvision_classifier("resnet18", num_classes=3, in_channels=1), "layer4"


def _smallcnn() -> tuple[nn.Module, str]:
    return SmallCNN(1, 3, width=8), "block3"


def _mobilenet() -> tuple[nn.Module, str]:
    model = torchvision_classifier("mobilenet_v3_small", num_classes=3, in_channels=1)
    # from scratch its features are ~1e-8: biases and weights that make the samples differ
    nn.init.normal_(model.classifier[0].bias, std=1.0)
    nn.init.normal_(model.classifier[-1].weight, std=1.0)
    return model, "features"


def _efficientnet_like() -> tuple[nn.Module, str]:
    return TinyEfficientNetHead(), "features"


@pytest.mark.filterwarnings(NO_DROPOUT)
@pytest.mark.parametrize(
    ("build", "rerun"),
    [
        (_resnet, ("fc",)),  # dropout injected on the classifier input
        (_smallcnn, ("dropout", "fc")),  # a dropout module, then the classifier
        (_mobilenet, ("classifier",)),  # torchvision's classifier Sequential
        (_efficientnet_like, ("classifier",)),  # in-place dropout first in the Sequential
    ],
)
def test_mc_samples_rerun_only_the_dropout_part(build, rerun) -> None:  # type: ignore[no-untyped-def]
    """One forward of the network, then only the part holding the dropout; the samples are
    those of full re-runs from the same RNG state, and the RNG ends where theirs does."""
    torch.manual_seed(0)
    model, trunk = build()
    adapter = ClassificationAdapter(model, input_shape=(1, 32, 32))
    calls = _count_calls(model.get_submodule(trunk))
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    batch = Batch(x, ["a", "b", "c"])
    assert adapter.mc_rerun is None  # found at the first MC call
    for _ in range(2):  # the first call finds and checks the part, the second reuses it
        torch.manual_seed(5)
        cached = adapter.predict(batch, n_samples=5).probs_UCK
        after_cached = torch.get_rng_state()
        assert adapter.mc_rerun == rerun
        assert calls[0] == 1, "the network runs once per MC call"
        calls[0] = 0
        torch.manual_seed(5)
        reference = _full_reruns(adapter, x, 5)
        calls[0] = 0
        assert torch.equal(cached, reference)
        assert torch.equal(after_cached, torch.get_rng_state())
    assert not torch.allclose(cached[..., 0], cached[..., 1])
    assert all(not m._forward_hooks or m is model.get_submodule(trunk) for m in model.modules())


class DropoutInBlock(nn.Module):
    """Dropout in the middle of the network: MC samples must re-run all of it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.3))
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.stem(x).mean((2, 3))))


class WorkAfterClassifier(nn.Module):
    """The classifier (with dropout injected) is not the last step: a temperature follows."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stem(x).mean((2, 3))) / 2.0


class FunctionalDropout(nn.Module):
    """A module holding every dropout module, but with more dropout drawn outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(self.stem(x), 0.2, training=self.head[0].training)
        return self.head(h.mean((2, 3)))


@pytest.mark.filterwarnings(NO_DROPOUT)
@pytest.mark.parametrize("net", [DropoutInBlock, WorkAfterClassifier, FunctionalDropout])
def test_mc_falls_back_to_full_reruns(net: type[nn.Module]) -> None:
    """No part reproduces the model's output from the same RNG state: full re-runs."""
    torch.manual_seed(0)
    model = net()
    adapter = ClassificationAdapter(model, input_shape=(1, 8, 8), feature_layers=["stem"])
    calls = _count_calls(model.stem)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        torch.manual_seed(5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sampled = adapter.predict(Batch(x, ["a", "b"]), n_samples=4).probs_UCK
        assert adapter.mc_rerun is None and calls[0] == 4
        torch.manual_seed(5)
        assert torch.equal(sampled, _full_reruns(adapter, x, 4))
        calls[0] = 0
    assert not torch.allclose(sampled[..., 0], sampled[..., 1])


def test_mc_part_found_again_when_dropout_changes() -> None:
    """Dropout injected after the first MC call (elsewhere): the part is checked again."""
    torch.manual_seed(0)
    model = SmallCNN(1, 3, width=4)
    adapter = ClassificationAdapter(model, input_shape=(1, 8, 8))
    batch = _batch()
    adapter.predict(batch, n_samples=2)
    assert adapter.mc_rerun == ("dropout", "fc")
    inject_dropout(model.block2, 0.2)
    torch.manual_seed(5)
    sampled = adapter.predict(batch, n_samples=3).probs_UCK
    assert adapter.mc_rerun is None
    torch.manual_seed(5)
    assert torch.equal(sampled, _full_reruns(adapter, batch.inputs, 3))


def test_predict_and_embed_is_one_forward() -> None:
    torch.manual_seed(0)
    adapter = ClassificationAdapter(SmallCNN(1, 3, width=4), input_shape=(1, 8, 8))
    batch = _batch()
    calls: list[int] = []
    adapter.model.register_forward_hook(lambda *_: calls.append(1))
    predictions, embeddings = adapter.predict_and_embed(batch)
    assert len(calls) == 1
    assert torch.equal(predictions.probs_UCK, adapter.predict(batch).probs_UCK)
    assert torch.equal(embeddings, adapter.embed(batch))
    calls.clear()
    torch.manual_seed(1)
    sampled, _ = adapter.predict_and_embed(batch, n_samples=3)
    assert sampled.probs_UCK.shape[-1] == 3
