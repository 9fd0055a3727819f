"""The adapter contract: one interface that every task (image, box, pixel) implements.

A *unit* is what a probability vector belongs to: an image for classification, a box for
detection, a pixel for segmentation. An adapter's :meth:`Adapter.predict` returns
:class:`Predictions`:

==============  ==================  =========================================================
field           shape               meaning
==============  ==================  =========================================================
``probs_UCK``   ``[U, C, K]``       probabilities (never logits), ``K`` samples last (baal)
``kind``        ``str``             ``"softmax"``: each ``[u, :, k]`` sums to one (C may
                                    include background); ``"sigmoid"``: independent per-class
                                    scores in ``[0, 1]`` (RetinaNet, FCOS; C may be 1)
``owner_U``     ``[U]`` long        position in the batch of the item each unit belongs to
``unit_U``      ``[U]`` long        the unit's identity inside its item: an anchor or
                                    proposal index, a flat pixel index, an image's 0
``boxes_U4``    ``[U, 4]``          xyxy boxes of detection units, else ``None``
``region_U``    ``[U]`` long        the region each unit falls in (a box, a superpixel, a
                                    patch), for region queries; ``None`` = one region per unit
``cost_U``      ``[U]``             annotation cost a unit adds to its region (default 1)
==============  ==================  =========================================================

Unit identity: a deterministic pass *fixes* the units (the boxes kept after NMS, mapped back
to their anchors or proposals; the pixels; the regions). ``predict(batch, n_samples,
units=fixed)`` re-scores exactly those units, so the ``K`` MC-dropout samples and the members
of an ensemble describe the same boxes: :meth:`Predictions.units` returns them and
:func:`same_units` checks the match.

A :class:`Batch` holds differently sized images (a list of tensors or one stacked tensor)
with their OpenMMLab data samples (``DetDataSample``, ``SegDataSample``) or torchvision
target dicts; the adapter owns its preprocessing. During selection the selector passes
:meth:`Batch.without_labels`, so ground truth never reaches an adapter or a strategy.

Feature layers (:class:`FeatureInfo`) may carry several levels (an FPN): a captured layer is
then a tuple of ``[B, C, H_l, W_l]`` maps, one per stride.

Queries (an item, or an item plus a region, with a cost) and the labeled state (full and
partial labels) live in :mod:`taskal.queries`.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

ItemId = int | str
#: a captured feature layer: one map, or one map per level (FPN) in stride order.
FeatureMap = Tensor | tuple[Tensor, ...]

PROB_KINDS = ("softmax", "sigmoid")

#: metainfo an adapter may see during selection (an allowlist: everything else in a data
#: sample, ground truth and label-file paths such as mmseg's ``seg_map_path`` included, is
#: stripped). ``Selector(keep_meta=...)`` adds keys of your own, e.g. a scan's ``spacing``.
META_KEYS = frozenset(
    {
        "img_id",
        "image_id",
        "img_path",
        "ori_shape",
        "img_shape",
        "pad_shape",
        "batch_input_shape",
        "scale_factor",
        "flip",
        "flip_direction",
        "homography_matrix",
    }
)


def _strip_sample(sample: Any, keep: Collection[str] = META_KEYS) -> Any:
    """A data sample reduced to the allowed metainfo (no ground truth, no label paths)."""
    if sample is None:
        return None
    if isinstance(sample, Mapping):
        return {k: v for k, v in sample.items() if k in keep}
    metainfo_items = getattr(sample, "metainfo_items", None)
    if callable(metainfo_items):  # an mmengine BaseDataElement (DetDataSample, SegDataSample)
        return type(sample)(metainfo={k: v for k, v in metainfo_items() if k in keep})
    raise TypeError(
        f"cannot strip labels from a {type(sample).__name__} data sample; use an mmengine "
        "data element (DetDataSample, SegDataSample) or a dict"
    )


@dataclass
class Batch:
    """A batch of pool items as an adapter consumes it.

    Attributes:
        inputs: one stacked tensor ``[B, ...]`` or a list of ``B`` tensors of different
            sizes (detection and segmentation images).
        ids: the stable id of every item, ``len(ids) == B``.
        targets: labels for training and :meth:`Adapter.per_sample_loss` (``[B]`` class
            indices for classification); ``None`` during selection.
        data_samples: one OpenMMLab data sample or torchvision target dict per item, or
            ``None``; carries metainfo (image sizes, scale factors) and, outside selection,
            ground truth.
    """

    inputs: Tensor | list[Tensor]
    ids: Sequence[ItemId]
    targets: Any = None
    data_samples: list[Any] | None = None

    def __post_init__(self) -> None:
        n = self.inputs.shape[0] if isinstance(self.inputs, Tensor) else len(self.inputs)
        if len(self.ids) != n:
            raise ValueError(
                f"Batch has {n} inputs but {len(self.ids)} ids; give exactly one stable id "
                "per item."
            )
        if self.data_samples is not None and len(self.data_samples) != n:
            raise ValueError(f"Batch has {n} inputs but {len(self.data_samples)} data samples")

    def __len__(self) -> int:
        return len(self.ids)

    def image_sizes(self) -> list[tuple[int, int]]:
        """``(H, W)`` of every input."""
        return [(int(x.shape[-2]), int(x.shape[-1])) for x in self.inputs]

    def without_labels(self, keep: Collection[str] = META_KEYS) -> Batch:
        """The same items with ``targets`` dropped and data samples reduced to the metainfo
        keys in ``keep`` (:data:`META_KEYS` by default): no ground truth, no label paths."""
        samples = None
        if self.data_samples is not None:
            samples = [_strip_sample(s, keep) for s in self.data_samples]
        return Batch(self.inputs, self.ids, None, samples)

    def to(self, device: torch.device | str) -> Batch:
        inputs: Tensor | list[Tensor]
        if isinstance(self.inputs, Tensor):
            inputs = self.inputs.to(device)
        else:
            inputs = [x.to(device) for x in self.inputs]
        targets = self.targets.to(device) if isinstance(self.targets, Tensor) else self.targets
        return Batch(inputs, self.ids, targets, self.data_samples)


@dataclass
class Units:
    """The identity of a prediction's units, fixed by a deterministic pass.

    Attributes:
        owner_U: ``[U]`` position in the batch of each unit's item.
        unit_U: ``[U]`` identity of the unit inside its item (anchor/proposal/pixel index).
        boxes_U4: ``[U, 4]`` xyxy boxes of detection units, else ``None``.
    """

    owner_U: Tensor
    unit_U: Tensor
    boxes_U4: Tensor | None = None

    def __len__(self) -> int:
        return int(self.owner_U.shape[0])


def same_units(a: Units, b: Units) -> bool:
    """Whether two predictions describe exactly the same units (owners, ids and boxes)."""
    if len(a) != len(b):
        return False
    if not torch.equal(a.owner_U.cpu(), b.owner_U.cpu()):
        return False
    if not torch.equal(a.unit_U.cpu(), b.unit_U.cpu()):
        return False
    if (a.boxes_U4 is None) != (b.boxes_U4 is None):
        return False
    return a.boxes_U4 is None or torch.equal(a.boxes_U4.cpu(), b.boxes_U4.cpu())  # type: ignore[union-attr]


@dataclass
class Predictions:
    """Per-unit class probabilities under ``K`` stochastic samples (see the module table).

    ``unit_U`` defaults to the unit's rank inside its item (``0..n_i-1``), which is right for
    image units and for adapters whose units are fixed by construction.
    """

    probs_UCK: Tensor
    owner_U: Tensor
    kind: str = "softmax"
    unit_U: Tensor | None = None
    boxes_U4: Tensor | None = None
    region_U: Tensor | None = None
    cost_U: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in PROB_KINDS:
            raise ValueError(f"unknown probability kind {self.kind!r}; choose one of {PROB_KINDS}")
        if self.probs_UCK.dim() != 3:
            raise ValueError(
                f"probs_UCK must be [U, C, K] (units, classes, samples), got shape "
                f"{tuple(self.probs_UCK.shape)}; add the sample axis with probs.unsqueeze(-1)"
            )
        u = self.probs_UCK.shape[0]
        if self.unit_U is None:
            self.unit_U = rank_within_owner(self.owner_U)
        for name in ("owner_U", "unit_U", "region_U", "cost_U"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (u,):
                raise ValueError(f"{name} must be [U] = [{u}], got {tuple(t.shape)}")
        if self.boxes_U4 is not None and tuple(self.boxes_U4.shape) != (u, 4):
            raise ValueError(
                f"boxes_U4 must be [U, 4] = [{u}, 4], got {tuple(self.boxes_U4.shape)}"
            )

    @property
    def num_units(self) -> int:
        return int(self.probs_UCK.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.probs_UCK.shape[-1])

    def units(self) -> Units:
        """The identity of these units, to re-score them with ``predict(..., units=...)``."""
        assert self.unit_U is not None
        return Units(self.owner_U, self.unit_U, self.boxes_U4)

    def regions(self) -> Tensor:
        """``[U]`` region index of every unit (each unit its own region by default)."""
        if self.region_U is not None:
            return self.region_U
        assert self.unit_U is not None
        return self.unit_U

    def costs(self) -> Tensor:
        """``[U]`` annotation cost of every unit (1 by default)."""
        if self.cost_U is not None:
            return self.cost_U
        return torch.ones(self.num_units, dtype=torch.float32, device=self.probs_UCK.device)


def rank_within_owner(owner_U: Tensor) -> Tensor:
    """``[U]`` rank of each unit among the units of its owner, in order of appearance."""
    if owner_U.numel() == 0:
        return owner_U.new_zeros(0)
    order = torch.sort(owner_U, stable=True).indices
    sorted_owner = owner_U[order]
    starts = torch.ones_like(sorted_owner, dtype=torch.bool)
    starts[1:] = sorted_owner[1:] != sorted_owner[:-1]
    pos = torch.arange(len(owner_U), device=owner_U.device)
    first = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), 0).values
    rank = torch.empty_like(owner_U)
    rank[order] = pos - first
    return rank


@dataclass(frozen=True)
class FeatureInfo:
    """A feature layer an adapter exposes, known before any forward on data.

    Maps cover the padded batch an adapter feeds its model (images padded bottom-right to
    the largest one, or to the model's size divisor), so a level's height is the padded
    height over its stride.

    Attributes:
        name: the key under which :meth:`Adapter.features` returns it.
        channels: channels of every level (an FPN), or one count per level (the stages of
            an mmdet backbone, which returns them as one tuple).
        strides: input pixels per cell, one per level, shallow to deep (one level for a
            plain layer, five for a RetinaNet FPN).
        module: the submodule of ``adapter.model`` whose output this is (``name`` by default).
    """

    name: str
    channels: int | tuple[int, ...]
    strides: tuple[int, ...]
    module: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.strides, int):
            object.__setattr__(self, "strides", (self.strides,))
        if not self.strides or any(s < 1 for s in self.strides):
            raise ValueError(f"feature {self.name!r} needs strides >= 1, got {self.strides}")
        if isinstance(self.channels, tuple) and len(self.channels) != len(self.strides):
            raise ValueError(
                f"feature {self.name!r} has {len(self.strides)} levels but "
                f"{len(self.channels)} channel counts"
            )
        if not self.module:
            object.__setattr__(self, "module", self.name)

    @property
    def stride(self) -> int:
        """The stride of a single-level layer (the finest level of a multi-level one)."""
        return self.strides[0]

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channels of each level."""
        if isinstance(self.channels, tuple):
            return self.channels
        return (self.channels,) * self.num_levels


def as_levels(x: FeatureMap) -> tuple[Tensor, ...]:
    """A captured feature layer as a tuple of levels (one map gives a 1-tuple)."""
    return (x,) if isinstance(x, Tensor) else tuple(x)


@dataclass
class BatchOutputs:
    """What a strategy sees of one batch while the selector streams over the pool.

    Attributes:
        ids: stable ids of the batch's ``B`` items.
        predictions: probabilities whose ``owner_U`` indexes ``ids`` (if required).
        embeddings_BD: pooled embeddings ``[B, D]`` (if required).
        loss_pred_B: predicted loss ``[B]`` (if required).
        class_quality_C: the adapter's per-class detection quality in ``[0, 1]`` over the
            ``C`` foreground classes (:attr:`Adapter.class_quality`; if required).
        background: the background column of the probabilities, if the head has one
            (Faster R-CNN-style softmax over ``C + 1``), else ``None``.
    """

    ids: list[ItemId]
    predictions: Predictions | None = None
    embeddings_BD: Tensor | None = None
    loss_pred_B: Tensor | None = None
    class_quality_C: Tensor | None = None
    background: int | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class PoolOutputs:
    """What a strategy selects from: per-*item* results over the unlabeled candidates.

    Nothing here grows with a pool's pixel or anchor count: unit probabilities are reduced
    batch by batch (:meth:`~taskal.strategies.QueryStrategy.score_batch`) before the next.

    Attributes:
        ids: stable ids of the ``N`` candidates, in candidate order.
        scores_N: item scores from the strategy's ``score_batch`` (higher = label first).
        probs_NC: mean class probabilities of image-level units (BADGE), ``[N, C]``.
        embeddings_ND: pooled embeddings ``[N, D]``.
        labeled_embeddings_LD: embeddings ``[L, D]`` of the already-labeled items.
        loss_pred_N: predicted loss per candidate ``[N]`` (LLAL).
        classes_N: each candidate's dominant predicted foreground class ``[N]`` (long; the
            class with the most probability mass over its units, ``-1`` for an item with
            no unit, such as an image without detections).
    """

    ids: list[ItemId]
    scores_N: Tensor | None = None
    probs_NC: Tensor | None = None
    embeddings_ND: Tensor | None = None
    labeled_embeddings_LD: Tensor | None = None
    loss_pred_N: Tensor | None = None
    classes_N: Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, positions_M: Tensor) -> PoolOutputs:
        """The outputs of candidates ``positions_M`` only, in that order."""
        positions_M = positions_M.long().cpu()

        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[positions_M.to(t.device)]

        return PoolOutputs(
            [self.ids[int(i)] for i in positions_M],
            take(self.scores_N),
            take(self.probs_NC),
            take(self.embeddings_ND),
            self.labeled_embeddings_LD,
            take(self.loss_pred_N),
            take(self.classes_N),
        )


class Adapter(abc.ABC):
    """Wraps a task model and exposes what active learning needs.

    Subclasses implement the abstract methods; a shared, task-parametric conformance test
    (``tests/adapters/conformance.py``) checks every adapter against this contract.
    """

    #: the task this adapter serves: "cls", "det" or "seg".
    task: str = ""
    #: the probability kind of :meth:`predict`: "softmax" or "sigmoid".
    prob_kind: str = "softmax"

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
    def predict(self, batch: Batch, n_samples: int = 1, units: Units | None = None) -> Predictions:
        """Probabilities per unit; ``n_samples > 1`` draws MC-dropout samples.

        Without ``units`` a deterministic pass fixes the units first; with ``units`` (from an
        earlier :meth:`Predictions.units` on the same batch, or a subset of them where the
        adapter supports it: boxes and pixels do, image units must be the batch's images)
        exactly those are re-scored, in the given order.
        With ``n_samples > 1`` the adapter enables :meth:`stochastic` itself for the
        sampled passes; with ``n_samples == 1`` the prediction is deterministic (eval mode).
        """

    @abc.abstractmethod
    def features(self, batch: Batch, names: Sequence[str] | None = None) -> dict[str, FeatureMap]:
        """``{layer: [B, C, H, W]}`` (a tuple of maps for a multi-level layer), detached."""

    @abc.abstractmethod
    def embed(self, batch: Batch) -> Tensor:
        """Detached pooled embedding ``[B, D]``, one row per item."""

    def predict_and_embed(self, batch: Batch, n_samples: int = 1) -> tuple[Predictions, Tensor]:
        """:meth:`predict` and :meth:`embed` of one batch (BADGE, hybrids need both).

        By default two calls; an adapter that gets both from one forward overrides it.
        """
        return self.predict(batch, n_samples=n_samples), self.embed(batch)

    @abc.abstractmethod
    def per_sample_loss(self, batch: Batch) -> Tensor:
        """Unreduced task loss ``[B]``; needs labels in the batch."""

    @abc.abstractmethod
    def stochastic(self) -> contextlib.AbstractContextManager[None]:
        """Context in which dropout is active at test time (BatchNorm stays in eval)."""

    @abc.abstractmethod
    def capture_features(
        self, names: Sequence[str] | None = None
    ) -> contextlib.AbstractContextManager[Mapping[str, FeatureMap]]:
        """Context yielding a mapping that forward hooks fill with the named layers' outputs.

        Gradients flow through the captured tensors (LLAL trains on them); the hooks are
        removed on exit, also when the forward raises. Use one forward per context.
        """

    #: an optional loss-prediction module (LLAL), attached with :meth:`attach_loss_predictor`.
    loss_predictor: torch.nn.Module | None = None
    #: optional per-class quality ``[C]`` in ``[0, 1]`` over the foreground classes,
    #: measured on labeled data after training (1 = the class is detected well); read by
    #: difficulty-calibrated strategies. See :func:`taskal.evaluation.class_quality`.
    class_quality: Tensor | None = None

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


def check_unit_alignment(reference: Units, other: Units, who: str) -> None:
    """Raise a clear error when ``other`` does not describe the ``reference`` units."""
    if same_units(reference, other):
        return
    detail = f"{len(other)} units where {len(reference)} were expected"
    if len(other) == len(reference):
        differs = (reference.owner_U.cpu() != other.owner_U.cpu()) | (
            reference.unit_U.cpu() != other.unit_U.cpu()
        )
        first = int(torch.nonzero(differs)[0]) if bool(differs.any()) else -1
        detail = f"first difference at unit {first}" if first >= 0 else "boxes differ"
    raise ValueError(
        f"{who}: units do not match the ones the deterministic pass fixed ({detail}); "
        "predict(..., units=...) must re-score exactly the units it is given"
    )


__all__ = [
    "META_KEYS",
    "PROB_KINDS",
    "Adapter",
    "Batch",
    "BatchOutputs",
    "FeatureInfo",
    "FeatureMap",
    "ItemId",
    "PoolOutputs",
    "Predictions",
    "Units",
    "as_levels",
    "check_unit_alignment",
    "rank_within_owner",
    "same_units",
]
