"""The toy box and pixel adapters against the contract, alone and as ensembles."""

from __future__ import annotations

import pytest
import torch

from taskal.adapters import EnsembleAdapter
from taskal.types import Adapter, Batch, Units, same_units

from .conformance import AdapterConformance
from .toys import ToyBoxAdapter, ToyPixelAdapter


def _box_batch(labels: tuple[int, int] = (1, 0)) -> Batch:
    g = torch.Generator().manual_seed(0)
    samples = [
        {"boxes": torch.tensor([[4.0, 4.0, 20.0, 24.0]]), "labels": torch.tensor([labels[0]])},
        {"boxes": torch.tensor([[8.0, 0.0, 40.0, 16.0]]), "labels": torch.tensor([labels[1]])},
    ]
    images = [torch.rand(3, 40, 48, generator=g), torch.rand(3, 32, 56, generator=g)]
    return Batch(images, ["a", "b"], data_samples=samples)


def _pixel_batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    sizes = [(12, 16), (10, 14), (9, 9)]
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    samples = [
        {"gt_sem_seg": torch.randint(0, 3, (h, w), generator=g)}
        if i != 1
        else {"masks": torch.randint(0, 3, (h, w), generator=g)}
        for i, (h, w) in enumerate(sizes)
    ]
    return Batch(images, ["p", "q", "r"], data_samples=samples)


class TestToyBoxSoftmax(AdapterConformance):
    unit_kind = "box"

    def make_adapter(self, seed: int = 0) -> Adapter:
        torch.manual_seed(seed)
        return ToyBoxAdapter(num_classes=2, kind="softmax")

    def make_batch(self) -> Batch:
        return _box_batch()

    def test_units_are_anchors_in_their_own_regions(self) -> None:
        adapter = self.make_adapter()
        assert isinstance(adapter, ToyBoxAdapter)
        pred = adapter.predict(self.make_batch())
        assert adapter.num_classes == 3  # two classes and background
        assert pred.region_U is not None and torch.equal(pred.region_U, pred.units().unit_U)
        assert set(pred.owner_U.tolist()) == {0, 1}
        assert max(pred.owner_U.tolist().count(i) for i in (0, 1)) <= adapter.max_per_image

    def test_rescoring_a_subset_of_units(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        pred = adapter.predict(batch)
        units = pred.units()
        assert units.boxes_U4 is not None
        subset = Units(units.owner_U[1::2], units.unit_U[1::2], units.boxes_U4[1::2])
        again = adapter.predict(batch, units=subset)
        assert same_units(again.units(), subset)
        assert torch.allclose(again.probs_UCK, pred.probs_UCK[1::2])
        with pytest.raises(ValueError, match="anchors that this batch does not have"):
            adapter.predict(
                batch, units=Units(torch.tensor([0]), torch.tensor([10**6]), units.boxes_U4[:1])
            )

    def test_multi_level_features_and_gradients(self) -> None:
        adapter = self.make_adapter()
        assert isinstance(adapter, ToyBoxAdapter)
        x = torch.rand(2, 3, 32, 32)
        with adapter.capture_features() as store:
            adapter.model(x)
            tower, levels = store["tower"], store["levels"]
            assert isinstance(tower, tuple) and isinstance(levels, tuple)
            assert [t.shape[-1] for t in tower] == [8, 4] == [t.shape[-1] for t in levels]
            torch.stack([t.mean() for t in tower]).sum().backward()  # LLAL trains through them
        assert adapter.net.head.tower.weight.grad is not None


class TestToyBoxSigmoidOneClass(AdapterConformance):
    unit_kind = "box"
    prob_kind = "sigmoid"

    def make_adapter(self, seed: int = 0) -> Adapter:
        torch.manual_seed(seed)
        return ToyBoxAdapter(num_classes=1, kind="sigmoid")

    def make_batch(self) -> Batch:
        return _box_batch(labels=(0, 0))


class TestToyPixel(AdapterConformance):
    unit_kind = "pixel"

    def make_adapter(self, seed: int = 0) -> Adapter:
        torch.manual_seed(seed)
        return ToyPixelAdapter(num_classes=3, patch=4)

    def make_batch(self) -> Batch:
        return _pixel_batch()

    def test_units_are_pixels_in_patches(self) -> None:
        pred = self.make_adapter().predict(self.make_batch())
        first = pred.owner_U == 0  # a 12 x 16 image: 3 x 4 patches of 4 x 4 pixels
        assert torch.equal(pred.units().unit_U[first], torch.arange(12 * 16))
        regions = pred.regions()[first].view(12, 16)
        assert regions[0, 0] == 0 and regions[3, 3] == 0 and regions[0, 4] == 1
        assert regions[4, 0] == 4 and int(regions.max()) == 11
        assert torch.equal(pred.costs(), torch.ones(pred.num_units))


class TestToyBoxEnsemble(AdapterConformance):
    unit_kind = "box"
    deterministic_samples = 2

    def make_adapter(self, seed: int = 0) -> Adapter:
        members = []
        for s in (seed, seed + 100):
            torch.manual_seed(s)
            members.append(ToyBoxAdapter(num_classes=2, kind="softmax"))
        return EnsembleAdapter(members)

    def make_batch(self) -> Batch:
        return _box_batch()


class TestToySigmoidEnsemble(AdapterConformance):
    unit_kind = "box"
    prob_kind = "sigmoid"
    deterministic_samples = 2

    def make_adapter(self, seed: int = 0) -> Adapter:
        members = []
        for s in (seed, seed + 100):
            torch.manual_seed(s)
            members.append(ToyBoxAdapter(num_classes=1, kind="sigmoid"))
        return EnsembleAdapter(members)

    def make_batch(self) -> Batch:
        return _box_batch(labels=(0, 0))


class TestToyPixelEnsemble(AdapterConformance):
    unit_kind = "pixel"
    deterministic_samples = 2

    def make_adapter(self, seed: int = 0) -> Adapter:
        members = []
        for s in (seed, seed + 100):
            torch.manual_seed(s)
            members.append(ToyPixelAdapter(num_classes=3, patch=4))
        return EnsembleAdapter(members)

    def make_batch(self) -> Batch:
        return _pixel_batch()
