from __future__ import annotations

import pytest
import torch

from taskal.adapters import ClassificationAdapter, EnsembleAdapter
from taskal.models import SmallCNN
from taskal.types import Batch

from .conformance import AdapterConformance


def _member(seed: int, classes: int = 3) -> ClassificationAdapter:
    torch.manual_seed(seed)
    return ClassificationAdapter(SmallCNN(1, classes, width=8), input_shape=(1, 8, 8))


class TestEnsemble(AdapterConformance):
    deterministic_samples = 3

    def make_adapter(self) -> EnsembleAdapter:
        return EnsembleAdapter([_member(s) for s in range(3)])

    def make_batch(self) -> Batch:
        g = torch.Generator().manual_seed(0)
        return Batch(torch.rand(4, 1, 8, 8, generator=g), list("abcd"), torch.tensor([0, 1, 2, 0]))

    def test_members_are_the_sample_axis(self) -> None:
        ens, batch = self.make_adapter(), self.make_batch()
        probs = ens.predict(batch).probs_UCK
        for k, member in enumerate(ens.members):
            assert torch.equal(probs[..., k], member.predict(batch).probs_UCK[..., 0])


def test_ensemble_needs_two_matching_members() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        EnsembleAdapter([_member(0)])
    with pytest.raises(ValueError, match="disagree"):
        EnsembleAdapter([_member(0, 3), _member(1, 4)])
