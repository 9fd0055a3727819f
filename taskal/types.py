"""The adapter contract: one interface that every task (image, box, pixel) implements.

A *unit* is what a probability vector belongs to: an image for classification, a box for
detection, a pixel or region for segmentation. Every adapter returns

* ``probs_UCK``: class probabilities ``[U, C, K]`` (never logits), ``K`` stochastic samples
  last (baal's convention), each ``probs_UCK[u, :, k]`` summing to one;
* ``owner_U``: ``[U]`` long, the position in the batch of the item each unit belongs to;
* ``boxes_U4`` (detection only): ``[U, 4]`` xyxy.

Items are identified by stable ids (an image path or a data set id), never by their
position in a loader: :class:`Batch` carries them next to the inputs.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

ItemId = int | str


@dataclass
class Batch:
    """A batch of pool items as an adapter consumes it.

    Attributes:
        inputs: the model input, ``[B, ...]``.
        ids: the stable id of every item, ``len(ids) == B``.
        targets: optional labels (used by training and by ``per_sample_loss``).
    """

    inputs: Tensor
    ids: Sequence[ItemId]
    targets: Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.ids) != self.inputs.shape[0]:
            raise ValueError(
                f"Batch has {self.inputs.shape[0]} inputs but {len(self.ids)} ids; "
                "give exactly one stable id per item."
            )

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> Batch:
        targets = None if self.targets is None else self.targets.to(device)
        return Batch(self.inputs.to(device), self.ids, targets)


@dataclass
class Predictions:
    """Per-unit class probabilities under ``K`` stochastic samples.

    Attributes:
        probs_UCK: ``[U, C, K]`` probabilities, each column summing to one.
        owner_U: ``[U]`` long, index into the batch (or, once gathered, into the pool).
        boxes_U4: ``[U, 4]`` xyxy boxes for detection units, else ``None``.
    """

    probs_UCK: Tensor
    owner_U: Tensor
    boxes_U4: Tensor | None = None

    @property
    def num_units(self) -> int:
        return int(self.probs_UCK.shape[0])


@dataclass(frozen=True)
class FeatureInfo:
    """A feature layer an adapter exposes: its name, channels and stride (input px / cell)."""

    name: str
    channels: int
    stride: int


@dataclass
class PoolOutputs:
    """What a strategy sees: adapter outputs gathered over the unlabeled candidates.

    Only the fields a strategy declares in ``requires`` are filled.

    Attributes:
        ids: stable ids of the ``N`` candidates, in candidate order.
        predictions: probabilities whose ``owner_U`` indexes ``ids``.
        embeddings_ND: pooled penultimate embeddings ``[N, D]``.
        labeled_embeddings_LD: embeddings ``[L, D]`` of the already-labeled items.
        loss_pred_N: predicted loss per candidate ``[N]`` (LLAL).
    """

    ids: list[ItemId]
    predictions: Predictions | None = None
    embeddings_ND: Tensor | None = None
    labeled_embeddings_LD: Tensor | None = None
    loss_pred_N: Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, positions_M: Tensor) -> PoolOutputs:
        """The outputs of candidates ``positions_M`` only, in that order.

        Owners are re-indexed to ``[0, M)`` and units sorted by their new owner, so
        image-level predictions stay one unit per item in item order.
        """
        positions_M = positions_M.long().cpu()
        ids = [self.ids[int(i)] for i in positions_M]
        predictions = None
        if self.predictions is not None:
            p = self.predictions
            remap = torch.full((len(self.ids),), -1, dtype=torch.long)
            remap[positions_M] = torch.arange(len(positions_M))
            new_owner = remap[p.owner_U.cpu()]
            kept = torch.nonzero(new_owner >= 0)[:, 0]
            # units follow the order of positions_M (stable within an item)
            kept = kept[torch.sort(new_owner[kept], stable=True).indices]
            predictions = Predictions(
                p.probs_UCK[kept.to(p.probs_UCK.device)],
                new_owner[kept].to(p.owner_U.device),
                None if p.boxes_U4 is None else p.boxes_U4[kept.to(p.boxes_U4.device)],
            )

        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[positions_M.to(t.device)]

        return PoolOutputs(
            ids,
            predictions,
            take(self.embeddings_ND),
            self.labeled_embeddings_LD,
            take(self.loss_pred_N),
        )


class Adapter(abc.ABC):
    """Wraps a task model and exposes what active learning needs.

    Subclasses implement the abstract methods; a shared conformance test
    (``tests/adapters/conformance.py``) checks every adapter against this contract.
    """

    #: the task this adapter serves: "cls", "det" or "seg".
    task: str = ""

    @property
    @abc.abstractmethod
    def model(self) -> torch.nn.Module:
        """The wrapped model."""

    @property
    @abc.abstractmethod
    def num_classes(self) -> int:
        """Number of classes ``C`` in ``probs_UCK``."""

    @property
    @abc.abstractmethod
    def feature_info(self) -> list[FeatureInfo]:
        """Feature layers, shallow to deep, known before any forward on data."""

    @abc.abstractmethod
    def predict(self, batch: Batch, n_samples: int = 1) -> Predictions:
        """Probabilities per unit; ``n_samples > 1`` draws MC-dropout samples.

        With ``n_samples > 1`` the adapter enables :meth:`stochastic` itself; with
        ``n_samples == 1`` the prediction is deterministic (eval mode).
        """

    @abc.abstractmethod
    def features(self, batch: Batch, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """``{layer: [B, C_l, H_l, W_l]}`` for the named layers (all by default)."""

    @abc.abstractmethod
    def embed(self, batch: Batch) -> Tensor:
        """Detached pooled embedding ``[B, D]`` (the classifier's input)."""

    @abc.abstractmethod
    def per_sample_loss(self, batch: Batch) -> Tensor:
        """Unreduced task loss ``[B]``; needs ``batch.targets``."""

    @abc.abstractmethod
    def stochastic(self) -> contextlib.AbstractContextManager[None]:
        """Context in which dropout is active at test time (BatchNorm stays in eval)."""

    @abc.abstractmethod
    def capture_features(
        self, names: Sequence[str] | None = None
    ) -> contextlib.AbstractContextManager[dict[str, Tensor]]:
        """Context yielding a dict that forward hooks fill with the named layers' outputs.

        Gradients flow through the captured tensors (LLAL trains on them); the hooks are
        removed on exit, also when the forward raises.
        """

    #: an optional loss-prediction module (LLAL), attached with :meth:`attach_loss_predictor`.
    loss_predictor: torch.nn.Module | None = None

    def attach_loss_predictor(self, module: torch.nn.Module) -> None:
        """Attach a loss-prediction module whose ``layers`` attribute names feature layers."""
        known = {f.name for f in self.feature_info}
        missing = [n for n in getattr(module, "layers", []) if n not in known]
        if missing:
            raise ValueError(
                f"the loss predictor reads layers {missing} that this adapter does not expose; "
                f"available: {sorted(known)}"
            )
        self.loss_predictor = module

    def predict_loss(self, batch: Batch) -> Tensor:
        """Predicted task loss ``[B]`` from the attached loss-prediction module (LLAL)."""
        if self.loss_predictor is None:
            raise RuntimeError(
                "no loss predictor attached: the 'llal' strategy needs a model trained with "
                "taskal.llal.LossPredictionModule (see taskal.training.train_classifier)."
            )
        layers = list(getattr(self.loss_predictor, "layers"))  # noqa: B009
        feats = self.features(batch, layers)
        was_training = self.loss_predictor.training
        self.loss_predictor.eval()
        try:
            with torch.no_grad():
                return self.loss_predictor(feats)
        finally:
            self.loss_predictor.train(was_training)

    def last_layer(self) -> tuple[Tensor, Tensor | None]:
        """Weight ``[C, D]`` and bias ``[C]`` of the final linear layer (for BADGE)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its last layer")
