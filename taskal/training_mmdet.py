"""Supervised training of an mmdet 3.x detector on a pool's labeled images, through mmengine.

:func:`train_mmdet` trains the way mmdet's own ``tools/train.py`` does, with the config's own
schedule, optimizer, train pipeline and hooks, on a COCO json it writes holding only the
labeled images (:func:`write_labeled_coco`). What it changes in the config is listed in
:func:`resolve_config`: the data, no validation or test loops, no downloads, no heavy
checkpoints, a seed, and what :class:`MMDetTrainConfig` overrides. The torchvision
counterpart is :mod:`taskal.training_det`.

Labels: the pool's labels are its category ids sorted ascending (``0..C-1``); the labeled
json lists its categories in that order and the dataset gets ``metainfo=dict(classes=
pool.classes)``, so mmdet's ``CocoDataset.cat2label`` is exactly the pool's label map (checked
before training). Images: the pool's files are read by the pipeline's ``LoadImageFromFile``
(BGR, ``0..255``), which is what :class:`~taskal.adapters.MMDetAdapter` feeds the model
from the pool's ``[0, 1]`` RGB tensors.

Typical use, one active learning round::

    cfg = Config.fromfile("configs/det/retinanet_r18_synthetic.py")
    model = train_mmdet(cfg, pool, labeled, MMDetTrainConfig(work_dir="work_dirs/r0"), seed=0)
    adapter = MMDetAdapter(model)
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import math
import random
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import DefaultScope
from mmengine.runner import Runner
from torch import nn

from taskal.data.coco import CocoDetectionPool
from taskal.functional.validation import is_int
from taskal.training_det import check_labeled_ids
from taskal.types import ItemId

#: the labeled subset's annotation file, written into the work dir each call.
LABELED_ANN_FILE = "labeled_coco.json"

#: loops whose data, evaluator and loop config are removed: training only.
_EVAL_KEYS = (
    "val_dataloader",
    "val_evaluator",
    "val_cfg",
    "test_dataloader",
    "test_evaluator",
    "test_cfg",
)


@dataclass
class MMDetTrainConfig:
    """What :func:`train_mmdet` changes in an mmdet config; ``None`` keeps the config's own.

    Attributes:
        work_dir: folder for the labeled COCO json, the resolved config and mmengine's logs
            (``<work_dir>/<timestamp>/``); nothing is written elsewhere.
        max_epochs: epochs (``None``: ``train_cfg.max_epochs``). The config's
            ``param_scheduler`` is kept as it is: its epoch milestones are not rescaled.
        batch_size: images per step (``None``: ``train_dataloader.batch_size``). With
            ``auto_scale_lr.enable`` the Runner scales the learning rate to it.
        lr: the optimizer's learning rate (``None``: ``optim_wrapper.optimizer.lr``).
        min_epoch_items: an epoch holds at least this many images: a labeled set of ``n``
            images (after the config's ``filter_cfg``) is wrapped in mmengine's
            ``RepeatDataset`` with ``times = ceil(min_epoch_items / n)``, so a 10-image set
            gets as many steps per epoch as a 64-image one (0 = never repeat).
        num_workers: data loader worker processes (``None``: the config's; 0 loads in the
            training process, which is the fastest for small images on few cores).
        pipeline: the train pipeline (``None``: the config's own, that of the innermost
            dataset of ``train_dataloader.dataset``).
        save_checkpoint: save the final weights (no optimizer or scheduler state) as
            ``<work_dir>/epoch_<max_epochs>.pth``; off by default, the trained model is
            returned.
    """

    work_dir: str | Path
    max_epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    min_epoch_items: int = 64
    num_workers: int | None = None
    pipeline: list[dict[str, Any]] | None = None
    save_checkpoint: bool = False

    where: ClassVar[str] = "mmdet_train"

    def __post_init__(self) -> None:
        if not str(self.work_dir):
            raise ValueError(f"{self.where}.work_dir must be a folder path, got an empty string")
        self.work_dir = Path(self.work_dir)
        for name in ("max_epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and not (is_int(value) and value >= 1):
                raise ValueError(f"{self.where}.{name} must be an int >= 1 or None, got {value!r}")
        if self.lr is not None and not (
            isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0
        ):
            raise ValueError(f"{self.where}.lr must be a finite number > 0 or None, got {self.lr}")
        if not (is_int(self.min_epoch_items) and self.min_epoch_items >= 0):
            raise ValueError(
                f"{self.where}.min_epoch_items must be an int >= 0, got {self.min_epoch_items!r}"
            )
        if self.num_workers is not None and not (
            is_int(self.num_workers) and self.num_workers >= 0
        ):
            raise ValueError(
                f"{self.where}.num_workers must be an int >= 0 or None, got {self.num_workers!r}"
            )
        if self.pipeline is not None and not (
            isinstance(self.pipeline, Sequence)
            and all(isinstance(t, Mapping) and "type" in t for t in self.pipeline)
        ):
            raise ValueError(
                f"{self.where}.pipeline must be None or a list of transform dicts with a 'type', "
                f"got {self.pipeline!r}"
            )


def train_mmdet(
    cfg: Config,
    pool: CocoDetectionPool,
    labeled_ids: Sequence[ItemId],
    train_cfg: MMDetTrainConfig,
    seed: int,
    model: nn.Module | None = None,
    hooks: Sequence[Hook] = (),
) -> nn.Module:
    """Train an mmdet detector on ``pool``'s labeled images with mmengine's ``Runner``.

    Writes ``<work_dir>/labeled_coco.json`` (:func:`write_labeled_coco`), resolves the config
    (:func:`resolve_config`) and runs ``Runner.train()``. Python's, numpy's and torch's
    global RNG states are restored afterwards: the Runner seeds them with ``seed``.

    Args:
        cfg: an mmdet config (``Config.fromfile``); not modified.
        pool: the pool; its category names are the classes, in label order.
        labeled_ids: the labeled items (ids from ``pool.ids``), at least one.
        train_cfg: what to override in ``cfg`` and where to write.
        seed: seeds the model's initialisation, the data order and augmentation.
        model: train this detector in place instead of building ``cfg.model``. As with
            any mmengine Runner, ``init_weights()`` runs first unless the model was
            already initialised (``model.is_init``, set by a previous ``init_weights`` or
            training): a fresh detector gets its config's initialisation (RetinaNet's prior
            bias), a trained one keeps its weights. Set ``model.is_init = True`` after
            loading weights into a fresh model yourself, or they are re-initialised. The
            Runner moves it to its device (the GPU when there is one).
        hooks: extra mmengine hooks registered on the Runner (e.g.
            :class:`taskal.llal.openmmlab.LLALStopGradHook` for an
            :class:`~taskal.llal.openmmlab.LLALDetector`).

    Returns:
        The trained detector (``model`` itself when given), unwrapped, in eval mode.

    Raises:
        ValueError: no labeled ids, ids not in ``pool``, a config that would download
            weights, a non-epoch-based ``train_cfg``, a detector whose number of classes is
            not the pool's, or no labeled image left after the config's ``filter_cfg``.
        FloatingPointError: a non-finite loss; training stops at that step (lower the
            learning rate or clip gradients; the message says how).
    """
    ids = check_labeled_ids(pool, labeled_ids, "train_mmdet")
    _check_no_downloads(cfg, model)
    if model is not None and cfg.get("load_from"):
        raise ValueError(
            f"both a model and load_from={cfg.get('load_from')!r} were given: the checkpoint "
            "would replace the model's weights; set load_from=None or pass no model"
        )
    work_dir = Path(train_cfg.work_dir)
    if work_dir.exists() and not work_dir.is_dir():
        raise ValueError(f"work_dir {work_dir} exists and is not a folder; choose another")
    work_dir.mkdir(parents=True, exist_ok=True)
    ann_file = write_labeled_coco(pool, ids, work_dir / LABELED_ANN_FILE)
    run_cfg = resolve_config(cfg, pool, ann_file, train_cfg, seed)
    with _restored_global_rng():
        runner = _build_runner(run_cfg, model)
        det: nn.Module = runner.model.module if is_model_wrapper(runner.model) else runner.model
        runner.register_hook(_FiniteLossHook())
        for hook in hooks:
            runner.register_hook(hook)
        try:
            _check_num_classes(det, len(pool.classes))
            runner.train()
        finally:
            det.eval()
            _close_log_files(runner)
    return det


def write_labeled_coco(
    pool: CocoDetectionPool, labeled_ids: Sequence[ItemId], path: str | Path
) -> Path:
    """Write a COCO json holding only ``labeled_ids``' images and all their annotations.

    Entries are copied from ``pool.coco`` unchanged (ids, category ids, crowd annotations,
    which mmdet ignores in training); images follow ``labeled_ids``' order and the
    categories are all of the pool's, sorted by id (label order).

    Returns:
        ``path``.

    Raises:
        ValueError: no labeled ids, or ids that are not items of ``pool``.
    """
    ids = check_labeled_ids(pool, labeled_ids, "train_mmdet")
    image_ids = [pool.image_id(i) for i in ids]
    data = {
        "info": {"description": f"labeled subset of {pool.ann_file}", "images": len(ids)},
        "images": [pool.coco.imgs[i] for i in image_ids],
        "annotations": [a for i in image_ids for a in pool.coco.imgToAnns.get(i, [])],
        "categories": [pool.coco.cats[c] for c in pool.label_to_cat_id],
    }
    path = Path(path)
    path.write_text(json.dumps(data))
    return path


def resolve_config(
    cfg: Config,
    pool: CocoDetectionPool,
    ann_file: str | Path,
    train_cfg: MMDetTrainConfig,
    seed: int,
) -> Config:
    """The config :func:`train_mmdet` runs: a copy of ``cfg`` trained on ``ann_file``.

    Changes, everything else (model, optimizer, schedule, hooks, pipeline) kept:

    * ``train_dataloader.dataset`` (its innermost ``dataset``, inside the config's own
      wrappers) becomes a ``CocoDataset`` on ``ann_file`` and ``pool.img_dir`` with
      ``metainfo=dict(classes=pool.classes)``, keeping the config's ``pipeline`` (or
      ``train_cfg.pipeline``), ``filter_cfg`` and ``backend_args``; wrapped in a
      ``RepeatDataset`` for ``train_cfg.min_epoch_items``.
    * ``train_cfg``'s overrides: ``max_epochs``, ``batch_size``, ``lr``, ``num_workers``.
    * no validation or test: ``val_*`` and ``test_*`` dataloaders, evaluators and loops
      are ``None``; the checkpoint hook is removed (or saves the final weights only),
      and so is the visualization hook; the visualizer keeps a ``LocalVisBackend`` only
      (scalars and the config under ``work_dir``, no images, nothing sent anywhere).
    * ``randomness=dict(seed=seed, deterministic=False)``, ``default_scope='mmdet'``,
      ``launcher='none'``, ``resume=False``, ``work_dir`` and a unique
      ``experiment_name`` (mmengine keeps one logger, message hub and visualizer per
      name, so a second run in the same process must not reuse the first's).
    * the logger hook's ``interval`` is cut to the iterations of one epoch.

    Raises:
        ValueError: a ``train_cfg`` without ``max_epochs`` (iteration-based), duplicate
            class names in the pool, or no labeled image left after ``filter_cfg``.
    """
    out = copy.deepcopy(cfg)
    loop = out.get("train_cfg")
    if not isinstance(loop, dict) or "max_epochs" not in loop:
        raise ValueError(
            "train_mmdet needs an epoch-based train_cfg (type='EpochBasedTrainLoop' with "
            f"max_epochs), got train_cfg={loop!r}"
        )
    if len(set(pool.classes)) != len(pool.classes):
        raise ValueError(
            f"the pool's category names repeat ({pool.classes}); mmdet's CocoDataset finds "
            "categories by name, so give each category a distinct name"
        )
    if train_cfg.max_epochs is not None:
        loop["max_epochs"] = train_cfg.max_epochs
    _training_only(out, train_cfg, seed, "mmdet", "DetLocalVisualizer")
    loader = out.train_dataloader
    loader["dataset"] = _labeled_dataset(loader["dataset"], pool, Path(ann_file), train_cfg)
    items = _epoch_items(loader["dataset"], pool)
    times = -(-train_cfg.min_epoch_items // items)
    if times > 1:
        loader["dataset"] = dict(type="RepeatDataset", times=times, dataset=loader["dataset"])
    _set_hooks(out, train_cfg, -(-items * max(times, 1) // loader["batch_size"]))
    return out


def _training_only(
    cfg: Config, train_cfg: MMDetTrainConfig, seed: int, scope: str, visualizer_type: str
) -> None:
    """In place: ``train_cfg``'s batch size, workers and learning rate; no validation or
    test; a local visualizer (``visualizer_type`` when the config has none) under a unique
    experiment name; the seed, ``default_scope=scope`` and a non-distributed fresh run."""
    loader = cfg.train_dataloader
    if train_cfg.batch_size is not None:
        loader["batch_size"] = train_cfg.batch_size
    if train_cfg.num_workers is not None:
        loader["num_workers"] = train_cfg.num_workers
    if loader.get("num_workers", 0) == 0:
        loader["persistent_workers"] = False  # torch refuses it without workers
    if train_cfg.lr is not None:
        cfg.optim_wrapper.optimizer["lr"] = train_cfg.lr
    for key in _EVAL_KEYS:
        cfg[key] = None
    name = f"taskal_{scope}_{uuid.uuid4().hex[:12]}"
    visualizer = dict(cfg.get("visualizer") or dict(type=visualizer_type))
    visualizer.update(name=name, vis_backends=[dict(type="LocalVisBackend")])
    visualizer.pop("save_dir", None)  # the Runner's default: the run's folder in work_dir
    cfg.merge_from_dict(
        dict(
            work_dir=str(train_cfg.work_dir),
            experiment_name=name,
            randomness=dict(seed=seed, deterministic=False),
            default_scope=scope,
            launcher="none",
            resume=False,
        )
    )
    cfg["visualizer"] = visualizer


def _labeled_dataset(
    dataset: Mapping[str, Any], pool: CocoDetectionPool, ann_file: Path, train_cfg: MMDetTrainConfig
) -> dict[str, Any]:
    """The config's train dataset with its innermost dataset replaced by the labeled set."""
    outer = copy.deepcopy(dict(dataset))
    inner = _innermost(outer)
    if "datasets" in inner:
        raise ValueError(
            "train_mmdet trains on one labeled set: replace the config's "
            f"{inner.get('type')} of several datasets by a single dataset"
        )
    img_dir = str(Path(pool.img_dir).resolve())
    labeled = dict(
        type="CocoDataset",
        data_root=img_dir,
        ann_file=str(ann_file.resolve()),
        data_prefix=dict(img=img_dir),
        metainfo=dict(classes=tuple(pool.classes)),
        filter_cfg=inner.get("filter_cfg"),
        pipeline=list(train_cfg.pipeline) if train_cfg.pipeline is not None else inner["pipeline"],
        backend_args=inner.get("backend_args"),
    )
    inner.clear()
    inner.update(labeled)
    return outer


def _innermost(dataset: dict[str, Any]) -> dict[str, Any]:
    """The dataset config inside the config's wrappers (``RepeatDataset``, ...), in place."""
    while isinstance(dataset.get("dataset"), dict):
        dataset = dataset["dataset"]
    return dataset


def _epoch_items(dataset_cfg: Mapping[str, Any], pool: CocoDetectionPool) -> int:
    """Items per epoch of ``dataset_cfg`` (built once), after checking its label map."""
    from mmdet.registry import DATASETS  # mmdet only where an mmdet config is trained

    probe = copy.deepcopy(dict(dataset_cfg))
    _innermost(probe)["serialize_data"] = False  # mmengine cannot serialize an empty list
    with DefaultScope.overwrite_default_scope("mmdet"), contextlib.redirect_stdout(io.StringIO()):
        dataset = DATASETS.build(probe)  # (pycocotools prints its progress)
    inner = dataset
    while hasattr(inner, "dataset"):
        inner = inner.dataset
    want = {cat: label for label, cat in enumerate(pool.label_to_cat_id)}
    if dict(inner.cat2label) != want:
        raise ValueError(
            f"mmdet's CocoDataset maps category ids to labels as {dict(inner.cat2label)}, but "
            f"the pool's labels are {want}; check the pool's category names"
        )
    if len(dataset) == 0:
        raise ValueError(
            "no labeled image is left after the config's train_dataloader.dataset.filter_cfg "
            f"({inner.filter_cfg}): filter_empty_gt drops images without boxes and min_size "
            "images whose shorter side is smaller; label images with objects or change it"
        )
    return len(dataset)


def _set_hooks(cfg: Config, train_cfg: MMDetTrainConfig, iters_per_epoch: int) -> None:
    """Checkpoint, visualization and logging hooks for a training-only run (the logger's
    interval at most ``iters_per_epoch``)."""
    hooks = dict(cfg.get("default_hooks") or {})
    hooks.pop("visualization", None)  # draws only in validation and test, which are gone
    if train_cfg.save_checkpoint:  # at the end of an epoch- or an iteration-based loop
        by_epoch = "max_iters" not in cfg.train_cfg
        hooks["checkpoint"] = dict(
            type="CheckpointHook",
            by_epoch=by_epoch,
            interval=int(cfg.train_cfg["max_epochs" if by_epoch else "max_iters"]),
            save_optimizer=False,
            save_param_scheduler=False,
            save_last=True,
            max_keep_ckpts=1,
        )
    else:
        hooks["checkpoint"] = None
    logger = dict(hooks.get("logger") or dict(type="LoggerHook"))
    logger["interval"] = max(1, min(int(logger.get("interval", 50)), iters_per_epoch))
    logger.pop("out_dir", None)  # would copy the logs out of work_dir
    hooks["logger"] = logger
    cfg["default_hooks"] = hooks


class _FiniteLossHook(Hook):
    """Stop training at the first non-finite loss, with advice (mmengine goes on silently).

    Args:
        what: the loss's name in the message.
        config: the class whose ``lr`` the message advises to lower.
    """

    def __init__(self, what: str = "detection loss", config: str = "MMDetTrainConfig") -> None:
        self.what, self.config = what, config

    def after_train_iter(
        self,
        runner: Runner,
        batch_idx: int,
        data_batch: Any = None,
        outputs: Mapping[str, Any] | None = None,
    ) -> None:
        values = {k: float(torch.as_tensor(v).detach()) for k, v in (outputs or {}).items()}
        if math.isfinite(values.get("loss", 0.0)):
            return
        parts = {k: round(v, 4) for k, v in values.items()}
        lr = runner.optim_wrapper.get_lr()
        raise FloatingPointError(
            f"the {self.what} became {values['loss']} at iteration {runner.iter + 1} "
            f"(epoch {runner.epoch + 1}, {parts}, lr {lr}); training stopped and the weights are "
            f"no longer finite. Lower {self.config}.lr, lengthen the warm-up in "
            "param_scheduler or clip gradients with optim_wrapper.clip_grad="
            "dict(max_norm=35, norm_type=2)"
        )


def _build_runner(cfg: Config, model: nn.Module | None) -> Runner:
    """``Runner.from_cfg(cfg)``, or the same Runner around the given ``model``."""
    if model is None:
        return Runner.from_cfg(cfg)
    # from_cfg would deep-copy the model along with the config: pass it beside the config
    params = inspect.signature(Runner.__init__).parameters
    kwargs = {k: copy.deepcopy(cfg[k]) for k in params if k in cfg and k not in ("model", "cfg")}
    return Runner(model=model, cfg=copy.deepcopy(cfg), **kwargs)


def _check_no_downloads(cfg: Config, model: nn.Module | None) -> None:
    """Refuse ``load_from`` or initialisation from a URL (``http://``, ``torchvision://``, ...)."""
    load_from = cfg.get("load_from")
    if isinstance(load_from, str) and "://" in load_from:
        raise ValueError(_download_message("load_from", load_from, "load_from"))
    if model is None:
        found = _url_inits(cfg.get("model"), "model")
    else:  # the Runner's init_weights() runs on the modules not yet initialised
        found = []
        for name, module in model.named_modules():
            if not getattr(module, "is_init", True):
                where = f"model.{name}" if name else "model"
                found += _url_inits(getattr(module, "init_cfg", None), f"{where}.init_cfg")
    if found:
        key, url = found[0]
        cut = key.rfind("init_cfg")  # the whole init_cfg, also when it is a list
        setting = key[: cut + len("init_cfg")] if cut >= 0 else key
        raise ValueError(_download_message(key, url, setting))


def _url_inits(node: Any, path: str) -> list[tuple[str, str]]:
    """``(key, url)`` of every ``init_cfg`` checkpoint or ``pretrained`` that is a URL."""
    found: list[tuple[str, str]] = []
    if isinstance(node, Mapping):
        for key, value in node.items():
            here = f"{path}.{key}"
            is_url = isinstance(value, str) and "://" in value
            if is_url and (
                key == "pretrained" or (key == "checkpoint" and node.get("type") == "Pretrained")
            ):
                found.append((here, value))
            else:
                found += _url_inits(value, here)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            found += _url_inits(value, f"{path}[{i}]")
    return found


def _download_message(key: str, url: str, setting: str) -> str:
    return (
        f"the config asks for a download: {key}={url!r}; taskal trains without network "
        f"access. Set {setting}=None (train from scratch) or point it to a local checkpoint "
        "file"
    )


def _check_num_classes(model: nn.Module, num_classes: int) -> None:
    """Every head's ``num_classes`` (the RPN's aside) must be the pool's."""
    for name, module in model.named_modules():
        n = getattr(module, "num_classes", None)
        if is_int(n) and "rpn_head" not in name.split(".") and n != num_classes:
            raise ValueError(
                f"the detector's {name or 'model'} has num_classes={n} but the pool has "
                f"{num_classes} classes; set num_classes={num_classes} in its config"
            )


@contextlib.contextmanager
def _restored_global_rng() -> Iterator[None]:
    """Restore Python's, numpy's and torch's global RNG states on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _close_log_files(runner: Runner) -> None:
    """Close the run's log file (mmengine keeps its logger, and the file, open)."""
    for handler in list(runner.logger.handlers):
        if hasattr(handler, "baseFilename"):
            handler.close()
            runner.logger.removeHandler(handler)


__all__ = [
    "LABELED_ANN_FILE",
    "MMDetTrainConfig",
    "resolve_config",
    "train_mmdet",
    "write_labeled_coco",
]
