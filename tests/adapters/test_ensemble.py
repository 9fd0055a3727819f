from __future__ import annotations

import pytest
import torch

from taskal.adapters import ClassificationAdapter, EnsembleAdapter
from taskal.models import SmallCNN
from taskal.types import Batch, Predictions, Units

from .conformance import AdapterConformance
from .toys import ToyBoxAdapter


def _member(seed: int, classes: int = 3) -> ClassificationAdapter:
    torch.manual_seed(seed)
    return ClassificationAdapter(SmallCNN(1, classes, width=8), input_shape=(1, 8, 8))


class TestEnsemble(AdapterConformance):
    deterministic_samples = 3

    def make_adapter(self, seed: int = 0) -> EnsembleAdapter:
        return EnsembleAdapter([_member(seed + s) for s in range(3)])

    def make_batch(self) -> Batch:
        g = torch.Generator().manual_seed(0)
        return Batch(torch.rand(4, 1, 8, 8, generator=g), list("abcd"), torch.tensor([0, 1, 2, 0]))

    def test_members_are_the_sample_axis(self) -> None:
        ens, batch = self.make_adapter(), self.make_batch()
        probs = ens.predict(batch).probs_UCK
        for k, member in enumerate(ens.members):
            assert torch.equal(probs[..., k], member.predict(batch).probs_UCK[..., 0])

    def test_feature_modules_name_the_first_member(self) -> None:
        ens = self.make_adapter()
        assert [f.module for f in ens.feature_info] == ["0.block1", "0.block2", "0.block3"]
        assert [f.name for f in ens.feature_info] == ["block1", "block2", "block3"]


def test_ensemble_needs_two_matching_members() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        EnsembleAdapter([_member(0)])
    with pytest.raises(ValueError, match="disagree"):
        EnsembleAdapter([_member(0, 3), _member(1, 4)])
    with pytest.raises(ValueError, match="disagree"):
        EnsembleAdapter([_member(0), ToyBoxAdapter(num_classes=2)])
    with pytest.raises(ValueError, match="probability kinds"):
        EnsembleAdapter([ToyBoxAdapter(2, "sigmoid"), ToyBoxAdapter(1, "softmax")])


def test_box_members_score_the_first_members_boxes() -> None:
    """Members with other weights keep other boxes alone; in the ensemble they re-score the
    first member's boxes, so every sample describes the same boxes."""
    torch.manual_seed(0)
    first = ToyBoxAdapter(2)
    torch.manual_seed(1)
    second = ToyBoxAdapter(2)
    batch = Batch([torch.rand(3, 40, 48), torch.rand(3, 32, 56)], ["a", "b"])
    own = second.predict(batch).units()
    fixed = first.predict(batch).units()
    assert not torch.equal(own.unit_U, fixed.unit_U)
    pred = EnsembleAdapter([first, second]).predict(batch)
    assert torch.equal(pred.units().unit_U, fixed.unit_U)
    assert pred.boxes_U4 is not None and fixed.boxes_U4 is not None
    assert torch.equal(pred.boxes_U4, fixed.boxes_U4)


class _Misaligned(ClassificationAdapter):
    """A member that ignores the units it is given (drops the last image)."""

    def predict(self, batch: Batch, n_samples: int = 1, units: Units | None = None) -> Predictions:
        pred = super().predict(batch, n_samples)
        return Predictions(pred.probs_UCK[:-1], pred.owner_U[:-1])


def test_member_returning_other_units_is_refused() -> None:
    torch.manual_seed(1)
    bad = _Misaligned(SmallCNN(1, 3, width=8), input_shape=(1, 8, 8))
    ens = EnsembleAdapter([_member(0), bad])
    batch = Batch(torch.rand(3, 1, 8, 8), list("abc"))
    with pytest.raises(ValueError, match=r"ensemble member 1 \(_Misaligned\): units do not match"):
        ens.predict(batch)
