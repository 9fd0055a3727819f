"""The mmseg segmentation adapter (UNet whole and slide, FCN on ResNet-18) against the contract.

The segmentors are mmseg's shipped configs, inherited through ``_base_`` and shrunk (8-channel
UNet, ResNet-18 with 16-channel heads, 3 classes, BN instead of SyncBN, no pretrained
weights), loaded with ``Config.fromfile`` and built through taskal's ``MODELS``, as users
build them.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample
from torch import nn

from taskal.adapters import EnsembleAdapter, MMSegAdapter
from taskal.adapters import _mmseg_inference as infer
from taskal.llal.module import LossPredictionModule
from taskal.registry import ADAPTERS, MODELS, build
from taskal.types import Adapter, Batch, Units, same_units

from .conformance import AdapterConformance

NO_DROPOUT = "ignore:.*has no dropout with p > 0"
pytestmark = pytest.mark.filterwarnings(NO_DROPOUT)

_UNET = """
_base_ = 'mmseg::unet/unet-s5-d16_fcn_4xb4-40k_drive-64x64.py'
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    type='mmseg.EncoderDecoder',
    data_preprocessor=dict(size=None, size_divisor=16),
    backbone=dict(base_channels=8, norm_cfg=norm_cfg),
    decode_head=dict(in_channels=8, channels=8, num_classes=3, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=16, channels=8, num_classes=3, norm_cfg=norm_cfg),
    test_cfg=dict(_delete_=True, mode='{mode}'{slide}))
"""
#: shipped configs, shrunk.
CONFIGS = {
    "unet": _UNET.format(mode="whole", slide=""),
    "unet_slide": _UNET.format(mode="slide", slide=", crop_size=(32, 32), stride=(24, 24)"),
    "fcn": """
_base_ = 'mmseg::fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py'
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    type='mmseg.EncoderDecoder',
    pretrained=None,
    data_preprocessor=dict(size=None, size_divisor=8),
    backbone=dict(depth=18, init_cfg=None, norm_cfg=norm_cfg),
    decode_head=dict(in_channels=512, channels=16, num_classes=3, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=256, channels=16, num_classes=3, norm_cfg=norm_cfg))
""",
}

_configs: dict[str, Config] = {}
_models: dict[tuple[str, int], nn.Module] = {}


@pytest.fixture(scope="module", autouse=True)
def _config_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every config written to a file and loaded with ``Config.fromfile``; torch on one
    thread (the maps are tiny: a second thread only adds synchronisation)."""
    folder: Path = tmp_path_factory.mktemp("mmseg_configs")
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
    """A fresh copy of the segmentor built from ``family``'s config with ``seed``."""
    if (family, seed) not in _models:
        torch.manual_seed(seed)
        _models[family, seed] = build(MODELS, dict(_configs[family].model))
    return copy.deepcopy(_models[family, seed])


def _adapter(family: str, seed: int = 0, **kw: Any) -> MMSegAdapter:
    return MMSegAdapter(_model(family, seed), **kw)


def _batch() -> Batch:
    """Two differently sized images with label maps (some pixels unlabeled: 255).

    The larger one's sides are multiples of 16 (UNet's divisor), so the padded batch is the
    size the conformance template expects of stride-1 maps; the smaller one is padded.
    """
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 48, 64, generator=g), torch.rand(3, 40, 32, generator=g)]
    masks = [torch.randint(0, 3, (48, 64), generator=g), torch.randint(0, 3, (40, 32), generator=g)]
    masks[1][:6] = 255
    samples = [{"gt_sem_seg": m, "img_shape": tuple(m.shape)} for m in masks]
    return Batch(images, ["a.png", "b.png"], data_samples=samples)


class TestUNet(AdapterConformance):
    unit_kind = "pixel"
    family = "unet"

    def make_adapter(self, seed: int = 0) -> Adapter:
        return _adapter(self.family, seed)

    def make_batch(self) -> Batch:
        return _batch()

    def make_bad_batch(self) -> Batch:
        """A 3x0 image: the first convolution fails on it."""
        return Batch([torch.zeros(3, 0, 16)], ["bad"])

    def test_probabilities_are_mmsegs_own_inference(self) -> None:
        adapter, batch = _adapter(self.family), _batch()
        pred = adapter.predict(batch)
        inputs, samples = adapter.preprocess(batch.inputs)
        model = adapter.model.eval()
        with torch.no_grad():
            want = model.inference(inputs, [s.metainfo for s in samples]).softmax(1)  # type: ignore[operator]
        for i, (h, w) in enumerate(batch.image_sizes()):
            mine = pred.owner_U == i
            got = pred.probs_UCK[mine, :, 0]
            assert got.shape == (h * w, 3)
            assert torch.allclose(got, want[i, :, :h, :w].flatten(1).T, atol=1e-5)
            assert torch.equal(pred.unit_U[mine], torch.arange(h * w))

    def test_mc_samples_rerun_only_cls_seg(self) -> None:
        adapter, batch = _adapter(self.family), _batch()
        model: Any = adapter.model
        calls = {"backbone": 0, "conv_seg": 0}
        hooks = [
            model.backbone.register_forward_hook(
                lambda *_: calls.__setitem__("backbone", calls["backbone"] + 1)
            ),
            model.decode_head.conv_seg.register_forward_hook(
                lambda *_: calls.__setitem__("conv_seg", calls["conv_seg"] + 1)
            ),
        ]
        try:
            torch.manual_seed(0)
            probs = adapter.predict(batch, n_samples=5).probs_UCK
        finally:
            for h in hooks:
                h.remove()
        windows = _windows(adapter, batch)
        assert calls["backbone"] == windows, "the backbone ran once per window"
        assert calls["conv_seg"] == windows * 6, "cls_seg ran in the pass and in 5 samples"
        assert not torch.allclose(probs[..., 0], probs[..., 4])

    def test_subset_of_pixels_and_foreign_units(self) -> None:
        adapter, batch = _adapter(self.family), _batch()
        pred = adapter.predict(batch)
        units = pred.units()
        subset = Units(units.owner_U[::7], units.unit_U[::7])
        again = adapter.predict(batch, units=subset)
        assert same_units(again.units(), subset)
        assert torch.allclose(again.probs_UCK, pred.probs_UCK[::7])
        assert torch.equal(again.regions(), pred.regions()[::7])
        with pytest.raises(ValueError, match="pixels that this batch does not have"):
            adapter.predict(batch, units=Units(units.owner_U, units.unit_U + 10_000))

    def test_loss_ignores_unlabeled_pixels_exactly(self) -> None:
        adapter, batch = _adapter(self.family), _batch()
        loss = adapter.per_sample_loss(batch)
        model: Any = adapter.model.eval()
        assert batch.data_samples is not None
        mask = batch.data_samples[1]["gt_sem_seg"]
        inputs, _ = adapter.preprocess([batch.inputs[1]])
        hp, wp = inputs.shape[-2:]
        target = F.pad(mask, (0, wp - mask.shape[1], 0, hp - mask.shape[0]), value=255)
        want = torch.zeros(())
        with torch.no_grad():
            feats = model.extract_feat(inputs)
            for head in (model.decode_head, model.auxiliary_head):
                logits = F.interpolate(head.forward(feats), (hp, wp), mode="bilinear")
                ce = F.cross_entropy(logits, target[None], ignore_index=255, reduction="none")
                want += head.loss_decode.loss_weight * ce.sum() / target.numel()
        assert torch.allclose(loss[1], want, atol=1e-5)
        # a map without labeled pixels costs nothing; SegDataSample works as a dict does
        gt = PixelData(data=torch.full_like(mask, 255)[None])
        empty = Batch([batch.inputs[1]], ["b"], data_samples=[SegDataSample(gt_sem_seg=gt)])
        assert adapter.per_sample_loss(empty)[0] == 0.0

    def test_embedding_averages_the_decoder_over_each_image(self) -> None:
        from taskal.adapters._mmseg_inference import capture_cls_input

        adapter, batch = _adapter(self.family), _batch()
        emb = adapter.embed(batch)
        seg: Any = adapter.model
        inputs, _ = adapter.preprocess(batch.inputs)
        with torch.no_grad(), capture_cls_input(seg.decode_head) as store:
            seg.eval()
            seg.decode_head.forward(seg.extract_feat(inputs))
        fmap = store[0]
        s = round(inputs.shape[-1] / fmap.shape[-1])
        for i, (h, w) in enumerate(batch.image_sizes()):
            want = fmap[i, :, : -(-h // s), : -(-w // s)].mean((1, 2))
            assert torch.allclose(emb[i], want, atol=1e-6)
        assert emb.shape == (2, fmap.shape[1])


def _windows(adapter: MMSegAdapter, batch: Batch) -> int:
    from taskal.adapters._mmseg_inference import windows

    inputs, _ = adapter.preprocess(batch.inputs)
    return len(windows(adapter.model.test_cfg, *inputs.shape[-2:]))  # type: ignore[union-attr]


class TestUNetSlide(TestUNet):
    family = "unet_slide"

    def test_slide_windows_overlap(self) -> None:
        adapter = _adapter(self.family)
        assert _windows(adapter, _batch()) == 6  # 48x64 padded: 2 rows, 3 columns of 32x32


class TestFCN(TestUNet):
    family = "fcn"

    def test_resnet_exposes_backbone_and_decoder(self) -> None:
        info = _adapter(self.family).feature_info
        assert [f.name for f in info] == ["backbone", "decoder"]
        assert info[0].strides == (4, 8, 8, 8) and info[1].strides == (8,)
        assert info[0].channels == (64, 128, 256, 512) and info[1].channels == 16


class TestUNetEnsemble(AdapterConformance):
    unit_kind = "pixel"
    deterministic_samples = 2

    def make_adapter(self, seed: int = 0) -> Adapter:
        return EnsembleAdapter([_adapter("unet", seed), _adapter("unet", seed + 1)])

    def make_batch(self) -> Batch:
        return _batch()

    def make_bad_batch(self) -> Batch:
        return Batch([torch.zeros(3, 0, 16)], ["bad"])


def test_unet_exposes_its_encoder_stages_for_llal() -> None:
    adapter = _adapter("unet")
    info = adapter.feature_info
    assert [f.name for f in info] == [f"encoder{i}" for i in range(5)]
    assert [f.strides for f in info] == [(1,), (2,), (4,), (8,), (16,)]
    assert all(f.module == f"backbone.encoder.{i}" for i, f in enumerate(info))
    LossPredictionModule(info, hidden=4)  # LLAL reads them: three maps or more


def test_patch_regions_tile_each_image() -> None:
    batch = _batch()
    patches = _adapter("unet", regions=dict(patch=8)).predict(batch)
    for i, (h, w) in enumerate(batch.image_sizes()):
        region = patches.regions()[patches.owner_U == i].reshape(h, w)
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        assert torch.equal(region, (rows // 8) * (-(-w // 8)) + cols // 8)
    clicks = _adapter("unet", regions=dict(patch=8, cost="clicks")).predict(batch)
    mine = clicks.owner_U == 0
    per_region = torch.zeros(100).index_add_(0, clicks.regions()[mine], clicks.costs()[mine])
    used = per_region[per_region > 0]
    assert torch.allclose(used, torch.ones_like(used))


def test_dropout_injected_when_the_head_has_none() -> None:
    torch.manual_seed(0)
    cfg = copy.deepcopy(_configs["unet"].model)
    cfg["decode_head"]["dropout_ratio"] = 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = MMSegAdapter(build(MODELS, dict(cfg)))
    assert any("conv_seg" in str(w.message) for w in caught), "dropout injected, said"
    torch.manual_seed(0)
    probs = adapter.predict(_batch(), n_samples=3).probs_UCK
    assert not torch.allclose(probs[..., 0], probs[..., 1])


def test_registered_builds_from_config_and_refuses() -> None:
    assert ADAPTERS.get("mmseg_segmentation") is MMSegAdapter
    cfg = dict(copy.deepcopy(_configs["unet"].model))
    cfg["type"] = "EncoderDecoder"  # unscoped: gets mmseg.
    adapter = build(ADAPTERS, dict(type="mmseg_segmentation", model=cfg))
    assert adapter.task == "seg" and adapter.num_classes == 3
    with pytest.raises(TypeError, match="EncoderDecoder"):
        MMSegAdapter(nn.Conv2d(3, 3, 1))
    cascade = dict(copy.deepcopy(_configs["unet"].model))
    cascade.update(type="mmseg.CascadeEncoderDecoder", num_stages=1)
    cascade["decode_head"] = [cascade["decode_head"]]
    with pytest.raises(TypeError, match="CascadeEncoderDecoder"):
        MMSegAdapter(build(MODELS, cascade))
    odd = _model("unet")
    forward = odd.decode_head.forward
    odd.decode_head.forward = lambda feats: forward(feats) * 2.0  # more after cls_seg
    with pytest.raises(TypeError, match="end with one call of cls_seg"):
        MMSegAdapter(odd)
    binary = copy.deepcopy(_configs["unet"].model)
    binary["decode_head"].update(num_classes=2, out_channels=1, threshold=0.5)
    binary["decode_head"]["loss_decode"]["use_sigmoid"] = True
    with pytest.raises(ValueError, match="softmax heads only"):
        MMSegAdapter(build(MODELS, dict(binary)))
    with pytest.raises(ValueError, match=r"\[3, H, W\] float RGB"):
        adapter.predict(Batch([torch.zeros(1, 16, 16)], ["gray"]))
    with pytest.raises(ValueError, match="does not match its image"):
        adapter.per_sample_loss(
            Batch([torch.zeros(3, 16, 16)], ["x"], data_samples=[{"gt_sem_seg": torch.zeros(4, 4)}])
        )


def test_sampled_cls_seg_folds_channel_masks_into_the_weights() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 7, generator=g)
    conv = nn.Conv2d(6, 3, 1)
    p, n = 0.4, 4
    torch.manual_seed(7)
    got = infer.sampled_cls_seg(x, p, conv.weight.flatten(1), conv.bias, n)
    torch.manual_seed(7)  # the masks it draws: one per sample, image and channel
    keep = (torch.rand(n, 2, 6) >= p).float() / (1 - p)
    assert got.shape == (n, 2, 3, 5, 7)
    with torch.no_grad():
        for k in range(n):
            want = conv(x * keep[k][:, :, None, None])
            torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-5)
    assert 0 < int((keep == 0).sum()) < keep.numel()  # some channels dropped, not all


def test_mc_samples_take_one_product_per_window_unless_cls_seg_is_hooked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    adapter, batch = _adapter("unet_slide"), _batch()
    calls = []
    real = infer.sampled_cls_seg

    def counted(*args: Any) -> torch.Tensor:
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(infer, "sampled_cls_seg", counted)
    torch.manual_seed(0)
    probs = adapter.predict(batch, n_samples=5).probs_UCK
    assert calls == [5] * _windows(adapter, batch)  # every sample of a window in one product
    torch.testing.assert_close(probs.sum(1), torch.ones(probs.shape[0], 5))
    assert not torch.allclose(probs[..., 0], probs[..., 4])
    head: Any = adapter.model.decode_head
    handle = head.conv_seg.register_forward_hook(lambda *_: None)
    try:
        assert infer.folded_cls_seg(head) is None  # a hook sees every sample: no folding
        calls.clear()
        adapter.predict(batch, n_samples=3)
        assert calls == []
    finally:
        handle.remove()
    assert infer.folded_cls_seg(head) is not None
