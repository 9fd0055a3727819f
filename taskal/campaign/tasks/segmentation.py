"""Segmentation campaigns with an mmseg 1.x config: PNG label maps (255 = unlabeled) in, masks,
COCO json and Label Studio brush tasks out; training through mmengine's Runner."""

from __future__ import annotations

import inspect
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn

from taskal.adapters._segmentation import PixelRegions
from taskal.adapters.mmseg_segmentation import MMSegAdapter
from taskal.campaign.labelstudio import QueryView, read_export, write_tasks
from taskal.campaign.report import GalleryEntry
from taskal.campaign.store import CampaignError, LabelRow, NewLabel
from taskal.campaign.tasks._common import (
    config_classes,
    finite,
    refuse_ensembles,
    train_dataset,
)
from taskal.campaign.tasks.base import TaskKit
from taskal.data.images import ImagePool
from taskal.data.segmentation import check_mask, load_segmentation_folder
from taskal.evaluation.segmentation import segmentation_metrics
from taskal.fitting import fit_mmseg
from taskal.functional.uncertainty import entropy
from taskal.llal.openmmlab import LLALSegmentor
from taskal.masks import UNLABELED, export_queries, item_file, query_masks
from taskal.queries import Query
from taskal.strategies.base import QueryStrategy
from taskal.training import LLALConfig
from taskal.training_mmseg import MMSegTrainConfig
from taskal.types import Adapter


def mask_bytes(mask: np.ndarray) -> bytes:
    """A label map as PNG bytes (uint8, 255 = unlabeled)."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_of(value: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(value)) as image:
        return np.asarray(image)


class SegmentationKit(TaskKit):
    """A campaign over an mmseg ``EncoderDecoder`` config (``default_scope = 'mmseg'``).

    The labeled images it starts with are the config's ``train_dataloader.dataset`` folders
    (``data_root`` + ``data_prefix.img_path`` / ``seg_map_path``). Returned labels are PNG
    label maps named like the queried images (``item_file``), 255 on pixels left unlabeled,
    or a Label Studio JSON export. ``al.eval = dict(img_dir=..., ann_dir=...)`` adds mIoU
    and mean Dice per round.
    """

    task: ClassVar[str] = "seg"
    label_kind: ClassVar[str] = "mask"

    def __init__(self, cfg: Any, settings: Any) -> None:
        super().__init__(cfg, settings)
        self.regions = PixelRegions.of(settings.regions) if settings.query == "region" else None
        self.cost_unit = "pixels" if settings.query == "region" else "images"
        self.llal_cfg = LLALConfig(**settings.llal)
        refuse_ensembles(settings.strategy)
        self._eval_pool: Any = None

    def preflight(self) -> None:
        """The training and adapter settings and the evaluation folders, checked."""
        try:
            MMSegTrainConfig(work_dir=".", **self.settings.train)
        except (TypeError, ValueError) as err:
            raise CampaignError(f"al.train: {err}") from None
        known = set(inspect.signature(MMSegAdapter.__init__).parameters) - {"self", "model"}
        unknown = sorted(set(self.settings.adapter) - known)
        if unknown:
            raise CampaignError(f"al.adapter: unknown argument(s) {unknown}; known {sorted(known)}")
        if self.settings.eval:
            self._eval()

    def check_keys(self, keys: Sequence[str]) -> None:
        """Masks are files named :func:`item_file` of their image: two images must not share
        one."""
        seen: dict[str, str] = {}
        for key in keys:
            other = seen.setdefault(item_file(key), key)
            if other != key:
                raise CampaignError(
                    f"images {other} and {key} would share the mask file {item_file(key)}; "
                    "rename one of them"
                )

    def _eval(self) -> Any:
        if self._eval_pool is None:
            spec = self.settings.eval or {}
            try:
                self._eval_pool = load_segmentation_folder(
                    spec["img_dir"], spec["ann_dir"], self.classes
                )
            except (KeyError, FileNotFoundError, ValueError) as err:
                raise CampaignError(f"al.eval (img_dir, ann_dir): {err}") from None
        return self._eval_pool

    @property
    def classes(self) -> list[str]:
        return config_classes(self.cfg)

    def _train_dataset(self) -> dict[str, Any]:
        return train_dataset(self.cfg)

    def initial(self) -> tuple[list[tuple[str, str]], list[NewLabel]]:
        ds = self._train_dataset()
        prefix = ds.get("data_prefix") or {}
        if not prefix.get("img_path"):
            return [], []
        root = Path(str(ds.get("data_root") or ""))
        img_dir, ann_dir = root / prefix["img_path"], root / prefix.get("seg_map_path", "")
        try:
            pool = load_segmentation_folder(
                img_dir,
                ann_dir,
                self.classes,
                ds.get("img_suffix", ".png"),
                ds.get("seg_map_suffix", ".png"),
            )
        except (FileNotFoundError, ValueError) as err:
            raise CampaignError(f"the config's training data: {err}") from None
        files, labels = [], []
        for item in pool.ids:
            files.append((str(item), str((img_dir / str(item)).resolve())))
            mask = pool.target(item)["gt_sem_seg"].numpy()
            labels.append(NewLabel(str(item), "mask", mask_bytes(mask), bool((mask != 255).all())))
        return files, labels

    # ---- model ---------------------------------------------------------------------------

    def train(
        self,
        pool: ImagePool,
        labels: dict[str, list[LabelRow]],
        work_dir: Path,
        seed: int,
        strategy: QueryStrategy,
    ) -> Adapter:
        if not labels:
            raise CampaignError("no labeled images to train on; import labels first")
        data = work_dir / "labeled"
        (data / "images").mkdir(parents=True, exist_ok=True)
        (data / "masks").mkdir(parents=True, exist_ok=True)
        for key, rows in labels.items():
            name = item_file(key)
            link = data / "images" / name
            if not link.exists():
                os.symlink(pool.paths[key], link)
            (data / "masks" / name).write_bytes(rows[-1].value)
        seg_pool = load_segmentation_folder(data / "images", data / "masks", self.classes)
        train_cfg = MMSegTrainConfig(work_dir=work_dir / "train", **self.settings.train)
        return fit_mmseg(
            self.cfg,
            seg_pool,
            list(seg_pool.ids),
            train_cfg,
            seed % 2**31,
            strategy,
            regions=self.regions,
            adapter_kwargs=self.settings.adapter,
            llal_cfg=self.llal_cfg,
            device=self.settings.device,
        )

    model_key = "segmentor"

    def new_adapter(self) -> Adapter:
        return MMSegAdapter(
            dict(self.cfg.model),
            regions=self.regions,
            device=self.settings.device,
            **self.settings.adapter,
        )

    def new_loss_predictor(self, adapter: Adapter) -> nn.Module:
        return LLALSegmentor(adapter.model, hidden=self.llal_cfg.hidden).loss_predictor

    # ---- labels --------------------------------------------------------------------------

    def read_labels(
        self,
        path: Path,
        pool: ImagePool,
        recorded: dict[str, list[LabelRow]],
        overwrite: bool = False,
    ) -> list[NewLabel]:
        if path.is_file() and path.suffix == ".json":
            masks = {k: np.asarray(v) for k, v in read_export(path, "seg", self.classes).items()}
        elif path.is_dir():
            by_file = {item_file(k): str(k) for k in pool.ids}
            masks = {}
            for file in sorted(path.glob("*.png")):
                if file.name not in by_file:
                    raise CampaignError(
                        f"{file.name} matches no image of the campaign (masks are named like "
                        f"{next(iter(by_file))}); nothing was imported"
                    )
                with Image.open(file) as image:
                    masks[by_file[file.name]] = np.asarray(image)
            if not masks:
                raise CampaignError(f"{path} holds no PNG masks; nothing was imported")
        else:
            raise CampaignError(
                f"{path}: give a folder of PNG label maps or a Label Studio JSON export"
            )
        out = []
        for key, mask in sorted(masks.items()):
            out.append(self._merged(key, mask, pool, recorded.get(key, []), overwrite))
        return out

    def _merged(
        self, key: str, mask: np.ndarray, pool: ImagePool, rows: list[LabelRow], overwrite: bool
    ) -> NewLabel:
        hw = pool.read_image(key).shape[-2:]
        try:
            check_mask(mask, (int(hw[0]), int(hw[1])), len(self.classes), UNLABELED, key)
        except ValueError as err:
            raise CampaignError(f"{err}; nothing was imported") from None
        new = mask.astype(np.uint8)
        if not bool((new != UNLABELED).any()):
            raise CampaignError(
                f"{key}: the mask labels no pixel (all 255); nothing was imported. Leave out "
                "images you did not label"
            )
        if rows:
            old = mask_of(rows[-1].value)
            given = new != UNLABELED
            clash = given & (old != UNLABELED) & (old != new)
            if bool(clash.any()) and not overwrite:
                raise CampaignError(
                    f"{key}: {int(clash.sum())} pixels already carry another label; nothing "
                    "was imported (pass --overwrite to replace recorded labels)"
                )
            new = np.where(given, new, old).astype(np.uint8)
        return NewLabel(key, "mask", mask_bytes(new), bool((new != UNLABELED).all()))

    # ---- outputs -------------------------------------------------------------------------

    def evaluate(self, adapter: Adapter) -> dict[str, float]:
        if not self.settings.eval:
            return {}
        scores = segmentation_metrics(adapter, self._eval(), batch_size=self.settings.batch_size)
        return {"mIoU": float(scores["mIoU"]), "mDice": float(scores["mDice"])}

    def _argmax(self, adapter: Adapter, pool: ImagePool, ids: Sequence[str]) -> list[np.ndarray]:
        out = []
        for batch in pool.batches(list(ids), self.settings.batch_size):
            p = adapter.predict(batch)
            labels = p.probs_UCK[..., 0].argmax(1).cpu()
            for i, image in enumerate(batch.inputs):
                h, w = image.shape[-2:]
                out.append(labels[p.owner_U.cpu() == i].reshape(h, w).numpy().astype(np.uint8))
        return out

    def stop_predictions(self, adapter: Adapter, pool: ImagePool, ids: Sequence[str]) -> np.ndarray:
        maps = self._argmax(adapter, pool, ids)
        return np.concatenate([m.ravel() for m in maps]) if maps else np.zeros(0, np.uint8)

    def export(
        self, out_dir: Path, queries: Sequence[Query], pool: ImagePool, adapter: Adapter
    ) -> list[Path]:
        masks_dir = out_dir / "query_masks"
        files = [export_queries(queries, pool, self.regions, masks_dir)]
        region = query_masks(queries, pool, self.regions or PixelRegions())
        items = list(dict.fromkeys(str(q.item) for q in queries))
        predicted = dict(zip(items, self._argmax(adapter, pool, items), strict=True))
        files.append(self._coco(out_dir / "queries_coco.json", queries, pool, region))
        views = []
        for rank, q in enumerate(queries):
            key = str(q.item)
            h, w = predicted[key].shape
            views.append(
                QueryView(
                    item=key,
                    image=self.image_ref(key, pool),
                    width=int(w),
                    height=int(h),
                    score=finite(q.score),
                    rank=rank,
                    region=q.region,
                    region_mask=None if q.region is None else region[q.item].astype(bool),
                    mask=predicted[key],
                )
            )
        files.append(
            write_tasks(out_dir / "label_studio_tasks.json", "seg", self.classes, views, "taskal")
        )
        return files

    def _coco(
        self, path: Path, queries: Sequence[Query], pool: ImagePool, region: dict[Any, np.ndarray]
    ) -> Path:
        images, anns, ids = [], [], {}  # type: ignore[var-annotated]
        for q in queries:
            key = str(q.item)
            if key not in ids:
                ids[key] = len(ids) + 1
                h, w = region[q.item].shape
                images.append({"id": ids[key], "file_name": key, "height": h, "width": w})
        for k, (key, mask) in enumerate((str(i), m) for i, m in region.items()):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            anns.append(
                {
                    "id": k + 1,
                    "image_id": ids[key],
                    "category_id": 1,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "area": float(mask.sum()),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 1,
                }
            )
        data = {
            "info": {"description": "taskal queries: label the pixels of each query mask"},
            "images": images,
            "annotations": anns,
            "categories": [{"id": 1, "name": "query"}],
        }
        path.write_text(json.dumps(data))
        return path

    def gallery(
        self, queries: Sequence[Query], pool: ImagePool, adapter: Adapter
    ) -> list[GalleryEntry]:
        top = list(queries)[: self.settings.gallery]
        if not top:
            return []
        region = query_masks(top, pool, self.regions or PixelRegions())
        entries = []
        for rank, q in enumerate(top):
            batch = pool.take([q.item])
            p = adapter.predict(batch)
            h, w = batch.inputs[0].shape[-2:]
            heat = entropy(p.probs_UCK, kind=p.kind).reshape(h, w).cpu().numpy()
            image = (batch.inputs[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            entries.append(
                GalleryEntry(
                    title=f"#{rank + 1} {q.item}  score {finite(q.score):.3g}",
                    image=image,
                    heatmap=heat,
                    region_mask=None if q.region is None else region[q.item].astype(bool),
                )
            )
        return entries

    def batch_classes(
        self, queries: Sequence[Query], pool: ImagePool, adapter: Adapter
    ) -> dict[str, int]:
        items = list(dict.fromkeys(str(q.item) for q in queries))
        counts = np.zeros(len(self.classes), dtype=np.int64)
        for m in self._argmax(adapter, pool, items):
            counts += np.bincount(m.ravel(), minlength=len(self.classes))[: len(self.classes)]
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}


__all__ = ["SegmentationKit", "mask_bytes", "mask_of"]
