"""The interface every task's campaign kit implements."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from mmengine.config import Config
from torch import nn

from taskal.campaign.settings import CampaignSettings
from taskal.campaign.store import CampaignError, LabelRow, NewLabel
from taskal.checkpoints import load_weights
from taskal.data.images import ImagePool, list_images
from taskal.queries import Query
from taskal.strategies.base import QueryStrategy
from taskal.types import Adapter


class TaskKit:
    """A task's data, labels, model and exports for a campaign.

    Args:
        cfg: the campaign config (an OpenMMLab config with the ``al`` block).
        settings: its resolved ``al`` block.
    """

    task: ClassVar[str]
    label_kind: ClassVar[str]  # how labels are stored: "class", "boxes" or "mask"
    #: what the budget and the report's cost count
    cost_unit: str = "images"

    def __init__(self, cfg: Config, settings: CampaignSettings) -> None:
        self.cfg = cfg
        self.settings = settings

    @property
    def classes(self) -> list[str]:
        raise NotImplementedError

    #: labeled images ``--train`` needs at least
    min_labels: int = 1

    def preflight(self) -> None:
        """Check what would otherwise fail in the middle of a round (the evaluation set,
        training and adapter settings); nothing is written. Raises ``CampaignError``."""

    def check_keys(self, keys: Sequence[str]) -> None:
        """Refuse item keys this task cannot tell apart (e.g. in file names it writes)."""

    @property
    def stop_values(self) -> int:
        """How many values :meth:`stop_predictions` takes (the classes by default)."""
        return len(self.classes)

    # ---- data ----------------------------------------------------------------------------

    def pool_files(self) -> list[tuple[str, str]]:
        """``(key, path)`` of every unlabeled image in ``al.pool.img_dir``."""
        root = Path(self.settings.pool["img_dir"])
        try:
            names = list_images(root)
        except (FileNotFoundError, ValueError) as err:
            raise CampaignError(f"al.pool: {err}") from None
        return [(name, str((root / name).resolve())) for name in names]

    def image_ref(self, key: str, pool: ImagePool) -> str:
        """How Label Studio tasks name an image: ``al.image_url`` + its key when set (e.g.
        ``"/data/local-files/?d=pool/"`` for Label Studio's local file storage), else the
        file's absolute path."""
        prefix = self.settings.image_url
        return f"{prefix}{key}" if prefix is not None else str(pool.paths[key])

    def initial(self) -> tuple[list[tuple[str, str]], list[NewLabel]]:
        """The labeled images the campaign starts with and their labels."""
        raise NotImplementedError

    def pool(self, files: Sequence[tuple[str, str]]) -> ImagePool:
        return ImagePool(files)

    # ---- model ---------------------------------------------------------------------------

    def train(
        self,
        pool: ImagePool,
        labels: dict[str, list[LabelRow]],
        work_dir: Path,
        seed: int,
        strategy: QueryStrategy,
    ) -> Adapter:
        """A model trained on the labeled items, wrapped in its adapter."""
        raise NotImplementedError

    #: the model's key beside ``"loss_predictor"`` in a checkpoint of a model with LLAL
    model_key: ClassVar[str] = "model"

    def new_adapter(self) -> Adapter:
        """A fresh, untrained adapter over the config's model."""
        raise NotImplementedError

    def new_loss_predictor(self, adapter: Adapter) -> nn.Module:
        """A fresh LLAL loss predictor for ``adapter``'s feature layers."""
        raise NotImplementedError

    def trained_module(self, adapter: Adapter) -> nn.Module:
        """What a checkpoint holds: the model, or ``{model_key, "loss_predictor"}`` when the
        adapter has an LLAL module."""
        if adapter.loss_predictor is None:
            return adapter.model
        return nn.ModuleDict(
            {self.model_key: adapter.model, "loss_predictor": adapter.loss_predictor}
        )

    def load(self, checkpoint: Path, strategy: QueryStrategy, trusted: bool) -> Adapter:
        """An adapter over the config's model with ``checkpoint``'s weights (what
        :meth:`trained_module` saved; a strategy reading predicted losses needs the LLAL
        module in it)."""
        adapter = self.new_adapter()
        device = torch.device(self.settings.device)
        if "loss_pred" in strategy.needs:
            predictor = self.new_loss_predictor(adapter)
            both = nn.ModuleDict({self.model_key: adapter.model, "loss_predictor": predictor})
            load_weights(both, checkpoint, trusted=trusted)
            predictor.to(device).eval()
            adapter.attach_loss_predictor(predictor)
        else:
            load_weights(adapter.model, checkpoint, trusted=trusted)
        adapter.model.to(device).eval()
        return adapter

    # ---- labels --------------------------------------------------------------------------

    def read_labels(
        self,
        path: Path,
        pool: ImagePool,
        recorded: dict[str, list[LabelRow]],
        overwrite: bool = False,
    ) -> list[NewLabel]:
        """Labels returned by annotators (a file or folder), checked, in the store's encoding."""
        raise NotImplementedError

    # ---- outputs -------------------------------------------------------------------------

    def evaluate(self, adapter: Adapter) -> dict[str, float]:
        """Metrics of the model on ``al.eval``'s labeled images (none without it)."""
        return {}

    def stop_predictions(self, adapter: Adapter, pool: ImagePool, ids: Sequence[str]) -> np.ndarray:
        """The model's predicted labels on the stop set, flat (compared across rounds)."""
        raise NotImplementedError

    def export(
        self, out_dir: Path, queries: Sequence[Query], pool: ImagePool, adapter: Adapter
    ) -> list[Path]:
        """Write what annotators receive for ``queries`` into ``out_dir``."""
        raise NotImplementedError

    def gallery(self, queries: Sequence[Query], pool: ImagePool, adapter: Adapter) -> list[Any]:
        """Report entries for the top queries."""
        return []

    def batch_classes(
        self, queries: Sequence[Query], pool: ImagePool, adapter: Adapter
    ) -> dict[str, int]:
        """Predicted classes of the queried items, counted (the report's batch chart)."""
        return {}
