"""Classification campaigns: labeled images in ImageFolder layout (``root/<class>/<image>``)
and a classifier built from the config's ``model`` (e.g. ``dict(type="torchvision",
name="resnet18")``); class indices in, COCO json and Label Studio choice tasks out; training
through :func:`taskal.training.train_classifier`.

A label is stored as the JSON of its class index (``b"2"``). Annotators return a Label
Studio JSON export or a plain JSON file ``{item: class name or index}``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn

from taskal.adapters.classification import ClassificationAdapter
from taskal.campaign.labelstudio import QueryView, read_export, write_tasks
from taskal.campaign.report import GalleryEntry
from taskal.campaign.settings import plain
from taskal.campaign.store import CampaignError, LabelRow, NewLabel
from taskal.campaign.tasks._common import (
    GALLERY_SIDE,
    NOTHING,
    check_single_model,
    finite,
    image_size,
    read_json,
    refuse_ensembles,
    settings_of,
)
from taskal.campaign.tasks.base import TaskKit
from taskal.data.images import ImagePool, list_images
from taskal.fitting import fit_classifier
from taskal.llal.module import LossPredictionModule
from taskal.models import build_model
from taskal.queries import Query
from taskal.rounds import mix_seed
from taskal.strategies.base import QueryStrategy
from taskal.training import LLALConfig, TrainConfig
from taskal.types import Adapter, Batch, ItemId

#: the size images are resized to when the config sets no ``al.image_size``
DEFAULT_IMAGE_SIZE = (32, 32)
#: the longest side of a gallery picture


def class_bytes(index: int) -> bytes:
    """A class index in the store's encoding (JSON)."""
    return json.dumps(int(index)).encode()


def class_of(value: bytes) -> int:
    """The class index of a stored label."""
    return int(json.loads(value))


def _class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


class ClassificationKit(TaskKit):
    """A campaign over an image classifier (a config without an OpenMMLab ``default_scope``).

    The config's top-level ``model`` is a :data:`taskal.registry.MODELS` config;
    ``num_classes`` and ``in_channels`` are filled in. ``al.labeled = dict(root=...)`` holds
    the labeled images the campaign starts with, one sub-folder per class (their sorted names
    are the classes unless ``al.labeled.classes`` lists them; ``grayscale=True`` reads one
    channel). Every image is resized to ``al.image_size`` (``(32, 32)`` by default).
    ``al.eval = dict(root=...)``, in the same layout, adds top-1 accuracy per round.
    Deep ensembles are not supported in campaigns.
    """

    task: ClassVar[str] = "cls"
    label_kind: ClassVar[str] = "class"

    def __init__(self, cfg: Any, settings: Any) -> None:
        super().__init__(cfg, settings)
        self.labeled = dict(settings.labeled or {})
        self.size = settings.image_size or DEFAULT_IMAGE_SIZE
        self.grayscale = bool(self.labeled.get("grayscale", False))
        self.train_cfg = settings_of(TrainConfig, settings.train, "al.train")
        self.llal_cfg = settings_of(LLALConfig, settings.llal, "al.llal")
        self.model_cfg = self._model_cfg()
        self._classes: list[str] | None = None
        refuse_ensembles(settings.strategy)

    min_labels = 2  # BatchNorm trains on batches of two at least

    def preflight(self) -> None:
        """The evaluation folder, checked."""
        if self.settings.eval:
            self._eval_set(self.settings.eval)

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            self._classes = self._find_classes()
        return self._classes

    def _find_classes(self) -> list[str]:
        given = self.labeled.get("classes")
        if given:
            names = [str(c) for c in given]
            if len(set(names)) != len(names):
                raise CampaignError(f"al.labeled.classes repeats a name: {names}")
            return names
        root = self._root()
        if root is None:
            raise CampaignError(
                "a classification campaign needs al.labeled = dict(root=...) (one sub-folder "
                "per class) or al.labeled.classes"
            )
        names = _class_folders(root)
        if not names:
            raise CampaignError(f"al.labeled.root {root} has no class sub-folders")
        return names

    def _root(self) -> Path | None:
        root = self.labeled.get("root")
        if root is None:
            return None
        if not Path(root).is_dir():
            raise CampaignError(f"al.labeled.root {root} is not a folder")
        return Path(root)

    def _model_cfg(self) -> dict[str, Any]:
        model = self.cfg.get("model")
        if not isinstance(model, Mapping) or "type" not in model:
            raise CampaignError(
                'the config has no model dict: add model = dict(type="torchvision", '
                'name="resnet18") (see configs/campaign/resnet18_image_folder.py)'
            )
        return dict(plain(model))

    @property
    def in_channels(self) -> int:
        return 1 if self.grayscale else 3

    # ---- data ----------------------------------------------------------------------------

    def initial(self) -> tuple[list[tuple[str, str]], list[NewLabel]]:
        root = self._root()
        if root is None:
            return [], []
        files, labels = [], []
        for index, name in enumerate(self.classes):
            if not (root / name).is_dir():  # a class named in al.labeled.classes, no images yet
                continue
            for rel in _class_images(root, name):
                key = f"{name}/{rel}"
                files.append((key, str((root / key).resolve())))
                labels.append(NewLabel(key, "class", class_bytes(index), True))
        unknown = sorted(set(_class_folders(root)) - set(self.classes))
        if unknown:
            raise CampaignError(
                f"al.labeled.root has folders {unknown} that al.labeled.classes does not name"
            )
        return files, labels

    def pool(self, files: Sequence[tuple[str, str]]) -> ImagePool:
        return ImagePool(files, size=self.size, grayscale=self.grayscale)

    # ---- model ---------------------------------------------------------------------------

    def train(
        self,
        pool: ImagePool,
        labels: dict[str, list[LabelRow]],
        work_dir: Path,
        seed: int,
        strategy: QueryStrategy,
    ) -> Adapter:
        """A fresh model trained on every labeled image's newest label (``work_dir`` unused).

        ``seed`` (the round's, already mixed) seeds the initialisation through
        ``torch.manual_seed`` and the data order through a generator, so a round retrained
        with the same labels and seed gives the same weights on the same device.

        Raises:
            CampaignError: fewer than 2 labeled images, or an ensemble strategy.
        """
        check_single_model(strategy)
        keys = sorted(labels)
        if len(keys) < 2:
            raise CampaignError(
                f"training needs at least 2 labeled images, the campaign has {len(keys)}; "
                "import labels first"
            )
        batch = self._labeled_batch(pool, keys, labels)
        return fit_classifier(
            self._adapter, batch, self.train_cfg, seed, mix_seed(seed, 2), strategy, self.llal_cfg
        )

    def _labeled_batch(
        self, pool: ImagePool, keys: list[str], labels: dict[str, list[LabelRow]]
    ) -> Batch:
        targets = []
        for key in keys:
            row = labels[key][-1]
            if row.kind != self.label_kind:
                raise CampaignError(f"{key} carries a {row.kind} label, not a class")
            targets.append(class_of(row.value))
        images = pool.take(keys)
        return Batch(images.inputs, keys, torch.tensor(targets, dtype=torch.long))

    def _adapter(self) -> ClassificationAdapter:
        model_cfg = dict(
            copy.deepcopy(self.model_cfg),
            num_classes=len(self.classes),
            in_channels=self.in_channels,
        )
        try:
            return ClassificationAdapter(
                build_model(model_cfg),
                (self.in_channels, *self.size),
                device=self.settings.device,
                **self.settings.adapter,
            )
        except TypeError as err:
            raise CampaignError(f"the model or al.adapter: {err}") from None

    def new_adapter(self) -> Adapter:
        return self._adapter()

    def new_loss_predictor(self, adapter: Adapter) -> nn.Module:
        return LossPredictionModule(adapter.feature_info, hidden=self.llal_cfg.hidden)

    def load(self, checkpoint: Path, strategy: QueryStrategy, trusted: bool) -> Adapter:
        check_single_model(strategy)
        return super().load(checkpoint, strategy, trusted)

    # ---- labels --------------------------------------------------------------------------

    def read_labels(
        self,
        path: Path,
        pool: ImagePool,
        recorded: dict[str, list[LabelRow]],
        overwrite: bool = False,
    ) -> list[NewLabel]:
        """Read a Label Studio JSON export (a list) or a plain JSON ``{item: class}`` (a dict).

        Repeated and conflicting labels are left to the store (``Campaign.plan_import``).
        """
        data = read_json(path, "a Label Studio JSON export or a JSON file {item: class}")
        if isinstance(data, list):
            chosen = self._exported(path)
        elif isinstance(data, dict):
            chosen = {str(k): self._class_index(k, v, path) for k, v in data.items()}
        else:
            raise CampaignError(
                f"{path}: give a Label Studio JSON export (a list) or {{item: class}} (an "
                f"object), not a JSON {type(data).__name__}{NOTHING}"
            )
        known = set(map(str, pool.ids))
        for key in chosen:
            if key not in known:
                raise CampaignError(f"{path}: {key!r} is no image of the campaign{NOTHING}")
        return [NewLabel(k, "class", class_bytes(c), True) for k, c in sorted(chosen.items())]

    def _exported(self, path: Path) -> dict[str, int]:
        try:
            labels = read_export(path, "cls", self.classes)
        except ValueError as err:
            raise CampaignError(f"{err}{NOTHING}") from None
        return {str(k): int(v) for k, v in labels.items() if isinstance(v, int)}

    def _class_index(self, item: str, value: Any, path: Path) -> int:
        n = len(self.classes)
        if isinstance(value, str):
            if value in self.classes:
                return self.classes.index(value)
            raise CampaignError(
                f"{path}: {item!r} is labelled {value!r}, not one of the classes "
                f"{self.classes}{NOTHING}"
            )
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
            return value
        raise CampaignError(
            f"{path}: {item!r} is labelled {value!r}; give a class name or an index in "
            f"0..{n - 1}{NOTHING}"
        )

    # ---- outputs -------------------------------------------------------------------------

    def evaluate(self, adapter: Adapter) -> dict[str, float]:
        """``{"accuracy": top-1}`` on ``al.eval.root`` (class sub-folders), or ``{}``."""
        spec = self.settings.eval
        if not spec:
            return {}
        pool, targets = self._eval_set(spec)
        probs = self._probs(adapter, pool, pool.ids)
        return {"accuracy": float((probs.argmax(1) == targets).mean())}

    def _eval_set(self, spec: Mapping[str, Any]) -> tuple[ImagePool, np.ndarray]:
        root = Path(str(spec.get("root", "")))
        if "root" not in spec or not root.is_dir():
            raise CampaignError(f"al.eval must be dict(root=FOLDER) with class sub-folders: {spec}")
        unknown = sorted(set(_class_folders(root)) - set(self.classes))
        if unknown:
            raise CampaignError(
                f"al.eval.root has class folders {unknown} that are not classes of the "
                f"campaign {self.classes}"
            )
        files, targets = [], []
        for index, name in enumerate(self.classes):
            if (root / name).is_dir():
                for rel in _class_images(root, name, "al.eval.root"):
                    files.append((f"{name}/{rel}", str(root / name / rel)))
                    targets.append(index)
        if not files:
            raise CampaignError(f"al.eval.root {root} holds no images")
        return self.pool(files), np.asarray(targets)

    def _probs(self, adapter: Adapter, pool: ImagePool, ids: Sequence[ItemId]) -> np.ndarray:
        """Class probabilities ``[N, C]`` of ``ids``."""
        out = [np.zeros((0, len(self.classes)), np.float32)]
        for batch in pool.batches(list(ids), self.settings.batch_size):
            out.append(adapter.predict(batch).probs_UCK.mean(-1).float().cpu().numpy())
        return np.concatenate(out)

    def stop_predictions(self, adapter: Adapter, pool: ImagePool, ids: Sequence[str]) -> np.ndarray:
        return self._probs(adapter, pool, ids).argmax(1).astype(np.int64)

    def export(
        self, out_dir: Path, queries: Sequence[Query], pool: ImagePool, adapter: Adapter
    ) -> list[Path]:
        """``queries_coco.json`` (the images, no annotations) and ``label_studio_tasks.json``
        (choice tasks pre-annotated with the model's class and probability)."""
        items = list(dict.fromkeys(str(q.item) for q in queries))
        probs = dict(zip(items, self._probs(adapter, pool, items), strict=True))
        sizes = {key: image_size(pool.paths[key]) for key in items}
        views = [
            QueryView(
                item=str(q.item),
                image=self.image_ref(str(q.item), pool),
                width=sizes[str(q.item)][0],
                height=sizes[str(q.item)][1],
                score=finite(q.score),
                rank=rank,
                probs=[float(p) for p in probs[str(q.item)]],
            )
            for rank, q in enumerate(queries)
        ]
        tasks = out_dir / "label_studio_tasks.json"
        return [
            self._coco(out_dir / "queries_coco.json", items, sizes),
            write_tasks(tasks, "cls", self.classes, views, "taskal"),
        ]

    def _coco(self, path: Path, items: list[str], sizes: dict[str, tuple[int, int]]) -> Path:
        images = [
            {"id": i + 1, "file_name": key, "width": sizes[key][0], "height": sizes[key][1]}
            for i, key in enumerate(items)
        ]
        data = {
            "info": {"description": "taskal queries: give each image its class"},
            "images": images,
            "annotations": [],
            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(self.classes)],
        }
        path.write_text(json.dumps(data, indent=1))
        return path

    def gallery(
        self, queries: Sequence[Query], pool: ImagePool, adapter: Adapter
    ) -> list[GalleryEntry]:
        top = list(queries)[: self.settings.gallery]
        if not top:
            return []
        probs = self._probs(adapter, pool, [q.item for q in top])
        entries = []
        for rank, (q, p) in enumerate(zip(top, probs, strict=True)):
            best = int(p.argmax())
            title = (
                f"#{rank + 1} {q.item}  score {finite(q.score):.3g}  "
                f"pred {self.classes[best]} ({p[best]:.2f})"
            )
            entries.append(GalleryEntry(title=title, image=self._picture(pool.paths[str(q.item)])))
        return entries

    def _picture(self, path: Path) -> np.ndarray:
        with Image.open(path) as opened:
            image = opened.convert("L" if self.grayscale else "RGB")
        image.thumbnail((GALLERY_SIDE, GALLERY_SIDE))
        return np.asarray(image, dtype=np.uint8)

    def batch_classes(
        self, queries: Sequence[Query], pool: ImagePool, adapter: Adapter
    ) -> dict[str, int]:
        items = list(dict.fromkeys(str(q.item) for q in queries))
        predicted = self._probs(adapter, pool, items).argmax(1)
        counts = np.bincount(predicted, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}


def _class_images(root: Path, name: str, where: str = "al.labeled.root") -> list[str]:
    """Image paths under ``root/name``, relative to it."""
    try:
        return list_images(root / name)
    except (FileNotFoundError, ValueError) as err:
        raise CampaignError(f"{where}: class {name!r}: {err}") from None


__all__ = ["ClassificationKit", "class_bytes", "class_of"]
