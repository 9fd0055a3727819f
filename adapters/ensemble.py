"""A deep ensemble (Lakshminarayanan et al. 2017; Beluch et al. 2018) as one adapter.

Members are adapters of the same task trained from different seeds; :meth:`predict` puts
their probabilities on the sample axis, so ``K`` is the number of members. Features,
embeddings and losses come from the first member.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from taskal.registry import ADAPTERS
from taskal.types import Adapter, Batch, FeatureInfo, Predictions


@ADAPTERS.register_module(name="ensemble")
class EnsembleAdapter(Adapter):
    """Combine ``members`` (at least two adapters with the same task and classes)."""

    def __init__(self, members: Sequence[Adapter]) -> None:
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        tasks = {m.task for m in members}
        classes = {m.num_classes for m in members}
        if len(tasks) != 1 or len(classes) != 1:
            raise ValueError(f"ensemble members disagree: tasks {tasks}, classes {classes}")
        self.members = members
        self.task = members[0].task

    @property
    def model(self) -> nn.Module:
        return nn.ModuleList([m.model for m in self.members])

    @property
    def num_classes(self) -> int:
        return self.members[0].num_classes

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return self.members[0].feature_info

    def predict(self, batch: Batch, n_samples: int = 1) -> Predictions:
        """One deterministic prediction per member (``n_samples`` per member if > 1)."""
        preds = [m.predict(batch, n_samples) for m in self.members]
        first = preds[0]
        for p in preds[1:]:
            if not torch.equal(p.owner_U, first.owner_U):
                raise ValueError(
                    "ensemble members returned different units; use image-level units or an "
                    "adapter that fixes units (proposals) before sampling"
                )
        probs_UCK = torch.cat([p.probs_UCK for p in preds], dim=-1)
        return Predictions(probs_UCK, first.owner_U, first.boxes_U4)

    def features(self, batch: Batch, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        return self.members[0].features(batch, names)

    def capture_features(
        self, names: Sequence[str] | None = None
    ) -> contextlib.AbstractContextManager[dict[str, Tensor]]:
        return self.members[0].capture_features(names)

    def embed(self, batch: Batch) -> Tensor:
        return self.members[0].embed(batch)

    def per_sample_loss(self, batch: Batch) -> Tensor:
        return self.members[0].per_sample_loss(batch)

    @contextlib.contextmanager
    def stochastic(self) -> Iterator[None]:
        """MC dropout in every member at once."""
        with contextlib.ExitStack() as stack:
            for member in self.members:
                stack.enter_context(member.stochastic())
            yield

    def last_layer(self) -> tuple[Tensor, Tensor | None]:
        return self.members[0].last_layer()
