"""The torchvision detection adapter (Faster R-CNN, RetinaNet, FCOS) against the contract."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from taskal.adapters import EnsembleAdapter, TorchvisionDetectionAdapter
from taskal.registry import ADAPTERS, MODELS, build
from taskal.types import Adapter, Batch, Units, same_units

from .conformance import AdapterConformance

NO_DROPOUT = "ignore:.*has no dropout with p > 0"
pytestmark = pytest.mark.filterwarnings(NO_DROPOUT)

#: min_size / max_size of the tiny detectors: the test images (min side 64, max side 96)
#: keep their size, so the maps cover the padded batch exactly as the template expects.
SIZES = dict(min_size=64, max_size=96)


def _backbone() -> BackboneWithFPN:
    """Three strided convolutions; the FPN reads strides 4 and 8 and adds a pooled 16."""

    def conv(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU()
        )

    body = nn.Sequential(OrderedDict(stem=conv(3, 8), c1=conv(8, 8), c2=conv(8, 16)))
    return BackboneWithFPN(body, {"c1": "0", "c2": "1"}, [8, 16], out_channels=32)


def faster_rcnn(num_classes: int = 3) -> FasterRCNN:
    return FasterRCNN(
        _backbone(),
        rpn_anchor_generator=AnchorGenerator(((16,), (32,), (64,)), ((0.5, 1.0, 2.0),) * 3),
        box_roi_pool=MultiScaleRoIAlign(["0", "1"], output_size=4, sampling_ratio=2),
        box_head=TwoMLPHead(32 * 4 * 4, 16),
        box_predictor=FastRCNNPredictor(16, num_classes),
        rpn_pre_nms_top_n_test=50,
        rpn_post_nms_top_n_test=20,
        box_detections_per_img=6,
        **SIZES,
    )


def _spread(head: nn.Module) -> None:
    """Wider initial conv weights than torchvision's std 0.01, so MC samples visibly differ."""
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.1)


def retinanet(num_classes: int = 3) -> RetinaNet:
    model = RetinaNet(
        _backbone(),
        num_classes=num_classes,
        anchor_generator=AnchorGenerator(((16,), (32,), (64,)), ((0.5, 1.0, 2.0),) * 3),
        score_thresh=0.005,
        detections_per_img=6,
        **SIZES,
    )
    _spread(model.head)
    return model


def fcos(num_classes: int = 3) -> FCOS:
    model = FCOS(
        _backbone(),
        num_classes=num_classes,
        anchor_generator=AnchorGenerator(((8,), (16,), (32,)), ((1.0,),) * 3),
        score_thresh=0.02,
        detections_per_img=6,
        **SIZES,
    )
    _spread(model.head)
    return model


BUILDERS = {"faster_rcnn": faster_rcnn, "retinanet": retinanet, "fcos": fcos}


def _batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 96, generator=g), torch.rand(3, 96, 64, generator=g)]
    samples = [
        # taskal's foreground labels 0..C-1 (Faster R-CNN's adapter shifts them past class 0)
        {"boxes": torch.tensor([[4.0, 4.0, 40.0, 44.0]]), "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[8.0, 10.0, 50.0, 80.0]]), "labels": torch.tensor([1])},
    ]
    return Batch(images, ["a", "b"], data_samples=samples)


def _adapter(family: str, seed: int = 0) -> TorchvisionDetectionAdapter:
    torch.manual_seed(seed)
    return TorchvisionDetectionAdapter(BUILDERS[family]())


class TestFasterRCNN(AdapterConformance):
    unit_kind = "box"
    family = "faster_rcnn"

    def make_adapter(self, seed: int = 0) -> Adapter:
        return _adapter(self.family, seed)

    def make_batch(self) -> Batch:
        return _batch()

    def test_boxes_inside_the_original_images(self) -> None:
        batch = self.make_batch()
        pred = self.make_adapter().predict(batch)
        assert pred.boxes_U4 is not None
        hw = torch.tensor(batch.image_sizes(), dtype=torch.float32)[pred.owner_U]
        assert (pred.boxes_U4 >= 0).all()
        assert (pred.boxes_U4[:, 2] <= hw[:, 1]).all() and (pred.boxes_U4[:, 3] <= hw[:, 0]).all()

    def test_units_are_the_models_own_detections(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        assert isinstance(adapter, TorchvisionDetectionAdapter)
        pred = adapter.predict(batch)
        adapter.model.eval()
        with torch.no_grad():
            out = adapter.model(list(batch.inputs))
        for i, det in enumerate(out):
            mine = pred.owner_U == i
            assert pred.boxes_U4 is not None and int(mine.sum()) == len(det["boxes"]) > 0
            assert torch.allclose(pred.boxes_U4[mine], det["boxes"], atol=1e-3)
            labels = pred.units().unit_U[mine] % adapter.num_classes
            assert torch.equal(labels, det["labels"])

    def test_resized_images_map_back_to_original_coordinates(self) -> None:
        """Images smaller than min_size are resized by the transform; boxes come back."""
        adapter = self.make_adapter()
        assert isinstance(adapter, TorchvisionDetectionAdapter)
        g = torch.Generator().manual_seed(1)
        images = [torch.rand(3, 40, 60, generator=g), torch.rand(3, 50, 37, generator=g)]
        pred = adapter.predict(Batch(images, ["small", "narrow"]))
        adapter.model.eval()
        with torch.no_grad():
            out = adapter.model(images)
        for i, det in enumerate(out):
            mine = pred.owner_U == i
            assert pred.boxes_U4 is not None and int(mine.sum()) == len(det["boxes"]) > 0
            assert torch.allclose(pred.boxes_U4[mine], det["boxes"], atol=1e-3)
            h, w = images[i].shape[-2:]
            assert float(pred.boxes_U4[mine][:, 2].max()) <= w
            assert float(pred.boxes_U4[mine][:, 3].max()) <= h

    def test_regions_are_ranks_and_costs_one(self) -> None:
        pred = self.make_adapter().predict(self.make_batch())
        for i in (0, 1):
            mine = pred.owner_U == i
            assert torch.equal(pred.regions()[mine], torch.arange(int(mine.sum())))
        assert torch.equal(pred.costs(), torch.ones(pred.num_units))
        assert len(set(zip(pred.owner_U.tolist(), pred.units().unit_U.tolist(), strict=True))) == (
            pred.num_units
        ), "unit ids are unique within an image"

    def test_rescoring_a_subset_of_units(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        pred = adapter.predict(batch)
        units = pred.units()
        assert units.boxes_U4 is not None
        subset = Units(units.owner_U[1::2], units.unit_U[1::2], units.boxes_U4[1::2])
        again = adapter.predict(batch, units=subset)
        assert same_units(again.units(), subset)
        assert torch.allclose(again.probs_UCK, pred.probs_UCK[1::2], atol=1e-6)

    def test_units_of_another_batch_are_refused(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        units = adapter.predict(batch).units()
        assert units.boxes_U4 is not None
        with pytest.raises(ValueError, match="outside this batch"):
            adapter.predict(batch, units=Units(units.owner_U + 5, units.unit_U, units.boxes_U4))
        with pytest.raises(ValueError, match="outside their images"):
            adapter.predict(batch, units=Units(units.owner_U, units.unit_U, units.boxes_U4 + 500))
        with pytest.raises(ValueError, match="boxes_U4"):
            adapter.predict(batch, units=Units(units.owner_U, units.unit_U))

    def test_loss_needs_targets(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        with pytest.raises(ValueError, match="'boxes'"):
            adapter.per_sample_loss(Batch(batch.inputs, batch.ids))
        first = adapter.per_sample_loss(batch)
        assert torch.equal(first, adapter.per_sample_loss(batch)), "deterministic"
        alone = adapter.per_sample_loss(
            Batch(batch.inputs[1:], batch.ids[1:], data_samples=batch.data_samples[1:])  # type: ignore[index]
        )
        assert torch.allclose(alone, first[1:])

    def test_feature_layers(self) -> None:
        info = {f.name: f for f in self.make_adapter().feature_info}
        assert list(info) == ["body", "fpn"]
        assert info["body"].strides == (4, 8) and info["body"].channels == (8, 16)
        assert info["fpn"].strides == (4, 8, 16) and info["fpn"].channels == 32
        assert info["fpn"].module == "backbone.fpn"


class TestFasterRCNNProbabilities:
    def test_softmax_over_classes_and_background(self) -> None:
        adapter = _adapter("faster_rcnn")
        assert adapter.prob_kind == "softmax" and adapter.num_classes == 3
        pred = adapter.predict(_batch())
        proposal, cls = pred.units().unit_U // 3, pred.units().unit_U % 3
        assert (cls >= 1).all(), "kept boxes are foreground classes"
        assert (proposal < 20).all(), "at most rpn_post_nms_top_n_test proposals per image"

    def test_ensemble_members_score_the_reference_boxes(self) -> None:
        members = [_adapter("faster_rcnn", 0), _adapter("faster_rcnn", 1)]
        batch = _batch()
        fixed = members[0].predict(batch).units()
        assert not same_units(members[1].predict(batch).units(), fixed)
        pred = EnsembleAdapter(members).predict(batch)
        assert same_units(pred.units(), fixed) and pred.num_samples == 2


class TestRetinaNet(TestFasterRCNN):
    prob_kind = "sigmoid"
    family = "retinanet"

    def test_feature_layers(self) -> None:
        adapter = self.make_adapter()
        assert isinstance(adapter, TorchvisionDetectionAdapter)
        assert [f.name for f in adapter.feature_info] == ["body", "fpn"]
        pred = adapter.predict(self.make_batch())
        assert pred.kind == "sigmoid" and adapter.num_classes == 3
        n_anchors = 3 * (24 * 24 + 12 * 12 + 6 * 6)  # 3 anchors per cell, padded 96 x 96
        assert (pred.units().unit_U // 3 < n_anchors).all()
        # units naming anchors this model lacks are matched by their boxes: every kept box is
        # its own anchor's decoded box, so matching finds that anchor, unless another anchor
        # decodes to the very same box (boxes clipped to the same image border)
        units = pred.units()
        assert units.boxes_U4 is not None
        foreign = Units(units.owner_U, units.unit_U + 3 * 10**6, units.boxes_U4)
        again = adapter.predict(self.make_batch(), units=foreign)
        assert torch.equal(again.unit_U, foreign.unit_U)  # the given units, as given
        same = (again.probs_UCK - pred.probs_UCK).abs().amax((1, 2)) < 1e-6
        assert bool((again.probs_UCK.sum((1, 2)) > 0).all())  # every box found
        assert float(same.float().mean()) >= 0.75


class TestFCOS(TestRetinaNet):
    family = "fcos"


class TestFasterRCNNEnsemble(AdapterConformance):
    unit_kind = "box"
    deterministic_samples = 2

    def make_adapter(self, seed: int = 0) -> Adapter:
        return EnsembleAdapter([_adapter("faster_rcnn", seed), _adapter("faster_rcnn", seed + 100)])

    def make_batch(self) -> Batch:
        return _batch()


class TestRetinaNetEnsemble(TestFasterRCNNEnsemble):
    prob_kind = "sigmoid"

    def make_adapter(self, seed: int = 0) -> Adapter:
        return EnsembleAdapter([_adapter("retinanet", seed), _adapter("retinanet", seed + 100)])


def test_registered_and_refuses_weights() -> None:
    assert ADAPTERS.get("torchvision_detection") is TorchvisionDetectionAdapter
    for key in ("weights", "weights_backbone"):
        cfg = dict(type="torchvision_detection", name="fcos_resnet50_fpn", num_classes=3)
        with pytest.raises(ValueError, match="never downloads weights"):
            build(MODELS, {**cfg, key: "DEFAULT"})
    with pytest.raises(KeyError, match="unknown torchvision detector"):
        build(MODELS, dict(type="torchvision_detection", name="resnet18", num_classes=3))


def test_builds_from_a_config() -> None:
    cfg = dict(
        type="torchvision_detection",
        name="fasterrcnn_mobilenet_v3_large_fpn",
        num_classes=3,
        weights_backbone=None,
        min_size=64,
        max_size=64,
    )
    adapter = build(ADAPTERS, dict(type="torchvision_detection", model=cfg))
    assert adapter.task == "det" and adapter.num_classes == 3
    assert adapter.feature_info[-1].name == "fpn"


def test_refuses_other_models() -> None:
    with pytest.raises(TypeError, match="FasterRCNN, RetinaNet or FCOS"):
        TorchvisionDetectionAdapter(nn.Linear(2, 2))


class TestFCOSEnsemble(TestFasterRCNNEnsemble):
    prob_kind = "sigmoid"

    def make_adapter(self, seed: int = 0) -> Adapter:
        return EnsembleAdapter([_adapter("fcos", seed), _adapter("fcos", seed + 100)])


def test_a_backbone_without_fpn_is_one_layer() -> None:
    backbone = nn.Sequential(nn.Conv2d(3, 32, 3, stride=8, padding=1), nn.ReLU())
    backbone.out_channels = 32  # type: ignore[assignment]
    model = RetinaNet(
        backbone,
        num_classes=3,
        anchor_generator=AnchorGenerator(((32,),), ((1.0,),)),
        score_thresh=0.005,
        **SIZES,
    )
    _spread(model.head)
    adapter = TorchvisionDetectionAdapter(model)
    (info,) = adapter.feature_info
    assert (info.name, info.channels, info.strides) == ("backbone", 32, (8,))
    batch = _batch()
    feats = adapter.features(batch)
    assert isinstance(feats["backbone"], torch.Tensor)
    assert feats["backbone"].shape == (2, 32, 12, 12)
    pred = adapter.predict(batch, n_samples=2)
    assert pred.num_units > 0 and pred.probs_UCK.shape[1:] == (3, 2)


@pytest.mark.parametrize("family", ["retinanet", "fcos"])
def test_dense_mc_reruns_only_cls_logits(family: str) -> None:
    """MC samples of a dense head run cls_logits on the cached tower, never the tower, and
    equal (same seed) the samples of the whole classification head on the FPN maps."""
    torch.manual_seed(0)
    adapter = TorchvisionDetectionAdapter(BUILDERS[family]())
    batch = _batch()
    units = adapter.predict(batch).units()
    calls = []
    tower = adapter.model.head.classification_head.conv  # type: ignore[union-attr]
    hook = tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        torch.manual_seed(5)
        cached = adapter.predict(batch, n_samples=4, units=units)
    finally:
        hook.remove()
    assert len(calls) == 3  # the deterministic pass, once per FPN level; no sample re-ran it
    assert not torch.allclose(cached.probs_UCK[..., 0], cached.probs_UCK[..., 1])
    adapter._tower = None  # the fallback: the whole head re-run on the cached FPN maps
    torch.manual_seed(5)
    whole = adapter.predict(batch, n_samples=4, units=units)
    assert torch.allclose(cached.probs_UCK, whole.probs_UCK, atol=1e-6)


def test_dense_members_with_other_anchors_match_by_iou() -> None:
    """An ensemble member whose anchors differ scores the reference's boxes through its
    best-overlapping anchor (IoU >= match_iou), and 0 where none overlaps enough."""
    torch.manual_seed(0)
    reference = TorchvisionDetectionAdapter(retinanet())
    other_model = retinanet()
    other_model.anchor_generator = AnchorGenerator(((24,), (48,), (96,)), ((1.0,),) * 3)
    other_model.head = type(other_model.head)(32, 1, 3)  # one anchor per cell now
    _spread(other_model.head)
    other = TorchvisionDetectionAdapter(other_model, match_iou=0.5)
    batch = _batch()
    ref = reference.predict(batch)
    ensemble = EnsembleAdapter([reference, other]).predict(batch)
    assert same_units(ensemble.units(), ref.units())
    member = other.predict(batch, units=ref.units())
    assert torch.allclose(ensemble.probs_UCK[..., 1], member.probs_UCK[..., 0])
    strict = TorchvisionDetectionAdapter(other_model, match_iou=1.0)
    none = strict.predict(batch, units=ref.units())
    assert torch.equal(none.probs_UCK, torch.zeros_like(none.probs_UCK))
    with pytest.raises(ValueError, match="match_iou"):
        TorchvisionDetectionAdapter(retinanet(), match_iou=0.0)
