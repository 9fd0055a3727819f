"""The torchvision segmentation adapter (FCN, DeepLabV3, LR-ASPP) against the contract."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from taskal.adapters import EnsembleAdapter, TorchvisionSegmentationAdapter
from taskal.adapters._segmentation import (
    SHIFT_RANGE,
    PixelRegions,
    SpareOutput,
    upsampled_softmax,
)
from taskal.adapters.torchvision_segmentation import pixel_loss, torchvision_segmenter
from taskal.registry import ADAPTERS, MODELS, build
from taskal.segmenters import small_segmenter
from taskal.types import Adapter, Batch, Units, same_units

from .conformance import AdapterConformance

NO_DROPOUT = "ignore:.*has no dropout with p > 0"
pytestmark = pytest.mark.filterwarnings(NO_DROPOUT)


def _batch() -> Batch:
    """Two differently sized images with label maps (some pixels unlabeled: 255)."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 20, 28, generator=g), torch.rand(3, 24, 16, generator=g)]
    masks = [torch.randint(0, 3, (20, 28), generator=g), torch.randint(0, 3, (24, 16), generator=g)]
    masks[1][:4] = 255
    samples = [{"gt_sem_seg": m, "img_shape": tuple(m.shape)} for m in masks]
    return Batch(images, ["a.png", "b.png"], data_samples=samples)


def _adapter(arch: str = "fcn", seed: int = 0, **kw: object) -> TorchvisionSegmentationAdapter:
    torch.manual_seed(seed)
    return TorchvisionSegmentationAdapter(small_segmenter(3, arch=arch, width=8), **kw)  # type: ignore[arg-type]


class TestFCN(AdapterConformance):
    unit_kind = "pixel"
    arch = "fcn"

    def make_adapter(self, seed: int = 0) -> Adapter:
        return _adapter(self.arch, seed)

    def make_batch(self) -> Batch:
        return _batch()

    def make_bad_batch(self) -> Batch:
        """A 3x0 image: the first convolution fails on it."""
        return Batch([torch.zeros(3, 0, 8)], ["bad"])

    def test_probabilities_are_the_models_softmax_at_input_size(self) -> None:
        adapter = _adapter(self.arch)
        batch = _batch()
        pred = adapter.predict(batch)
        x, sizes = adapter.preprocess(batch.inputs)
        model = adapter.model.eval()
        with torch.no_grad():
            want = model(x)["out"].softmax(1)
        start = 0
        for i, (h, w) in enumerate(sizes):
            mine = pred.owner_U == i
            got = pred.probs_UCK[mine, :, 0]
            assert got.shape == (h * w, 3)
            assert torch.allclose(got, want[i, :, :h, :w].flatten(1).T, atol=1e-6)
            assert torch.equal(pred.unit_U[mine], torch.arange(h * w))
            start += h * w

    def test_mc_samples_rerun_only_the_end_of_the_classifier(self) -> None:
        adapter, batch = _adapter(self.arch), _batch()
        calls: list[int] = []
        backbone = adapter.model.backbone  # type: ignore[union-attr]
        hook = backbone.register_forward_hook(lambda *_: calls.append(1))
        try:
            adapter.predict(batch, n_samples=5)
        finally:
            hook.remove()
        assert calls == [1], "the backbone ran once; the samples re-ran the classifier's end"

    def test_every_mc_sample_is_its_own_rerun(self) -> None:
        # samples after the first reuse one scratch buffer: each must still be its own draw
        adapter, batch = _adapter(self.arch), _batch()
        torch.manual_seed(3)
        got = adapter.predict(batch, n_samples=4).probs_UCK
        x, sizes = adapter.preprocess(batch.inputs)
        torch.manual_seed(3)
        with torch.no_grad(), adapter._capture_rerun_input() as store:
            adapter.model.eval()(x)
        with torch.no_grad(), adapter.stochastic():
            for k in range(4):
                want = adapter._resample(store["input"], x.shape[-2:])
                flat = torch.cat(
                    [want[i, :, :h, :w].flatten(1).T for i, (h, w) in enumerate(sizes)]
                )
                assert torch.equal(got[..., k], flat), f"sample {k}"
        assert not torch.equal(got[..., 2], got[..., 3])

    def test_subset_of_pixels_and_foreign_units(self) -> None:
        adapter, batch = _adapter(self.arch), _batch()
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
        adapter, batch = _adapter(self.arch), _batch()
        loss = adapter.per_sample_loss(batch)
        x, sizes = adapter.preprocess(batch.inputs)
        with torch.no_grad():
            logits = adapter.model.eval()(x)["out"]
        assert batch.data_samples is not None
        mask = batch.data_samples[1]["gt_sem_seg"]
        h, w = sizes[1]
        keep = mask != 255
        want = F.cross_entropy(logits[1, :, :h, :w].permute(1, 2, 0)[keep], mask[keep])
        assert torch.allclose(loss[1], want, atol=1e-5)
        # changing the prediction's logits only where pixels are unlabeled changes nothing
        changed = logits[1:2, :, :h, :w].clone()
        changed[..., :4, :] += 100.0
        assert torch.allclose(pixel_loss(changed, mask[None])[0], want, atol=1e-5)
        assert pixel_loss(changed, torch.full_like(mask, 255)[None])[0] == 0.0


class TestDeepLabV3(TestFCN):
    arch = "deeplabv3"


class TestFCNEnsemble(AdapterConformance):
    unit_kind = "pixel"
    deterministic_samples = 2

    def make_adapter(self, seed: int = 0) -> Adapter:
        return EnsembleAdapter([_adapter("fcn", seed), _adapter("fcn", seed + 1)])

    def make_batch(self) -> Batch:
        return _batch()

    def make_bad_batch(self) -> Batch:
        return Batch([torch.zeros(3, 0, 8)], ["bad"])


def test_patch_and_superpixel_regions_tile_each_image() -> None:
    batch = _batch()
    patches = _adapter(regions=dict(patch=8)).predict(batch)
    for i, (h, w) in enumerate(batch.image_sizes()):
        region = patches.regions()[patches.owner_U == i].reshape(h, w)
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        assert torch.equal(region, (rows // 8) * (-(-w // 8)) + cols // 8)
    # superpixels follow image structure (on pure noise SLIC merges everything into one)
    g = torch.Generator().manual_seed(1)
    blocks = []
    for h, w in batch.image_sizes():
        x = 0.05 * torch.rand(3, h, w, generator=g)
        x[:, : h // 2] += 0.8
        x[:, h // 2 :, w // 2 :] += 0.4
        blocks.append(x)
    shaped = Batch(blocks, batch.ids)
    spec = dict(kind="superpixel", n_segments=12)
    superpixels = _adapter(regions=spec).predict(shaped)
    again = _adapter(regions=spec).predict(shaped)
    assert torch.equal(superpixels.regions(), again.regions()), "the same image, the same regions"
    for i, (h, w) in enumerate(shaped.image_sizes()):
        ids = superpixels.regions()[superpixels.owner_U == i].reshape(h, w)
        count = int(ids.max()) + 1
        assert torch.equal(torch.unique(ids), torch.arange(count)) and 3 <= count <= 30
        # no superpixel straddles the bright top half's edge
        top, bottom = set(ids[: h // 2].unique().tolist()), set(ids[h // 2 :].unique().tolist())
        assert not top & bottom


def test_click_costs_make_each_region_cost_one() -> None:
    batch = _batch()
    pred = _adapter(regions=dict(patch=8, cost="clicks")).predict(batch)
    for i in range(len(batch)):
        mine = pred.owner_U == i
        per_region = torch.zeros(100, dtype=torch.float64).index_add_(
            0, pred.regions()[mine], pred.costs()[mine].double()
        )
        used = per_region[per_region > 0]
        assert torch.allclose(used, torch.ones_like(used))
    assert torch.equal(
        _adapter().predict(batch).costs(), torch.ones(sum(h * w for h, w in batch.image_sizes()))
    )


def test_lraspp_reruns_the_head_on_cached_backbone_maps() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = torchvision_segmenter("lraspp_mobilenet_v3_large", num_classes=3)
        adapter = TorchvisionSegmentationAdapter(model)
    # at initialisation the high branch is ~1e-10 on tiny inputs: give it a signal to drop
    nn.init.constant_(model.classifier.cbr[1].bias, 1.0)
    assert any("high_classifier" in str(w.message) for w in caught), "dropout injected, said"
    batch = Batch([torch.rand(3, 32, 32), torch.rand(3, 40, 24)], ["a", "b"])
    pred = adapter.predict(batch)
    x, sizes = adapter.preprocess(batch.inputs)
    with torch.no_grad():
        want = adapter.model.eval()(x)["out"].softmax(1)
    h, w = sizes[0]
    assert torch.allclose(
        pred.probs_UCK[pred.owner_U == 0, :, 0], want[0, :, :h, :w].flatten(1).T, atol=1e-6
    )
    torch.manual_seed(0)
    samples = adapter.predict(batch, n_samples=3).probs_UCK
    assert not torch.allclose(samples[..., 0], samples[..., 1])
    assert [f.name for f in adapter.feature_info] == ["backbone"]


def test_registered_builders_and_refusals() -> None:
    assert ADAPTERS.get("torchvision_segmentation") is TorchvisionSegmentationAdapter
    adapter = build(
        ADAPTERS,
        dict(
            type="torchvision_segmentation",
            model=dict(type="small_segmenter", num_classes=4, width=4),
        ),
    )
    assert adapter.task == "seg" and adapter.num_classes == 4
    assert MODELS.get("torchvision_segmentation") is torchvision_segmenter
    with pytest.raises(ValueError, match="never downloads"):
        torchvision_segmenter("fcn_resnet50", num_classes=3, weights="DEFAULT")
    with pytest.raises(ValueError, match="unknown torchvision segmenter"):
        torchvision_segmenter("unet", num_classes=3)
    with pytest.raises(TypeError, match=r"backbone and \.classifier"):
        TorchvisionSegmentationAdapter(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="regions kind"):
        PixelRegions(kind="hexagon")
    with pytest.raises(ValueError, match="does not take"):
        PixelRegions.of({"size": 3})
    adapter = _adapter()
    with pytest.raises(ValueError, match=r"\[3, H, W\] float RGB"):
        adapter.predict(Batch([torch.zeros(1, 8, 8)], ["gray"]))
    with pytest.raises(ValueError, match="does not match its image"):
        adapter.per_sample_loss(
            Batch([torch.zeros(3, 8, 8)], ["x"], data_samples=[{"gt_sem_seg": torch.zeros(4, 4)}])
        )


@pytest.mark.parametrize("scale", [3.0, 40.0])  # class ranges under and over SHIFT_RANGE
def test_upsampled_softmax_is_the_softmax_of_the_upsampled_logits(scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, 6, generator=g) * scale
    want = F.interpolate(logits, size=(13, 22), mode="bilinear", align_corners=False).softmax(1)
    got = upsampled_softmax(logits, (13, 22))
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    out = torch.full((2, 13, 22, 5), float("nan"))
    again = upsampled_softmax(logits, (13, 22), out)
    assert again.data_ptr() == out.data_ptr() and torch.equal(again, got)


def test_upsampled_softmax_of_logits_too_wide_to_shift() -> None:
    # between two pixels sure of opposite classes the shifted logits would all underflow
    logits = torch.tensor([[200.0, -200.0], [-200.0, 200.0]]).T.reshape(1, 2, 1, 2)
    assert float(logits.max() - logits.min()) > SHIFT_RANGE
    want = F.interpolate(logits, size=(1, 3), mode="bilinear", align_corners=False).softmax(1)
    got = upsampled_softmax(logits, (1, 3))
    assert torch.isfinite(got).all() and torch.allclose(got, want)


def test_spare_output_is_reused_only_once_nothing_holds_it() -> None:
    spare = SpareOutput()
    like = torch.zeros(1)
    a = spare.take((3, 5, 2), like)
    ptr = a.data_ptr()
    view = a.permute(1, 2, 0)
    del a
    b = spare.take((3, 5, 2), like)  # the view still holds the memory: fresh memory
    assert b.data_ptr() != ptr and view.data_ptr() == ptr
    ptr_b = b.data_ptr()
    del view, b
    c = spare.take((2, 5, 2), like)  # the kept memory (b's), large enough and unused
    assert c.data_ptr() == ptr_b and c.shape == (2, 5, 2) and c.is_contiguous()
    c.fill_(1.0)
    assert spare.take((9, 9, 9), like).data_ptr() != ptr_b  # too small: fresh memory
    del c
    spare.clear()
    assert spare.take((2, 5, 2), like.double()).dtype == torch.float64


def test_spare_output_is_not_reused_under_a_storage_handle_or_shared_or_far_too_large() -> None:
    spare = SpareOutput()
    like = torch.zeros(1)
    a = spare.take((4, 10), like)
    handle = a.untyped_storage()  # the very storage object the spare keeps
    ptr = a.data_ptr()
    del a
    assert spare.take((4, 10), like).data_ptr() != ptr
    del handle
    b = spare.take((4, 10), like)
    b.share_memory_()  # as torch.multiprocessing does before sending it to another process
    ptr = b.data_ptr()
    del b
    assert spare.take((4, 10), like).data_ptr() != ptr
    c = spare.take((4, 10), like)
    ptr = c.data_ptr()
    del c
    assert spare.take((1, 10), like).data_ptr() != ptr  # 4x the size asked for: not handed out
    assert copy.deepcopy(spare)._storage is None  # a copy keeps no memory of its own


def test_mc_outputs_reuse_memory_without_overwriting_held_predictions() -> None:
    adapter = _adapter("deeplabv3")
    batch = _batch()
    torch.manual_seed(0)
    first = adapter.predict(batch, n_samples=3)
    held = first.probs_UCK.clone()
    torch.manual_seed(1)
    second = adapter.predict(batch, n_samples=3)  # first is held: its memory is left alone
    assert torch.equal(first.probs_UCK, held)
    assert second.probs_UCK.data_ptr() != first.probs_UCK.data_ptr()
    expected = second.probs_UCK.clone()
    ptr = second.probs_UCK.data_ptr()
    del first, second
    torch.manual_seed(1)
    third = adapter.predict(batch, n_samples=3)  # nothing holds the last output: reused
    assert third.probs_UCK.data_ptr() == ptr
    assert torch.equal(third.probs_UCK, expected)
