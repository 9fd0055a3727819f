"""Detection campaigns with an mmdet 3.x config: COCO json (or a Label Studio export) in, COCO
json of the model's boxes and Label Studio rectangle tasks out; training through mmengine's
Runner (:func:`taskal.fitting.fit_mmdet`).

A label is stored as the JSON of an image's boxes, ``{"boxes": [[x1, y1, x2, y2], ...],
"labels": [class index, ...]}`` in pixels of the original image, rounded to 1/1000 px so
that the same boxes always give the same bytes. An image labeled with no boxes is a labeled
empty image. Queries are whole images (``al.query = "item"``): mmdet trains on whole
images, so box queries are not offered.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
from torch import nn

from taskal.adapters.mmdet_detection import MMDetAdapter
from taskal.campaign.labelstudio import QueryView, read_export, write_tasks
from taskal.campaign.report import GalleryEntry
from taskal.campaign.store import CampaignError, LabelRow, NewLabel
from taskal.campaign.tasks._common import (
    NOTHING,
    config_classes,
    finite,
    image_size,
    picture,
    read_json,
    refuse_ensembles,
    settings_of,
    train_dataset,
)
from taskal.campaign.tasks.base import TaskKit
from taskal.data.coco import BOX_TOLERANCE, CocoDetectionPool, load_coco_detection
from taskal.data.images import ImagePool
from taskal.evaluation.coco_map import coco_map
from taskal.fitting import fit_mmdet
from taskal.llal.openmmlab import LLALDetector
from taskal.queries import Query
from taskal.strategies.base import QueryStrategy
from taskal.training import LLALConfig
from taskal.training_mmdet import MMDetTrainConfig
from taskal.types import Adapter, ItemId

#: a predicted box is shown to annotators (COCO json, Label Studio, report) from this score
SHOW_SCORE = 0.3
#: a predicted box counts as a detection of its class (stop set, batch chart) from this score
DETECT_SCORE = 0.5
#: the file the labeled images' COCO json is written to in a round's work dir
LABELED_JSON = "labeled_boxes.json"


class Detections(NamedTuple):
    """One image's kept boxes: ``boxes`` ``[N, 4]`` xyxy pixels, ``labels`` ``[N]`` class
    indices, ``scores`` ``[N]`` the probability of each box's class."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray

    def above(self, threshold: float) -> Detections:
        """The boxes scored at least ``threshold``."""
        return self._kept(self.scores >= threshold)

    def inside(self, width: int, height: int) -> Detections:
        """Boxes clipped to the image (as labels are), those left without area or of the
        background (label -1) dropped."""
        b = self.boxes.clip(0, [width, height, width, height])
        keep = (self.labels >= 0) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        return Detections(b, self.labels, self.scores)._kept(keep)

    def _kept(self, keep: np.ndarray) -> Detections:
        return Detections(self.boxes[keep], self.labels[keep], self.scores[keep])


def boxes_bytes(boxes: Any, labels: Sequence[int] | np.ndarray) -> bytes:
    """Boxes (``[N, 4]`` xyxy pixels) and class indices in the store's encoding (JSON)."""
    rounded = np.round(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), 3) + 0.0  # no -0.0
    value = {"boxes": rounded.tolist(), "labels": [int(c) for c in labels]}
    return json.dumps(value).encode()


def boxes_of(value: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The boxes ``[N, 4]`` and class indices ``[N]`` of a stored label."""
    data = json.loads(value)
    boxes = np.asarray(data["boxes"], dtype=np.float64).reshape(-1, 4)
    return boxes, np.asarray(data["labels"], dtype=np.int64).reshape(-1)


class DetectionKit(TaskKit):
    """A campaign over an mmdet detector config (``default_scope = 'mmdet'``): RetinaNet,
    FCOS, Faster R-CNN, ... (what :class:`~taskal.adapters.MMDetAdapter` accepts).

    The labeled images it starts with are the config's ``train_dataloader.dataset`` (its
    innermost dataset): ``data_root`` + ``ann_file`` (COCO json) and ``data_prefix.img``;
    its category names must be the classes (``classes`` or the dataset's
    ``metainfo.classes``), in category-id order. Annotators return a COCO json (images
    matched to the campaign's by ``file_name``, categories by name) or a Label Studio JSON
    export. ``al.eval = dict(ann_file=..., img_dir=...)`` adds COCO box mAP per round.

    The stop set's predictions are, per image and class, 1 when the model has a box of that
    class scored at least :data:`DETECT_SCORE`, else 0: two values, so the campaign needs at
    least two classes (the round engine measures agreement over ``len(classes)`` values).
    """

    task: ClassVar[str] = "det"
    label_kind: ClassVar[str] = "boxes"

    def __init__(self, cfg: Any, settings: Any) -> None:
        super().__init__(cfg, settings)
        if settings.query == "region":
            raise CampaignError(
                "box queries are not built yet for campaigns (mmdet trains on whole images); "
                'use al.query = "item"'
            )
        settings_of(MMDetTrainConfig, dict(settings.train, work_dir="."), "al.train")
        self.llal_cfg = settings_of(LLALConfig, settings.llal, "al.llal")
        refuse_ensembles(settings.strategy)

    def preflight(self) -> None:
        """The evaluation set, checked."""
        spec = self.settings.eval
        if spec:
            if "ann_file" not in spec or "img_dir" not in spec:
                raise CampaignError(f"al.eval must be dict(ann_file=..., img_dir=...), got {spec}")
            self._coco_pool(Path(spec["ann_file"]), Path(spec["img_dir"]), "al.eval")

    @property
    def stop_values(self) -> int:
        """Stop predictions say per image and class whether a box is found: 0 or 1."""
        return 2

    @property
    def classes(self) -> list[str]:
        return config_classes(self.cfg)

    def _train_dataset(self) -> dict[str, Any]:
        return train_dataset(self.cfg)

    # ---- data ----------------------------------------------------------------------------

    def initial(self) -> tuple[list[tuple[str, str]], list[NewLabel]]:
        ds = self._train_dataset()
        if not ds.get("ann_file"):
            return [], []
        root = Path(str(ds.get("data_root") or ""))
        img_dir = root / str((ds.get("data_prefix") or {}).get("img", ""))
        pool = self._coco_pool(root / str(ds["ann_file"]), img_dir, "the config's training data")
        files, labels = [], []
        for item in pool.ids:
            target = pool.target(item)
            files.append((str(item), str((img_dir / str(item)).resolve())))
            value = boxes_bytes(target["boxes"].numpy(), target["labels"].tolist())
            labels.append(NewLabel(str(item), "boxes", value, True))
        return files, labels

    def _coco_pool(self, ann_file: Path, img_dir: Path, what: str) -> CocoDetectionPool:
        """A validated COCO set whose category names are the classes, in label order."""
        try:
            pool = load_coco_detection(ann_file, img_dir)
        except (FileNotFoundError, ValueError) as err:
            raise CampaignError(f"{what}: {_one_line(err)}") from None
        if pool.classes != self.classes:
            raise CampaignError(
                f"{what}: {ann_file} has the categories {pool.classes} (by id), the campaign's "
                f"classes are {self.classes}; give the json the classes' names in that order"
            )
        return pool

    # ---- model ---------------------------------------------------------------------------

    def train(
        self,
        pool: ImagePool,
        labels: dict[str, list[LabelRow]],
        work_dir: Path,
        seed: int,
        strategy: QueryStrategy,
    ) -> Adapter:
        """A fresh detector trained on every labeled image's newest boxes.

        The labeled images are linked into ``work_dir/images/`` (keys keep their sub-folders)
        and described by ``work_dir/labeled_boxes.json``; mmengine's run goes to
        ``work_dir/train/``.
        """
        if not labels:
            raise CampaignError("no labeled images to train on; import labels first")
        det_pool = self._labeled_pool(pool, labels, work_dir)
        train_cfg = settings_of(
            MMDetTrainConfig, dict(self.settings.train, work_dir=work_dir / "train"), "al.train"
        )
        return fit_mmdet(
            self.cfg,
            det_pool,
            list(det_pool.ids),
            train_cfg,
            seed % 2**31,
            strategy,
            adapter_kwargs=self.settings.adapter,
            llal_cfg=self.llal_cfg,
            device=self.settings.device,
        )

    def _labeled_pool(
        self, pool: ImagePool, labels: dict[str, list[LabelRow]], work_dir: Path
    ) -> CocoDetectionPool:
        """The labeled images as a COCO set in ``work_dir`` (images linked, not copied)."""
        img_dir = work_dir / "images"
        images: list[dict[str, Any]] = []
        anns: list[dict[str, Any]] = []
        for image_id, key in enumerate(sorted(labels), start=1):
            row = labels[key][-1]
            if row.kind != self.label_kind:
                raise CampaignError(f"{key} carries a {row.kind} label, not boxes")
            link = img_dir / key
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                os.symlink(pool.paths[key].resolve(), link)
            w, h = image_size(pool.paths[key])
            images.append({"id": image_id, "file_name": key, "width": w, "height": h})
            boxes, classes = boxes_of(row.value)
            for box, label in zip(boxes.tolist(), classes.tolist(), strict=True):
                anns.append(_annotation(len(anns) + 1, image_id, box, label))
        ann_file = work_dir / LABELED_JSON
        ann_file.write_text(json.dumps(_coco(images, anns, self.classes, "labeled images")))
        return self._coco_pool(ann_file, img_dir, "the labeled images")

    model_key = "detector"

    def new_adapter(self) -> Adapter:
        return MMDetAdapter(
            copy.deepcopy(dict(self.cfg.model)),
            device=self.settings.device,
            **self.settings.adapter,
        )

    def new_loss_predictor(self, adapter: Adapter) -> nn.Module:
        return LLALDetector(adapter.model, hidden=self.llal_cfg.hidden).loss_predictor

    # ---- labels --------------------------------------------------------------------------

    def read_labels(
        self,
        path: Path,
        pool: ImagePool,
        recorded: dict[str, list[LabelRow]],
        overwrite: bool = False,
    ) -> list[NewLabel]:
        """Read a COCO json (an object) or a Label Studio JSON export (a list).

        In a COCO json every image listed in ``images`` is labeled with its (non-crowd)
        annotations, none making it a labeled empty image; ``file_name`` s must be images of
        the campaign and category names its classes. Repeated and conflicting labels are
        left to the store (``Campaign.plan_import``).
        """
        data = read_json(path, "a COCO json or a Label Studio JSON export")
        if isinstance(data, list):
            found = self._exported(path)
        elif isinstance(data, dict):
            found = self._coco_labels(path, data, pool)
        else:
            raise CampaignError(
                f"{path}: give a COCO json (an object) or a Label Studio JSON export (a list), "
                f"not a JSON {type(data).__name__}{NOTHING}"
            )
        known = set(map(str, pool.ids))
        out = []
        for key, (boxes, labels) in sorted(found.items()):
            if key not in known:
                raise CampaignError(f"{path}: {key!r} is no image of the campaign{NOTHING}")
            value = _checked(path, key, boxes, labels, image_size(pool.paths[key]))
            out.append(NewLabel(key, "boxes", value, True))
        return out

    def _exported(self, path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        try:
            labels = read_export(path, "det", self.classes)
        except ValueError as err:
            raise CampaignError(f"{_one_line(err)}{NOTHING}") from None
        return {
            str(k): (np.asarray(v["boxes"]), np.asarray(v["labels"]))
            for k, v in labels.items()
            if isinstance(v, dict)
        }

    def _coco_labels(
        self, path: Path, data: dict[str, Any], pool: ImagePool
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every listed image's boxes, checked by :func:`load_coco_detection` over links to
        the campaign's images."""
        names = _file_names(data)
        for name in names:
            if name not in pool.paths:
                raise CampaignError(
                    f"{path}: the image {name!r} (file_name) is no image of the campaign{NOTHING}"
                )
        with tempfile.TemporaryDirectory(prefix="taskal_import_") as tmp:
            for name in names:
                link = Path(tmp) / name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(pool.paths[name].resolve())
            try:
                coco = load_coco_detection(path, tmp)
            except (FileNotFoundError, ValueError) as err:
                line = _one_line(err)  # the first of several problems does not name the file
                where = "" if line.startswith(str(path)) else f"{path}: "
                raise CampaignError(f"{where}{line}{NOTHING}") from None
        index = self._class_map(path, coco)
        out = {}
        for item in coco.ids:
            key = str(item)
            info = coco.coco.imgs[coco.image_id(item)]
            size = image_size(pool.paths[key])
            if (int(info["width"]), int(info["height"])) != size:
                raise CampaignError(
                    f"{path}: {key} is {size[0]}x{size[1]} (WxH) but the json says "
                    f"{info['width']}x{info['height']}{NOTHING}"
                )
            target = coco.target(item)
            labels = np.asarray([index[int(c)] for c in target["labels"].tolist()], np.int64)
            out[key] = (target["boxes"].numpy().astype(np.float64), labels)
        return out

    def _class_map(self, path: Path, coco: CocoDetectionPool) -> dict[int, int]:
        """The json's labels -> the campaign's class indices, by category name; a category
        with another name may be listed but not used."""
        used = {int(a["category_id"]) for a in coco.coco.dataset["annotations"]}
        index = {}
        for label, (cat_id, name) in enumerate(
            zip(coco.label_to_cat_id, coco.classes, strict=True)
        ):
            if name in self.classes:
                index[label] = self.classes.index(name)
            elif cat_id in used:
                raise CampaignError(
                    f"{path}: category {name!r} (id {cat_id}) is not a class of the campaign "
                    f"{self.classes}{NOTHING}"
                )
        return index

    # ---- outputs -------------------------------------------------------------------------

    def evaluate(self, adapter: Adapter) -> dict[str, float]:
        """``{"mAP": COCO box mAP@[.5:.95]}`` on ``al.eval`` (``ann_file``, ``img_dir``)."""
        spec = self.settings.eval
        if not spec:
            return {}
        if "ann_file" not in spec or "img_dir" not in spec:
            raise CampaignError(f"al.eval must be dict(ann_file=..., img_dir=...), got {spec}")
        pool = self._coco_pool(Path(spec["ann_file"]), Path(spec["img_dir"]), "al.eval")
        try:
            scores = coco_map(adapter, pool, batch_size=self.settings.batch_size)
        except ValueError as err:
            raise CampaignError(f"al.eval: {_one_line(err)}") from None
        return {"mAP": float(scores["mAP"])}

    def _detections(
        self, adapter: Adapter, pool: ImagePool, ids: Sequence[ItemId]
    ) -> list[Detections]:
        """Every image's kept boxes with their class and its probability (one pass)."""
        out = []
        for batch in pool.batches(list(ids), self.settings.batch_size):
            p = adapter.predict(batch)
            if p.boxes_U4 is None or p.unit_U is None:
                raise CampaignError(f"{type(adapter).__name__} gives no boxes; use an mmdet model")
            probs = p.probs_UCK.detach().float().mean(-1).cpu()
            column = (p.unit_U.cpu() % probs.shape[1]).long()  # the unit's class column
            scores = probs.gather(1, column[:, None])[:, 0].numpy().astype(np.float64)
            labels = _labels(column.numpy(), probs.shape[1], getattr(adapter, "background", None))
            boxes = p.boxes_U4.detach().float().cpu().numpy().astype(np.float64)
            owner = p.owner_U.cpu().numpy()
            for i, image in enumerate(batch.inputs):
                mine = owner == i
                h, w = (int(v) for v in image.shape[-2:])
                found = Detections(boxes[mine], labels[mine], scores[mine])
                out.append(found.inside(w, h))
        return out

    def stop_predictions(self, adapter: Adapter, pool: ImagePool, ids: Sequence[str]) -> np.ndarray:
        """Per image and class, 1 if the model detects the class (score >= 0.5), else 0."""
        present = np.zeros((len(ids), len(self.classes)), dtype=np.uint8)
        for i, found in enumerate(self._detections(adapter, pool, ids)):
            present[i, found.above(DETECT_SCORE).labels] = 1
        return present.ravel()

    def export(
        self, out_dir: Path, queries: Sequence[Query], pool: ImagePool, adapter: Adapter
    ) -> list[Path]:
        """``queries_coco.json`` (the queried images with the model's boxes scored >= 0.3 as
        annotations carrying their ``score``) and ``label_studio_tasks.json`` (rectangle
        tasks pre-annotated with the same boxes)."""
        items = list(dict.fromkeys(str(q.item) for q in queries))
        shown = [d.above(SHOW_SCORE) for d in self._detections(adapter, pool, items)]
        found = dict(zip(items, shown, strict=True))
        sizes = {key: image_size(pool.paths[key]) for key in items}
        views = [
            QueryView(
                item=str(q.item),
                image=self.image_ref(str(q.item), pool),
                width=sizes[str(q.item)][0],
                height=sizes[str(q.item)][1],
                score=finite(q.score),
                rank=rank,
                boxes=found[str(q.item)].boxes,
                box_labels=found[str(q.item)].labels.tolist(),
                box_scores=found[str(q.item)].scores.tolist(),
            )
            for rank, q in enumerate(queries)
        ]
        tasks = out_dir / "label_studio_tasks.json"
        return [
            self._queries_coco(out_dir / "queries_coco.json", items, sizes, found),
            write_tasks(tasks, "det", self.classes, views, "taskal"),
        ]

    def _queries_coco(
        self,
        path: Path,
        items: list[str],
        sizes: dict[str, tuple[int, int]],
        found: dict[str, Detections],
    ) -> Path:
        images: list[dict[str, Any]] = []
        anns: list[dict[str, Any]] = []
        for image_id, key in enumerate(items, start=1):
            w, h = sizes[key]
            images.append({"id": image_id, "file_name": key, "width": w, "height": h})
            d = found[key]
            rows = zip(d.boxes.tolist(), d.labels.tolist(), d.scores.tolist(), strict=True)
            for box, label, score in rows:
                ann = _annotation(len(anns) + 1, image_id, box, label)
                anns.append(dict(ann, score=round(score, 4)))
        what = "label the boxes of each image (annotations: the model's, with their score)"
        path.write_text(json.dumps(_coco(images, anns, self.classes, what), indent=1))
        return path

    def gallery(
        self, queries: Sequence[Query], pool: ImagePool, adapter: Adapter
    ) -> list[GalleryEntry]:
        top = list(queries)[: self.settings.gallery]
        if not top:
            return []
        found = self._detections(adapter, pool, [q.item for q in top])
        entries = []
        for rank, (q, d) in enumerate(zip(top, found, strict=True)):
            d = d.above(SHOW_SCORE)
            image, scale = picture(pool.paths[str(q.item)])
            entries.append(
                GalleryEntry(
                    title=f"#{rank + 1} {q.item}  score {finite(q.score):.3g}",
                    image=image,
                    boxes=d.boxes * scale,
                    box_labels=[
                        f"{self.classes[c]} {s:.2f}"
                        for c, s in zip(d.labels.tolist(), d.scores.tolist(), strict=True)
                    ],
                )
            )
        return entries

    def batch_classes(
        self, queries: Sequence[Query], pool: ImagePool, adapter: Adapter
    ) -> dict[str, int]:
        """Boxes per predicted class (score >= 0.5) over the queried images."""
        items = list(dict.fromkeys(str(q.item) for q in queries))
        counts = np.zeros(len(self.classes), dtype=np.int64)
        for d in self._detections(adapter, pool, items):
            counts += np.bincount(d.above(DETECT_SCORE).labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}


def _labels(column: np.ndarray, columns: int, background: int | None) -> np.ndarray:
    """Class indices of probability columns: the background column (-1) left out."""
    if background is None:
        return column.astype(np.int64)
    shifted = np.where(column > background, column - 1, column)
    return np.where(column == background, -1, shifted).astype(np.int64)


def _checked(
    path: Path, key: str, boxes: np.ndarray, labels: np.ndarray, size: tuple[int, int]
) -> bytes:
    """An image's boxes in the store's encoding, each inside the image (within 1 px, then
    clipped) with an area."""
    w, h = size
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    t = BOX_TOLERANCE
    outside = (
        ~np.isfinite(b).all(1) | (b[:, :2] < -t).any(1) | (b[:, 2] > w + t) | (b[:, 3] > h + t)
    )
    if outside.any():
        box = b[int(np.flatnonzero(outside)[0])].tolist()
        raise CampaignError(
            f"{path}: {key}: the box {box} (x1, y1, x2, y2) lies outside the {w}x{h} image{NOTHING}"
        )
    b[:, 0::2], b[:, 1::2] = b[:, 0::2].clip(0, w), b[:, 1::2].clip(0, h)
    b = np.round(b, 3)
    flat = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    if flat.any():
        box = b[int(np.flatnonzero(flat)[0])].tolist()
        raise CampaignError(f"{path}: {key}: the box {box} has no area{NOTHING}")
    return boxes_bytes(b, np.asarray(labels).tolist())


def _annotation(ann_id: int, image_id: int, box: Sequence[float], label: int) -> dict[str, Any]:
    """A COCO annotation of an xyxy box of class index ``label`` (category ``label + 1``)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": int(label) + 1,
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "area": (x2 - x1) * (y2 - y1),
        "iscrowd": 0,
    }


def _coco(
    images: list[dict[str, Any]], anns: list[dict[str, Any]], classes: list[str], what: str
) -> dict[str, Any]:
    return {
        "info": {"description": f"taskal: {what}"},
        "images": images,
        "annotations": anns,
        "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)],
    }


def _file_names(data: dict[str, Any]) -> list[str]:
    """The ``file_name`` s of a COCO json's well-formed image entries (the rest are left to
    the json's validation)."""
    images = data.get("images")
    if not isinstance(images, list):
        return []
    names = [i.get("file_name") for i in images if isinstance(i, dict)]
    return list(dict.fromkeys(n for n in names if isinstance(n, str) and n))


def _one_line(err: BaseException) -> str:
    """A (COCO validation) error message as one line: its first problem, and how many more."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(err).__name__
    count = re.search(r"has (\d+) problem", lines[0])
    more = (int(count.group(1)) if count else len(lines) - 1) - 1
    return lines[1] + (f" (and {more} more problem(s))" if more > 0 else "")


__all__ = ["DetectionKit", "Detections", "boxes_bytes", "boxes_of"]
