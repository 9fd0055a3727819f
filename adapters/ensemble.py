"""A deep ensemble (Lakshminarayanan et al. 2017; Beluch et al. 2018) as one adapter.

Members are adapters of the same task trained from different seeds; :meth:`predict` puts
their probabilities on the sample axis, so ``K`` is the number of members (times
``n_samples``). The first member's deterministic pass fixes the units (its boxes after NMS,
its pixels) and every other member re-scores exactly those, so ``probs_UCK[u]`` describes the
same box in every member. Features, embeddings and losses come from the first member.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from taskal.registry import ADAPTERS
from taskal.types import (
    Adapter,
    Batch,
    FeatureInfo,
    FeatureMap,
    Predictions,
    Units,
    check_unit_alignment,
)


@ADAPTERS.register_module(name="ensemble")
class EnsembleAdapter(Adapter):
    """Combine ``members``: at least two adapters with the same task, classes and prob kind.

    ``model`` is an ``nn.ModuleList`` of the members' models, so the ``module`` of every
    :class:`FeatureInfo` is prefixed with ``"0."`` (the first member's model).
    """

    def __init__(self, members: Sequence[Adapter]) -> None:
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        tasks = {m.task for m in members}
        classes = {m.num_classes for m in members}
        kinds = {m.prob_kind for m in members}
        backgrounds = {getattr(m, "background", None) for m in members}
        if len(tasks) != 1 or len(classes) != 1 or len(kinds) != 1 or len(backgrounds) != 1:
            raise ValueError(
                f"ensemble members disagree: tasks {tasks}, classes {classes}, probability "
                f"kinds {kinds}, background columns {backgrounds}; combine adapters of one "
                "task with the same classes"
            )
        self.members = members
        self.task = members[0].task
        self.prob_kind = members[0].prob_kind
        self._model = nn.ModuleList([m.model for m in members])

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def num_classes(self) -> int:
        return self.members[0].num_classes

    @property
    def background(self) -> int | None:
        """The members' background column (they agree), ``None`` when they have none."""
        return getattr(self.members[0], "background", None)

    @property
    def feature_info(self) -> list[FeatureInfo]:
        return [replace(f, module=f"0.{f.module}") for f in self.members[0].feature_info]

    def predict(self, batch: Batch, n_samples: int = 1, units: Units | None = None) -> Predictions:
        """``n_samples`` predictions per member on the units the first member fixes.

        Raises:
            ValueError: when a member does not return the units it was given, or returns
                another probability kind.
        """
        reuse = None
        if units is None:  # the first member's deterministic pass fixes the units
            reuse = self.members[0].predict(batch)
            units = reuse.units()
        preds: list[Predictions] = []
        for i, member in enumerate(self.members):
            if i == 0 and reuse is not None and n_samples == 1:
                pred = reuse
            else:
                pred = member.predict(batch, n_samples, units=units)
            who = f"ensemble member {i} ({type(member).__name__})"
            check_unit_alignment(units, pred.units(), who)
            if preds and pred.kind != preds[0].kind:
                raise ValueError(
                    f"{who} returned {pred.kind!r} probabilities, member 0 {preds[0].kind!r}; "
                    "members must agree"
                )
            preds.append(pred)
        first = preds[0]
        return Predictions(
            torch.cat([p.probs_UCK for p in preds], dim=-1),
            first.owner_U,
            first.kind,
            unit_U=first.unit_U,
            boxes_U4=first.boxes_U4,
            region_U=first.region_U,
            cost_U=first.cost_U,
        )

    def features(self, batch: Batch, names: Sequence[str] | None = None) -> dict[str, FeatureMap]:
        return self.members[0].features(batch, names)

    def capture_features(
        self, names: Sequence[str] | None = None
    ) -> contextlib.AbstractContextManager[Mapping[str, FeatureMap]]:
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
