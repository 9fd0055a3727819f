"""An in-memory pool of items identified by stable ids."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from taskal.types import Batch, ItemId


class TensorPool:
    """Items as tensors, addressed by stable ids (never by position).

    Args:
        inputs: ``[N, ...]`` model inputs.
        targets: ``[N]`` labels (the oracle in simulations), optional.
        ids: one unique id per item; default ``range(N)``.
        classes: class names, optional.
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor | None = None,
        ids: Sequence[ItemId] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        ids = list(range(inputs.shape[0])) if ids is None else list(ids)
        if len(ids) != inputs.shape[0]:
            raise ValueError(f"{inputs.shape[0]} inputs but {len(ids)} ids")
        if targets is not None and targets.shape[0] != inputs.shape[0]:
            raise ValueError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets")
        self._row = {item: i for i, item in enumerate(ids)}
        if len(self._row) != len(ids):
            raise ValueError("item ids must be unique")
        self.inputs = inputs
        self.targets = targets
        self.ids = ids
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, ids: Sequence[ItemId]) -> Tensor:
        """Row positions of ``ids``; a clear error names ids that are not in the pool."""
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise KeyError(f"{len(missing)} ids are not in the pool, e.g. {missing[:3]}")
        return torch.tensor([self._row[i] for i in ids], dtype=torch.long)

    def take(self, ids: Sequence[ItemId]) -> Batch:
        """All of ``ids`` as one batch (with targets when the pool has them)."""
        rows = self.rows(ids)
        targets = None if self.targets is None else self.targets[rows]
        return Batch(self.inputs[rows], list(ids), targets)

    def batches(self, ids: Sequence[ItemId], batch_size: int) -> Iterator[Batch]:
        """``ids`` in order, ``batch_size`` at a time."""
        ids = list(ids)
        for start in range(0, len(ids), batch_size):
            yield self.take(ids[start : start + batch_size])

    def subset(self, ids: Sequence[ItemId]) -> TensorPool:
        rows = self.rows(ids)
        targets = None if self.targets is None else self.targets[rows]
        return TensorPool(self.inputs[rows], targets, list(ids), self.classes)
