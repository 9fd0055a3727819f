"""The mmdet detection adapter (Faster R-CNN, RetinaNet, FCOS) against the contract.

The detectors are mmdet's shipped configs, inherited through ``_base_`` and shrunk (ResNet-18,
32-channel FPN, 3 classes, few proposals and detections, no pretrained weights), loaded with
``Config.fromfile`` and built through taskal's ``MODELS``, as users build them.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mmdet.models.dense_heads import RetinaHead
from mmdet.models.roi_heads import DoubleHeadRoIHead
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.structures import InstanceData
from torch import nn
from torchvision.ops import box_iou

from taskal.adapters import EnsembleAdapter, MMDetAdapter, _mmdet_dense
from taskal.registry import ADAPTERS, MODELS, build
from taskal.types import Adapter, Batch, Units, same_units

from .conformance import AdapterConformance

NO_DROPOUT = "ignore:.*has no dropout with p > 0"
pytestmark = pytest.mark.filterwarnings(NO_DROPOUT)

#: shipped configs, shrunk; score_thr 0.05 as shipped, so mmdet's own predict keeps the same.
CONFIGS = {
    "retinanet": """
_base_ = 'mmdet::retinanet/retinanet_r18_fpn_1x_coco.py'
model = dict(
    type='mmdet.RetinaNet',
    backbone=dict(init_cfg=None),
    neck=dict(out_channels=32),
    bbox_head=dict(num_classes=3, in_channels=32, feat_channels=32, stacked_convs=1),
    test_cfg=dict(nms_pre=100, max_per_img=6))
""",
    "faster_rcnn": """
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
model = dict(
    type='mmdet.FasterRCNN',
    backbone=dict(depth=18, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=3)),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=20), rcnn=dict(max_per_img=6)))
""",
    "fcos": """
_base_ = 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'
model = dict(
    type='mmdet.FCOS',
    backbone=dict(depth=18, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=32),
    bbox_head=dict(
        num_classes=3, in_channels=32, feat_channels=32, stacked_convs=1,
        norm_cfg=dict(type='GN', num_groups=8, requires_grad=True)),
    test_cfg=dict(nms_pre=100, max_per_img=6))
""",
}

_configs: dict[str, Config] = {}
_models: dict[tuple[str, int], nn.Module] = {}


@pytest.fixture(scope="module", autouse=True)
def _config_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every config written to a file and loaded with ``Config.fromfile``.

    The maps are tiny, so torch runs on one thread here: a second one only adds
    synchronisation, which costs seconds per forward on a busy two-core machine.
    """
    folder: Path = tmp_path_factory.mktemp("mmdet_configs")
    for family, text in CONFIGS.items():
        (folder / f"{family}.py").write_text(text)
        _configs[family] = Config.fromfile(str(folder / f"{family}.py"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _configs.clear()
        _models.clear()


def _model(family: str, seed: int = 0) -> Any:
    """A fresh copy of the detector built from ``family``'s config with ``seed``."""
    if (family, seed) not in _models:
        torch.manual_seed(seed)
        _models[family, seed] = build(MODELS, dict(_configs[family].model))
    return copy.deepcopy(_models[family, seed])


def _adapter(family: str, seed: int = 0) -> MMDetAdapter:
    return MMDetAdapter(_model(family, seed))


def _batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 96, generator=g), torch.rand(3, 96, 64, generator=g)]
    samples = [  # mmdet's labels 0..C-1, as taskal's pools give them
        {"boxes": torch.tensor([[4.0, 4.0, 40.0, 44.0]]), "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[8.0, 10.0, 50.0, 80.0]]), "labels": torch.tensor([1])},
    ]
    return Batch(images, ["a", "b"], data_samples=samples)


def _mmdet_predict(adapter: MMDetAdapter, batch: Batch) -> list[DetDataSample]:
    """mmdet's own ``model.predict`` on the adapter's preprocessed batch (eval mode)."""
    inputs, samples = adapter._preprocess(batch)
    det: Any = adapter.model
    det.eval()
    with torch.no_grad():
        return det.predict(inputs, samples)


class TestRetinaNet(AdapterConformance):
    unit_kind = "box"
    prob_kind = "sigmoid"
    family = "retinanet"

    def make_adapter(self, seed: int = 0) -> Adapter:
        return _adapter(self.family, seed)

    def make_batch(self) -> Batch:
        return _batch()

    def make_bad_batch(self) -> Batch:
        """An empty image: ResNet's stem fails on it (a 99-channel image is refused with a
        ValueError before any forward, see ``test_refuses_non_rgb_images``)."""
        return Batch([torch.zeros(3, 0, 0)], ["bad"])

    def test_boxes_inside_the_original_images(self) -> None:
        batch = self.make_batch()
        pred = self.make_adapter().predict(batch)
        assert pred.boxes_U4 is not None
        hw = torch.tensor(batch.image_sizes(), dtype=torch.float32)[pred.owner_U]
        assert (pred.boxes_U4 >= 0).all()
        assert (pred.boxes_U4[:, 2] <= hw[:, 1]).all() and (pred.boxes_U4[:, 3] <= hw[:, 0]).all()

    def test_units_are_mmdets_own_detections(self) -> None:
        """The kept boxes, labels and scores are exactly those of mmdet's ``model.predict``."""
        adapter, batch = _adapter(self.family), self.make_batch()
        pred = adapter.predict(batch)
        c = adapter.num_classes
        for i, det in enumerate(_mmdet_predict(adapter, batch)):
            mine = pred.owner_U == i
            want = det.pred_instances
            assert pred.boxes_U4 is not None and int(mine.sum()) == len(want.bboxes) > 0
            assert torch.equal(pred.boxes_U4[mine], want.bboxes)
            labels = pred.units().unit_U[mine] % c
            assert torch.equal(labels, want.labels)
            probs = pred.probs_UCK[mine, :, 0]
            if self.family == "retinanet":  # FCOS's scores also carry the centerness
                assert torch.allclose(probs[torch.arange(len(labels)), labels], want.scores)

    def test_mc_samples_differ_on_the_same_units(self) -> None:
        adapter, batch = _adapter(self.family), self.make_batch()
        fixed = adapter.predict(batch)
        torch.manual_seed(0)
        sampled = adapter.predict(batch, n_samples=3)
        assert same_units(sampled.units(), fixed.units())
        for k in range(3):
            assert not torch.allclose(sampled.probs_UCK[..., k], fixed.probs_UCK[..., 0])

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

    def test_loss_needs_targets_and_is_deterministic(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        with pytest.raises(ValueError, match="'boxes'"):
            adapter.per_sample_loss(Batch(batch.inputs, batch.ids))
        first = adapter.per_sample_loss(batch)
        assert torch.equal(first, adapter.per_sample_loss(batch)), "deterministic"
        assert batch.data_samples is not None
        alone = adapter.per_sample_loss(
            Batch(batch.inputs[1:], batch.ids[1:], data_samples=batch.data_samples[1:])
        )
        assert torch.allclose(alone, first[1:])
        samples = [
            DetDataSample(gt_instances=InstanceData(bboxes=s["boxes"], labels=s["labels"]))
            for s in batch.data_samples
        ]
        as_mmdet = adapter.per_sample_loss(Batch(batch.inputs, batch.ids, data_samples=samples))
        assert torch.equal(as_mmdet, first)

    def test_feature_layers(self) -> None:
        adapter = self.make_adapter()
        info = {f.name: f for f in adapter.feature_info}
        assert list(info) == ["backbone", "neck"]
        assert info["backbone"].strides == (4, 8, 16, 32)
        assert info["backbone"].channels == (64, 128, 256, 512)
        first = 4 if self.family == "faster_rcnn" else 8  # RetinaNet/FCOS: P3-P7
        assert info["neck"].strides == tuple(first * 2**i for i in range(5))
        assert info["neck"].channels == 32 and info["neck"].module == "neck"
        emb = adapter.embed(self.make_batch())
        feats = adapter.features(self.make_batch(), ["neck"])["neck"]
        assert isinstance(feats, tuple)
        assert torch.allclose(emb, torch.stack([x.mean((2, 3)) for x in feats]).mean(0))

    def test_refuses_non_rgb_images(self) -> None:
        adapter = self.make_adapter()
        for image in (torch.zeros(99, 32, 32), torch.zeros(1, 32, 32), torch.zeros(3, 8, 8).byte()):
            with pytest.raises(ValueError, match=r"\[3, H, W\] float RGB"):
                adapter.predict(Batch([image], ["bad"]))


class TestFasterRCNN(TestRetinaNet):
    prob_kind = "softmax"
    family = "faster_rcnn"

    def test_softmax_over_classes_then_background(self) -> None:
        adapter = _adapter(self.family)
        assert adapter.num_classes == 4 and adapter.background == 3
        pred = adapter.predict(_batch())
        proposal, cls = pred.units().unit_U // 4, pred.units().unit_U % 4
        assert (cls < 3).all(), "kept boxes are foreground classes"
        assert (proposal < 20).all(), "at most test_cfg.rpn.max_per_img proposals per image"

    def test_probabilities_are_the_box_heads_softmax_of_the_kept_proposals(self) -> None:
        """Reference: mmdet's own RPN and RoI head, read through a hook on ``bbox_head``."""
        adapter, batch = _adapter(self.family), _batch()
        pred = adapter.predict(batch)
        det: Any = adapter.model
        inputs, samples = adapter._preprocess(batch)
        heads: list[tuple[torch.Tensor, torch.Tensor]] = []
        hook = det.roi_head.bbox_head.register_forward_hook(lambda _m, _i, out: heads.append(out))
        det.eval()
        try:
            with torch.no_grad():
                feats = det.extract_feat(inputs)
                proposals = det.rpn_head.predict(feats, samples)
                det.roi_head.predict(feats, proposals, samples)
        finally:
            hook.remove()
        (cls_score, bbox_pred), counts = heads[0], [len(p) for p in proposals]
        coder = det.roi_head.bbox_head.bbox_coder
        for i, (scores, deltas) in enumerate(
            zip(cls_score.split(counts), bbox_pred.split(counts), strict=True)
        ):
            mine = pred.owner_U == i
            unit = pred.units().unit_U[mine]
            proposal, label = unit // 4, unit % 4
            want = scores[proposal].softmax(-1)
            assert torch.allclose(pred.probs_UCK[mine, :, 0], want, atol=1e-6)
            delta = deltas.reshape(len(deltas), 3, 4)[proposal, label]
            size = batch.image_sizes()[i]
            box = coder.decode(proposals[i].bboxes[proposal], delta, max_shape=size)
            assert pred.boxes_U4 is not None
            assert torch.allclose(pred.boxes_U4[mine], box, atol=1e-4)

    def test_ensemble_members_score_the_reference_boxes(self) -> None:
        members = [_adapter(self.family, 0), _adapter(self.family, 1)]
        batch = _batch()
        fixed = members[0].predict(batch).units()
        assert not same_units(members[1].predict(batch).units(), fixed)
        pred = EnsembleAdapter(members).predict(batch, n_samples=2)
        assert same_units(pred.units(), fixed) and pred.num_samples == 4
        assert not torch.allclose(pred.probs_UCK[..., 0], pred.probs_UCK[..., 2])


class TestFCOS(TestRetinaNet):
    family = "fcos"


class TestFasterRCNNEnsemble(AdapterConformance):
    unit_kind = "box"
    deterministic_samples = 2

    def make_adapter(self, seed: int = 0) -> Adapter:
        return EnsembleAdapter([_adapter("faster_rcnn", seed), _adapter("faster_rcnn", seed + 1)])

    def make_batch(self) -> Batch:
        return _batch()

    def make_bad_batch(self) -> Batch:
        return Batch([torch.zeros(3, 0, 0)], ["bad"])


class TestRetinaNetEnsemble(TestFasterRCNNEnsemble):
    prob_kind = "sigmoid"

    def make_adapter(self, seed: int = 0) -> Adapter:
        return EnsembleAdapter([_adapter("retinanet", seed), _adapter("retinanet", seed + 1)])


def test_registered_and_builds_from_a_config() -> None:
    assert ADAPTERS.get("mmdet_detection") is MMDetAdapter
    cfg = dict(_configs["retinanet"].model)
    adapter = build(ADAPTERS, dict(type="mmdet_detection", model=cfg))
    assert adapter.task == "det" and adapter.num_classes == 3 and adapter.background is None
    unscoped = MMDetAdapter({**cfg, "type": "RetinaNet"})
    assert type(unscoped.model).__name__ == "RetinaNet"


def test_refuses_other_models() -> None:
    with pytest.raises(TypeError, match="StandardRoIHead"):
        MMDetAdapter(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="dropout_p"):
        MMDetAdapter(_model("retinanet"), dropout_p=1.0)


def test_refuses_heads_with_their_own_post_processing() -> None:
    """Heads whose kept boxes cannot be traced back to anchors or proposals are refused."""

    class OwnPostProcessing(RetinaHead):
        def _predict_by_feat_single(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

    model = _model("retinanet")
    model.bbox_head.__class__ = OwnPostProcessing
    with pytest.raises(TypeError, match=r"overrides BaseDenseHead\._predict_by_feat_single"):
        MMDetAdapter(model)
    model = _model("faster_rcnn")
    model.roi_head.__class__ = DoubleHeadRoIHead
    with pytest.raises(TypeError, match=r"DoubleHeadRoIHead\._bbox_forward differ"):
        MMDetAdapter(model)


def test_dropout_in_the_head_is_used_as_is() -> None:
    """A head that has dropout gets none added (and no warning)."""
    model = _model("faster_rcnn")
    head = model.roi_head.bbox_head
    head.fc_cls = nn.Sequential(nn.Dropout(0.3), head.fc_cls)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = MMDetAdapter(model)
    assert not [w for w in caught if "no dropout" in str(w.message)]
    torch.manual_seed(0)
    probs = adapter.predict(_batch(), n_samples=2).probs_UCK
    assert not torch.allclose(probs[..., 0], probs[..., 1])


@pytest.mark.parametrize("sigmoid", [True, False])
def test_dense_members_with_other_anchors_match_by_iou(sigmoid: bool) -> None:
    """A RetinaNet member with one anchor per cell (the reference has nine) scores the
    reference's boxes through its best-overlapping anchor (IoU >= match_iou); below it the
    box is not detected: zeros for a sigmoid head, all background for a softmax head."""
    cfg = copy.deepcopy(_configs["retinanet"].model)
    if not sigmoid:
        cfg.bbox_head.loss_cls = dict(type="CrossEntropyLoss", use_sigmoid=False)
    torch.manual_seed(0)
    reference = MMDetAdapter(build(MODELS, copy.deepcopy(cfg)))
    cfg.bbox_head.anchor_generator.update(scales_per_octave=1, ratios=[1.0])
    torch.manual_seed(1)
    other_model = build(MODELS, cfg)
    other = MMDetAdapter(copy.deepcopy(other_model))
    batch = _batch()
    ref = reference.predict(batch)
    assert len(ref.units()) > 0
    ensemble = EnsembleAdapter([reference, other]).predict(batch)
    assert same_units(ensemble.units(), ref.units())
    member = other.predict(batch, units=ref.units())
    assert same_units(member.units(), ref.units())
    assert torch.allclose(ensemble.probs_UCK[..., 1], member.probs_UCK[..., 0], atol=1e-6)
    assert bool(member.probs_UCK.any()), "some reference boxes overlap an anchor of the member"
    strict = MMDetAdapter(copy.deepcopy(other_model), match_iou=1.0)
    none = strict.predict(batch, units=ref.units()).probs_UCK[..., 0]
    if sigmoid:
        assert torch.equal(none, torch.zeros_like(none))
    else:
        assert torch.equal(none[:, -1], torch.ones(len(none))) and not none[:, :-1].any()
    with pytest.raises(ValueError, match="match_iou"):
        MMDetAdapter(_model("retinanet"), match_iou=1.5)


def test_dense_members_with_other_weights_score_their_own_overlapping_anchor() -> None:
    """Two members from one config share anchors but not regressions: the second scores
    each reference box through its anchor decoding closest to that box, which is the
    reference's own anchor only where its regression happens to decode there."""
    reference, other = _adapter("retinanet", 0), _adapter("retinanet", 1)
    batch = _batch()
    units = reference.predict(batch).units()
    inputs, samples = other._preprocess(batch)
    det: Any = other.model
    with torch.no_grad():
        outs = det.bbox_head(det.extract_feat(inputs))
    metas = [s.metainfo for s in samples]
    lookup, found = _mmdet_dense.match(det.bbox_head, outs[0], outs[1], metas, units, 0.5)
    assert found is not None and same_units(
        Units(lookup.owner_U, lookup.unit_U % 3, lookup.boxes_U4),
        Units(units.owner_U, units.unit_U % 3, units.boxes_U4),
    )
    boxes = torch.stack(_mmdet_dense.decode_all(det.bbox_head, outs[0], outs[1], metas))
    assert units.boxes_U4 is not None
    chosen = boxes[lookup.owner_U, lookup.unit_U // 3]
    for u in range(len(units)):
        given = units.boxes_U4[u : u + 1]
        best = box_iou(given, boxes[units.owner_U[u]])[0].max()
        got = box_iou(given, chosen[u : u + 1])[0, 0]
        assert torch.isclose(got, best) and bool(found[u]) == bool(got >= 0.5)


@pytest.mark.parametrize("family", ["retinanet", "fcos"])
def test_dense_mc_samples_rerun_the_class_layer_alone(family: str) -> None:
    """Without dropout of its own, a dense head's MC samples re-run only its class layer on
    the cached inputs: the very samples (and RNG use) of re-running the whole head."""
    adapter, batch = _adapter(family), _batch()
    assert adapter._cls_layer is not None
    calls = []
    adapter._det.bbox_head.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(3)
    cached = adapter.predict(batch, n_samples=4)
    after_cached = torch.rand(1)
    assert len(calls) == 1  # the deterministic pass only
    adapter._cls_layer = None  # the reference: the whole head per sample
    torch.manual_seed(3)
    whole = adapter.predict(batch, n_samples=4)
    assert torch.equal(torch.rand(1), after_cached)
    assert len(calls) == 1 + 1 + 4
    assert same_units(cached.units(), whole.units())
    assert torch.equal(cached.probs_UCK, whole.probs_UCK)
    assert not torch.equal(cached.probs_UCK[..., 0], cached.probs_UCK[..., 1])


def test_a_dense_head_with_dropout_of_its_own_is_rerun_whole() -> None:
    model = _model("retinanet")
    head = model.bbox_head
    head.cls_convs[0] = nn.Sequential(head.cls_convs[0], nn.Dropout2d(0.2))
    assert MMDetAdapter(model)._cls_layer is None
