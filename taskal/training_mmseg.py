"""Supervised training of an mmseg 1.x segmentor on a pool's labeled images, through mmengine.

:func:`train_mmseg` trains the way mmseg's own ``tools/train.py`` does, with the config's own
schedule (``IterBasedTrainLoop`` with ``max_iters`` in mmseg's shipped configs), optimizer,
train pipeline and hooks, on the labeled items only. What it changes in the config is listed
in :func:`resolve_config`; the torchvision counterpart is :mod:`taskal.training_seg`, the
detection one :mod:`taskal.training_mmdet`, whose helpers this module shares.

Full and partial labels: the pool is a :class:`~taskal.data.SegmentationPool` (every item
fully labeled) or a :class:`~taskal.partial.PartialSegmentationPool` (items labeled in some
regions). :func:`write_labeled_masks` gives mmseg's ``BaseSegDataset`` one label map per
labeled item: a link to the pool's mask for a fully labeled item, the masked map of
``PartialSegmentationPool.take`` (255 outside the labeled regions) for the others, and a
split file naming the items; images are read in place. 255 is the decode heads' default
``ignore_index``, and :func:`resolve_config` sets ``avg_non_ignore=True`` on their
``CrossEntropyLoss``: the objective is the mean over the batch's labeled pixels, as in
:func:`~taskal.training_seg.train_segmenter`. (mmseg's default averages over all pixels,
ignored ones included, which scales each image's loss by its labeled fraction.)

Images: the pipeline's ``LoadImageFromFile`` reads the pool's files (BGR, ``0..255``), which is
what :class:`~taskal.adapters.MMSegAdapter` feeds the model from the pool's ``[0, 1]`` RGB
tensors. Small images: mmseg's shipped pipelines resize and crop for their own data (the
DRIVE UNet resizes to 584x565 at 0.5-2x, then crops 64x64; ``data_preprocessor.size`` pads
to the crop). For images of a few dozen pixels train them at their own size: pass
``MMSegTrainConfig(pipeline=SMALL_IMAGE_PIPELINE)`` (or set ``train_pipeline`` in the
config) and, for a UNet, ``model.data_preprocessor=dict(size=None, size_divisor=16)``.

Typical use, one active learning round::

    cfg = Config.fromfile("my_unet.py")  # _base_ = 'mmseg::unet/unet-s5-d16_fcn_...'
    train = MMSegTrainConfig(work_dir="work_dirs/r0", max_iters=2000)
    model = train_mmseg(cfg, partial_pool, partial_pool.ids, train, seed=0)
    adapter = MMSegAdapter(model)
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from torch import nn

from taskal.data.segmentation import SegmentationPool
from taskal.functional.validation import is_int
from taskal.masks import _atomic_text, _write_png
from taskal.partial.segmentation import IGNORE_INDEX, PartialSegmentationPool
from taskal.training_det import check_labeled_ids
from taskal.training_mmdet import (
    MMDetTrainConfig,
    _build_runner,
    _check_no_downloads,
    _close_log_files,
    _FiniteLossHook,
    _innermost,
    _restored_global_rng,
    _set_hooks,
    _training_only,
)
from taskal.types import ItemId

#: the labeled set's folder in the work dir (label maps and split file), rewritten each call.
LABELED_DIR = "labeled_seg"

#: a train pipeline for small images trained at their own size: no resize, no crop.
SMALL_IMAGE_PIPELINE: list[dict[str, Any]] = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackSegInputs"),
]

_HEADS = ("decode_head", "auxiliary_head")


@dataclass
class MMSegTrainConfig(MMDetTrainConfig):
    """What :func:`train_mmseg` changes in an mmseg config: :class:`MMDetTrainConfig`'s
    fields (``None`` keeps the config's own), plus:

    Attributes:
        max_iters: iterations of an ``IterBasedTrainLoop`` (mmseg's usual loop; ``None``:
            ``train_cfg.max_iters``); ``max_epochs`` is for an ``EpochBasedTrainLoop``. The
            config's ``param_scheduler`` is kept as it is: its ``end`` is not rescaled
            (shorten it in the config with the loop). ``min_epoch_items`` only applies to
            epoch-based loops: an iteration-based one draws from an infinite sampler.
    """

    max_iters: int | None = None

    where: ClassVar[str] = "mmseg_train"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_iters is not None and not (is_int(self.max_iters) and self.max_iters >= 1):
            raise ValueError(
                f"{self.where}.max_iters must be an int >= 1 or None, got {self.max_iters!r}"
            )


class LabeledMasks(NamedTuple):
    """The labeled set as mmseg's ``BaseSegDataset`` reads it (all paths absolute)."""

    img_dir: Path  # the pool's image folder, read in place
    ann_dir: Path  # one label map per labeled item (255: unlabeled)
    split: Path  # the items' names without the image suffix, one a line (the ann_file)


def train_mmseg(
    cfg: Config,
    pool: SegmentationPool | PartialSegmentationPool,
    labeled_ids: Sequence[ItemId],
    train_cfg: MMSegTrainConfig,
    seed: int,
    model: nn.Module | None = None,
    hooks: Sequence[Hook] = (),
) -> nn.Module:
    """Train an mmseg segmentor on ``pool``'s labeled items with mmengine's ``Runner``.

    Writes ``<work_dir>/labeled_seg/`` (:func:`write_labeled_masks`), resolves the config
    (:func:`resolve_config`) and runs ``Runner.train()``. Python's, numpy's and torch's
    global RNG states are restored afterwards: the Runner seeds them with ``seed``.

    Args:
        cfg: an mmseg config (``Config.fromfile``); not modified.
        pool: a ``SegmentationPool``, or a ``PartialSegmentationPool`` over one (its
            ``ids`` are the trainable items); the classes are the pool's, in label order.
        labeled_ids: the items to train on (ids from ``pool.ids``), at least one.
        train_cfg: what to override in ``cfg`` and where to write.
        seed: seeds the model's initialisation, the data order and augmentation.
        model: train this segmentor in place instead of building ``cfg.model`` (e.g. an
            :class:`~taskal.adapters.MMSegAdapter`'s, with its injected dropout). Its
            ``CrossEntropyLoss`` modules get ``avg_non_ignore=True``. As with any mmengine
            Runner, ``init_weights()`` runs first unless the model was already initialised
            (``model.is_init``): set ``model.is_init = True`` after loading weights into a
            fresh model yourself, or they are re-initialised. The Runner moves it to its
            device.
        hooks: extra mmengine hooks registered on the Runner.

    Returns:
        The trained segmentor (``model`` itself when given), unwrapped, in eval mode.

    Raises:
        TypeError: a pool that is not (over) a ``SegmentationPool``: mmseg reads files.
        ValueError: no labeled ids, ids not in ``pool``, an unlabeled pool, a config that
            would download weights, a head whose ``num_classes`` is not the pool's or whose
            ``ignore_index`` is not 255, or a loop without ``max_iters`` or ``max_epochs``.
        FileNotFoundError: an image or a mask of a labeled item is missing.
        FloatingPointError: a non-finite loss; training stops at that step.
    """
    ids = check_labeled_ids(pool, labeled_ids, "train_mmseg")
    source = _source(pool)
    _check_no_downloads(cfg, model)
    if model is not None and cfg.get("load_from"):
        raise ValueError(
            f"both a model and load_from={cfg.get('load_from')!r} were given: the checkpoint "
            "would replace the model's weights; set load_from=None or pass no model"
        )
    _check_heads(_heads(cfg.model if model is None else model), source)
    work_dir = Path(train_cfg.work_dir)
    if work_dir.exists() and not work_dir.is_dir():
        raise ValueError(f"work_dir {work_dir} exists and is not a folder; choose another")
    work_dir.mkdir(parents=True, exist_ok=True)
    labeled = write_labeled_masks(pool, ids, work_dir / LABELED_DIR)
    run_cfg = resolve_config(cfg, pool, labeled, train_cfg, seed)
    if model is not None:
        _average_over_labeled_pixels(model)
    with _restored_global_rng():
        runner = _build_runner(run_cfg, model)
        seg: nn.Module = runner.model.module if is_model_wrapper(runner.model) else runner.model
        runner.register_hook(_FiniteLossHook("segmentation loss", "MMSegTrainConfig"))
        for hook in hooks:
            runner.register_hook(hook)
        try:
            runner.train()
        finally:
            seg.eval()
            _close_log_files(runner)
    return seg


def write_labeled_masks(
    pool: SegmentationPool | PartialSegmentationPool,
    labeled_ids: Sequence[ItemId],
    folder: str | Path,
) -> LabeledMasks:
    """Write the label maps and split file of ``labeled_ids`` into ``folder``.

    ``folder/masks/<stem><seg_map_suffix>`` (the pool's suffixes and sub-folders) is a
    symbolic link to the pool's mask for a fully labeled item (a copy where links are not
    allowed) and, for a partially labeled item of a ``PartialSegmentationPool``, a PNG of
    its masked labels (255 outside the labeled regions) written atomically.
    ``folder/labeled.txt`` lists the items' stems in ``labeled_ids``' order. A ``masks``
    folder written by an earlier call is replaced, so no stale map remains.

    Raises:
        TypeError, ValueError, FileNotFoundError: as :func:`train_mmseg`; ``folder`` holds
            a ``masks`` folder this function did not write.
    """
    ids = check_labeled_ids(pool, labeled_ids, "train_mmseg")
    source = _source(pool)
    if source.ann_dir is None:
        raise ValueError(
            f"the pool over {source.img_dir} is unlabeled (made without ann_dir): it has no "
            "masks to train on; load it with its mask folder"
        )
    folder = Path(folder)
    masks, split = folder / "masks", folder / "labeled.txt"
    if masks.exists():
        if not split.is_file():
            raise ValueError(
                f"{masks} exists but was not written by write_labeled_masks (no {split.name} "
                "beside it); choose another folder"
            )
        shutil.rmtree(masks)
    masks.mkdir(parents=True)
    stems = []
    for item in ids:
        image = source.img_dir / str(item)
        if not image.is_file():
            raise FileNotFoundError(f"image {image} of labeled item {item!r} is missing")
        stem = str(item)[: -len(source.img_suffix)]
        out = masks / (stem + source.seg_map_suffix)
        out.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(pool, PartialSegmentationPool) and item not in pool.state.full:
            (sample,) = pool.take([item]).data_samples or [{}]
            _write_png(out, np.asarray(sample["gt_sem_seg"].cpu().numpy(), dtype=np.uint8))
        else:
            _link(source.mask_path(item), out, item)
        stems.append(stem)
    _atomic_text(split, "".join(f"{s}\n" for s in stems))
    return LabeledMasks(source.img_dir.resolve(), masks.resolve(), split.resolve())


def resolve_config(
    cfg: Config,
    pool: SegmentationPool | PartialSegmentationPool,
    labeled: LabeledMasks,
    train_cfg: MMSegTrainConfig,
    seed: int,
) -> Config:
    """The config :func:`train_mmseg` runs: a copy of ``cfg`` trained on ``labeled``.

    Changes, everything else (model, optimizer, schedule, hooks, pipeline) kept:

    * ``avg_non_ignore=True`` on every ``CrossEntropyLoss`` of ``model.decode_head`` and
      ``model.auxiliary_head`` (a head without ``loss_decode`` gets mmseg's default loss
      with it): the loss is the mean over labeled pixels, unlabeled ones (255) add nothing.
    * ``train_dataloader.dataset`` (its innermost ``dataset``, inside the config's own
      wrappers) becomes a ``BaseSegDataset`` on ``labeled`` (``ann_file`` its split file)
      with ``metainfo=dict(classes=pool.classes)`` and ``reduce_zero_label=False``, keeping
      the config's ``pipeline`` (or ``train_cfg.pipeline``) and ``backend_args``; for an
      epoch-based loop, wrapped in a ``RepeatDataset`` for ``train_cfg.min_epoch_items``.
    * ``train_cfg``'s overrides: ``max_iters`` or ``max_epochs``, ``batch_size``, ``lr``,
      ``num_workers``.
    * as :func:`taskal.training_mmdet.resolve_config`: no validation or test, no
      visualization hook, a checkpoint of the final weights only if asked, a local
      visualizer, ``randomness=dict(seed=seed, deterministic=False)``, ``launcher='none'``,
      a unique ``experiment_name``; ``default_scope='mmseg'``.

    Raises:
        ValueError: a loop without ``max_iters`` or ``max_epochs``, an override for the
            other kind of loop, or a ``LoadAnnotations`` with ``reduce_zero_label=True``.
    """
    out = copy.deepcopy(cfg)
    loop = out.get("train_cfg")
    kind = next((k for k in ("max_iters", "max_epochs") if k in (loop or {})), None)
    if not isinstance(loop, dict) or kind is None:
        raise ValueError(
            "train_mmseg needs a train_cfg with max_iters (IterBasedTrainLoop) or max_epochs "
            f"(EpochBasedTrainLoop), got train_cfg={loop!r}"
        )
    for key in ("max_iters", "max_epochs"):
        value = getattr(train_cfg, key)
        if value is not None and key != kind:
            raise ValueError(
                f"MMSegTrainConfig.{key}={value} but the config's train_cfg has {kind}: set "
                f"MMSegTrainConfig.{kind} instead"
            )
        if value is not None:
            loop[key] = value
    _training_only(out, train_cfg, seed, "mmseg", "SegLocalVisualizer")
    _average_over_labeled_pixels(out.model)
    loader = out.train_dataloader
    loader["dataset"] = _labeled_dataset(loader["dataset"], pool, labeled, train_cfg)
    items = len(labeled.split.read_text().splitlines()) * _repeats(loader["dataset"])
    times = -(-train_cfg.min_epoch_items // items) if kind == "max_epochs" else 1
    if times > 1:
        loader["dataset"] = dict(type="RepeatDataset", times=times, dataset=loader["dataset"])
    per_epoch = -(-items * times // loader["batch_size"])
    _set_hooks(out, train_cfg, per_epoch if kind == "max_epochs" else int(loop["max_iters"]))
    return out


def _labeled_dataset(
    dataset: Mapping[str, Any],
    pool: SegmentationPool | PartialSegmentationPool,
    labeled: LabeledMasks,
    train_cfg: MMSegTrainConfig,
) -> dict[str, Any]:
    """The config's train dataset with its innermost dataset replaced by the labeled set."""
    outer = copy.deepcopy(dict(dataset))
    inner = _innermost(outer)
    if "datasets" in inner:
        raise ValueError(
            "train_mmseg trains on one labeled set: replace the config's "
            f"{inner.get('type')} of several datasets by a single dataset"
        )
    source = _source(pool)
    given = train_cfg.pipeline
    pipeline = copy.deepcopy(list(given) if given is not None else inner["pipeline"])
    for step in pipeline:
        if str(step.get("type")).endswith("LoadAnnotations") and step.get("reduce_zero_label"):
            raise ValueError(
                "the train pipeline's LoadAnnotations has reduce_zero_label=True, which shifts "
                "the pool's labels by one; remove it (the pool's 0 is its first class)"
            )
    labeled_set = dict(
        type="BaseSegDataset",
        data_root=str(labeled.split.parent),  # short paths: mmengine formats configs slowly
        ann_file=os.path.relpath(labeled.split, labeled.split.parent),
        data_prefix=dict(
            img_path=str(labeled.img_dir),
            seg_map_path=os.path.relpath(labeled.ann_dir, labeled.split.parent),
        ),
        img_suffix=source.img_suffix,
        seg_map_suffix=source.seg_map_suffix,
        metainfo=dict(classes=tuple(source.classes)),
        reduce_zero_label=False,
        ignore_index=IGNORE_INDEX,
        pipeline=pipeline,
        backend_args=inner.get("backend_args"),
    )
    inner.clear()
    inner.update(labeled_set)
    return outer


def _repeats(dataset: Mapping[str, Any]) -> int:
    """How many times the config's ``RepeatDataset`` wrappers repeat the innermost dataset."""
    times = 1
    while isinstance(dataset.get("dataset"), Mapping):
        times *= int(dataset.get("times", 1)) if dataset.get("type") == "RepeatDataset" else 1
        dataset = dataset["dataset"]
    return times


def _average_over_labeled_pixels(model: Any) -> None:
    """``avg_non_ignore=True`` on every ``CrossEntropyLoss`` of a model config's heads, or
    of a built model's loss modules, in place."""
    if isinstance(model, nn.Module):
        from mmseg.models.losses import CrossEntropyLoss

        for module in model.modules():
            if isinstance(module, CrossEntropyLoss):
                module.avg_non_ignore = True
        return
    for _, head in _head_cfgs(model):
        losses = head.setdefault("loss_decode", dict(type="CrossEntropyLoss", loss_weight=1.0))
        for loss in losses if isinstance(losses, list) else [losses]:
            if str(loss.get("type")).split(".")[-1] == "CrossEntropyLoss":
                loss["avg_non_ignore"] = True


def _head_cfgs(model_cfg: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(name, config)`` of a model config's decode and auxiliary heads (each may be a list)."""
    for key in _HEADS:
        heads = model_cfg.get(key)
        for i, head in enumerate(heads if isinstance(heads, list) else [heads]):
            if isinstance(head, dict):
                yield f"model.{key}" + (f"[{i}]" if isinstance(heads, list) else ""), head


def _heads(model: Mapping[str, Any] | nn.Module) -> list[tuple[str, Any, Any]]:
    """``(name, num_classes, ignore_index)`` of a built model's decode heads, or of a model
    config's (``ignore_index`` 255 by default)."""
    if isinstance(model, nn.Module):
        from mmseg.models.decode_heads.decode_head import BaseDecodeHead

        return [
            (f"model.{name}", m.num_classes, m.ignore_index)
            for name, m in model.named_modules()
            if isinstance(m, BaseDecodeHead)
        ]
    return [(n, h.get("num_classes"), h.get("ignore_index", 255)) for n, h in _head_cfgs(model)]


def _check_heads(heads: list[tuple[str, Any, Any]], pool: SegmentationPool) -> None:
    """Every head predicts the pool's classes and ignores 255, the unlabeled value."""
    if pool.ignore_index != IGNORE_INDEX:
        raise ValueError(
            f"the pool marks unlabeled pixels with {pool.ignore_index}; mmseg training here "
            f"expects {IGNORE_INDEX}: reload the pool with ignore_index={IGNORE_INDEX}"
        )
    for name, num_classes, ignore_index in heads:
        if num_classes is not None and num_classes != len(pool.classes):
            raise ValueError(
                f"the segmentor's {name} has num_classes={num_classes} but the pool has "
                f"{len(pool.classes)} classes {pool.classes}; set num_classes="
                f"{len(pool.classes)} in its config"
            )
        if ignore_index != IGNORE_INDEX:
            raise ValueError(
                f"the segmentor's {name} has ignore_index={ignore_index}, but unlabeled "
                f"pixels are {IGNORE_INDEX}; set ignore_index={IGNORE_INDEX} (mmseg's default)"
            )


def _source(pool: SegmentationPool | PartialSegmentationPool) -> SegmentationPool:
    """The ``SegmentationPool`` whose files hold the images (and full masks)."""
    source = pool.oracle if isinstance(pool, PartialSegmentationPool) else pool
    if not isinstance(source, SegmentationPool):
        raise TypeError(
            "train_mmseg reads images and masks from files: pass a SegmentationPool or a "
            f"PartialSegmentationPool over one, got one over {type(source).__name__}"
        )
    return source


def _link(src: Path, dst: Path, item: ItemId) -> None:
    """``dst`` -> ``src`` as a symbolic link (a copy where links are not allowed)."""
    if not src.is_file():
        raise FileNotFoundError(f"mask {src} of labeled item {item!r} is missing")
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


__all__ = [
    "LABELED_DIR",
    "SMALL_IMAGE_PIPELINE",
    "LabeledMasks",
    "MMSegTrainConfig",
    "resolve_config",
    "train_mmseg",
    "write_labeled_masks",
]
