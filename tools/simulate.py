"""Simulate multi-round active learning with a ground-truth oracle.

    python tools/simulate.py                                  # digits, the default config
    python tools/simulate.py --strategies entropy badge --num-seeds 2 --rounds 3
    python tools/simulate.py --dataset path/to/images --config configs/cls/image_folder_resnet18.py
    python tools/simulate.py --config configs/det/synthetic_faster_rcnn.py   # detection, COCO mAP
    python tools/simulate.py --task seg      # synthetic medical segmentation, mIoU vs pixels

Writes ``results.json``, ``learning_curve.png``, ``summary.md`` and the resolved
``config.py`` into the output directory (a new timestamped one by default); detection also
writes every round's queries as COCO json into ``queries/``; segmentation with
``al.reference=True`` adds the full-supervision mIoU and each strategy's fraction of it at
5 % and 10 % of the pool's pixels to the summary.

    torchrun --standalone --nproc-per-node 2 tools/simulate.py --strategies entropy bald

Under torchrun every rank runs the simulation and scores its share of each pool pass; rank
0 writes the results. With deterministic training (the CPU) the ranks' models agree and the
results equal a single process's. Classification and torchvision detection with image
queries only: region queries are scored in one process, and mmengine would split an mmdet
model's training data across the ranks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from mmengine.config import DictAction

from taskal import distributed

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = {
    "cls": ROOT / "configs" / "cls" / "digits_smallcnn.py",
    "det": ROOT / "configs" / "det" / "synthetic_faster_rcnn.py",
    "seg": ROOT / "configs" / "seg" / "synthetic_medical_fcn.py",
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--config", help="OpenMMLab-style config file (default: the --task's shipped one)"
    )
    p.add_argument(
        "--task",
        choices=sorted(DEFAULT_CONFIGS),
        help="cls (digits), det (synthetic shapes, COCO mAP) or seg (synthetic medical, mIoU); "
        "default: the config's, else cls",
    )
    p.add_argument("--dataset", help="'digits' or the root of an ImageFolder-layout directory")
    p.add_argument("--image-size", type=int, help="resize images of an image folder to this size")
    p.add_argument("--strategies", nargs="+", help="registered strategy names (random is added)")
    p.add_argument("--initial", type=int, help="initial labeled set size")
    p.add_argument("--budget", type=int, help="labels per round")
    p.add_argument("--rounds", type=int, help="selection rounds")
    p.add_argument("--seeds", type=int, nargs="+", help="explicit seeds, e.g. --seeds 0 1 2")
    p.add_argument("--num-seeds", type=int, help="use seeds 0..N-1")
    p.add_argument("--output-dir", help="where results go (default: work_dirs/simulate/<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace results in --output-dir")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--summarize",
        metavar="DIR",
        help="only rewrite DIR's summary.md and learning_curve.png from its results.json",
    )
    p.add_argument(
        "--cfg-options",
        nargs="+",
        default={},
        metavar="KEY=VALUE",
        action=DictAction,
        help="override config entries, e.g. al.budget=40 train.epochs=10",
    )
    return p


def load_config(args: argparse.Namespace) -> Any:
    from mmengine.config import Config

    if args.config is None:
        args.config = str(DEFAULT_CONFIGS[args.task or "cls"])
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    al = cfg.al
    for key in ("strategies", "initial", "budget", "rounds", "seeds"):
        if getattr(args, key) is not None:
            al[key] = getattr(args, key)
    if args.num_seeds is not None:
        al["seeds"] = list(range(args.num_seeds))
    if args.task is not None:
        if cfg.get("task", args.task) != args.task:
            raise SystemExit(
                f"--task {args.task} contradicts {args.config}, a {cfg.task} config; drop "
                f"--task or pass a {args.task} config"
            )
        cfg.task = args.task
    if args.dataset is not None:
        if args.dataset == "digits":
            cfg.dataset = {"type": "digits"}
        else:
            cfg.dataset = {
                "type": "image_folder",
                "root": args.dataset,
                "image_size": cfg.dataset.get("image_size", 32),
            }
    if args.image_size is not None:
        if cfg.dataset.get("type") != "image_folder":
            raise SystemExit("--image-size applies to an image folder (--dataset PATH) only")
        cfg.dataset["image_size"] = args.image_size
    return cfg


def prepare_output(args: argparse.Namespace) -> Path:
    out = (
        Path(args.output_dir)
        if args.output_dir
        else (ROOT / "work_dirs" / "simulate" / time.strftime("%Y%m%d-%H%M%S"))
    )
    if (out / "results.json").exists() and not args.overwrite:
        raise SystemExit(
            f"{out / 'results.json'} already exists; pick another --output-dir or pass "
            "--overwrite to replace it."
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_detection_split(cfg: Any) -> tuple[Any, Any]:
    """Pool and test split of a detection config's ``dataset`` (synthetic or COCO files)."""
    from taskal.data import ensure_synthetic_detection, load_coco_detection

    spec = dict(cfg.dataset)
    kind = spec.pop("type", None)
    if kind == "synthetic_detection":
        root = Path(spec.pop("root", "work_dirs/data/synthetic_detection"))
        files = ensure_synthetic_detection(root if root.is_absolute() else ROOT / root, **spec)
        data = load_coco_detection(files.ann_file, files.img_dir)
    elif kind == "coco":
        data = load_coco_detection(spec["ann_file"], spec["img_dir"])
    else:
        raise SystemExit(
            f"a det config's dataset.type must be 'synthetic_detection' or 'coco' (with "
            f"ann_file and img_dir), got {kind!r}"
        )
    return _split(data, cfg)


def _split(data: Any, cfg: Any) -> tuple[Any, Any]:
    """A fixed pool / test split of ``data`` (``test_fraction`` of it for testing, seed 0)."""
    import torch

    fraction = float(cfg.get("test_fraction", 0.2))
    n_test = round(fraction * len(data.ids))
    if not 0 < n_test < len(data.ids):
        raise SystemExit(f"test_fraction {fraction} leaves no pool or no test images")
    order = torch.randperm(len(data.ids), generator=torch.Generator().manual_seed(0)).tolist()
    test_ids = sorted(data.ids[i] for i in order[:n_test])
    pool_ids = sorted(data.ids[i] for i in order[n_test:])
    return data.subset(pool_ids), data.subset(test_ids)


def build_segmentation_split(cfg: Any) -> tuple[Any, Any]:
    """Pool and test split of a seg config's ``dataset``: the synthetic medical set (written
    on first use) or an image / mask folder pair (``img_dir``, ``ann_dir``, ``classes``)."""
    from taskal.data import ensure_synthetic_segmentation, load_segmentation_folder

    spec = dict(cfg.dataset)
    kind = spec.pop("type", None)
    if kind == "synthetic_segmentation":
        root = Path(spec.pop("root", "work_dirs/data/synthetic_medical"))
        files = ensure_synthetic_segmentation(root if root.is_absolute() else ROOT / root, **spec)
        classes = json.loads(files.meta_file.read_text())["classes"]
        data = load_segmentation_folder(files.img_dir, files.ann_dir, classes)
    elif kind == "segmentation_folder":
        data = load_segmentation_folder(**spec)
    elif kind in ("synthetic_volumes", "volume_slices"):
        return _volume_split(kind, spec, cfg)
    else:
        raise SystemExit(
            "a seg config's dataset.type must be 'synthetic_segmentation', "
            "'segmentation_folder' (with img_dir, ann_dir and classes), 'synthetic_volumes' or "
            f"'volume_slices' (with image_dir, label_dir, classes and axis), got {kind!r}"
        )
    return _split(data, cfg)


def _volume_split(kind: str, spec: dict[str, Any], cfg: Any) -> tuple[Any, Any]:
    """Slices of NIfTI volumes, split by volume (``test_fraction`` of the scans, seed 0), so
    that neighbouring slices of one scan never sit on both sides."""
    import torch

    from taskal.data import ensure_synthetic_volumes, load_volume_slices

    axis = int(spec.pop("axis", 2))
    if kind == "synthetic_volumes":
        root = Path(spec.pop("root", "work_dirs/data/synthetic_volumes"))
        files = ensure_synthetic_volumes(root if root.is_absolute() else ROOT / root, **spec)
        classes = spec.get("classes", ("background", "liver", "kidney", "lesion"))
        data = load_volume_slices(files.image_dir, files.label_dir, classes, axis=axis)
    else:
        data = load_volume_slices(axis=axis, **spec)
    fraction = float(cfg.get("test_fraction", 0.2))
    n_test = round(fraction * len(data.volumes))
    if not 0 < n_test < len(data.volumes):
        raise SystemExit(f"test_fraction {fraction} leaves no pool or no test scans")
    order = torch.randperm(len(data.volumes), generator=torch.Generator().manual_seed(0))
    test_volumes = {data.volumes[int(i)] for i in order[:n_test]}
    test_ids = [i for i in data.ids if data.volume_of(i) in test_volumes]
    pool_ids = [i for i in data.ids if data.volume_of(i) not in test_volumes]
    return data.subset(pool_ids), data.subset(test_ids)


def model_fields(cfg: Any, lib: str) -> dict[str, Any]:
    """A config's model: a torchvision ``model``, or an OpenMMLab config file
    (``<lib>_config``, e.g. ``mmdet_config``) with its ``<lib>_cfg_options``,
    ``<lib>_train`` and ``work_dir`` (the paths relative to the repository, as
    ``dataset.root``). The task's simulation config checks that exactly one is given."""
    fields: dict[str, Any] = {}
    if cfg.get("model") is not None:
        fields["model"] = dict(cfg.model)
    for key in (f"{lib}_config", "work_dir"):
        if cfg.get(key) is not None:
            path = Path(cfg[key])
            fields[key] = str(path if path.is_absolute() else ROOT / path)
    for key in (f"{lib}_cfg_options", f"{lib}_train"):
        if cfg.get(key) is not None:
            fields[key] = cfg[key].to_dict() if hasattr(cfg[key], "to_dict") else dict(cfg[key])
    return fields


def build_simulation(cfg: Any, progress: bool) -> tuple[Any, Any, Any, str]:
    """The task's simulation, its pool and test split, and its metric's name."""
    from taskal.data import split_pool
    from taskal.registry import DATASETS, build
    from taskal.simulation import (
        DetectionSimulation,
        DetSimulationConfig,
        SegmentationSimulation,
        SegSimulationConfig,
        Simulation,
        SimulationConfig,
    )

    task = cfg.get("task", "cls")
    if task == "det":
        det_cfg = DetSimulationConfig(
            **model_fields(cfg, "mmdet"),
            train=dict(cfg.get("train", {})),
            llal=dict(cfg.get("llal", {})),
            batch_size=cfg.get("batch_size", 8),
            device=cfg.get("device", "cpu"),
            progress=progress,
            **{k: v for k, v in cfg.al.items()},
        )
        pool, test = build_detection_split(cfg)
        return DetectionSimulation(det_cfg, pool, test), pool, test, "mAP"
    if task == "seg":
        seg_cfg = SegSimulationConfig(
            **model_fields(cfg, "mmseg"),
            adapter=dict(cfg.get("adapter", {})),
            train=dict(cfg.get("train", {})),
            llal=dict(cfg.get("llal", {})),
            batch_size=cfg.get("batch_size", 8),
            device=cfg.get("device", "cpu"),
            progress=progress,
            **{k: v for k, v in cfg.al.items()},
        )
        pool, test = build_segmentation_split(cfg)
        return SegmentationSimulation(seg_cfg, pool, test), pool, test, "mIoU"
    sim_cfg = SimulationConfig(
        task=task,
        model=dict(cfg.model),
        adapter=dict(cfg.get("adapter", {"type": "classification"})),
        train=dict(cfg.get("train", {})),
        device=cfg.get("device", "cpu"),
        progress=progress,
        **{k: v for k, v in cfg.al.items()},
    )
    data = build(DATASETS, dict(cfg.dataset))
    pool, test = split_pool(data, cfg.get("test_fraction", 0.25), seed=0)
    return Simulation(sim_cfg, pool, test), pool, test, "accuracy"


def _shown(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (summaries stay portable)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


def join_ranks(cfg: Any) -> bool:
    """Under torchrun, join the process group (every rank runs the whole simulation with the
    same seeds, so the models agree, and scores its share of each pool pass); returns
    whether this process writes the results (rank 0, or the only process)."""
    if not distributed.launched():
        return True
    if cfg.get("task", "cls") == "seg":
        raise SystemExit(
            "simulate.py under torchrun: segmentation simulations rank regions, which one "
            "process scores; run it without torchrun"
        )
    if cfg.get("mmdet_config") is not None:
        raise SystemExit(
            "simulate.py under torchrun: mmengine would split each rank's training data "
            "across the ranks; run mmdet simulations without torchrun"
        )
    distributed.init_from_env()
    return distributed.is_main()


def main(args: argparse.Namespace) -> dict[str, Any]:
    from taskal.registry import import_custom_modules

    if args.summarize:
        summarize_folder(args.summarize)
        return {}
    cfg = load_config(args)
    import_custom_modules(cfg)
    main_rank = join_ranks(cfg)
    sim, pool, test, metric = build_simulation(cfg, progress=main_rank and not args.no_progress)
    if distributed.launched() and "region" in getattr(sim, "query_kinds", {}).values():
        raise SystemExit(
            "simulate.py under torchrun: region queries are scored by one process; drop the "
            "box strategies or run without torchrun"
        )
    if not main_rank:  # torchrun: this rank trains its replica and scores its share
        sim.run()
        distributed.close()
        return {}
    out = prepare_output(args)
    if metric == "mAP":  # detection: every round's queries as the COCO json annotators get
        sim.cfg.queries_dir = str(out / "queries")
    print(
        f"[simulate] {len(pool.ids)} pool / {len(test.ids)} test items; strategies: "
        f"{[name for name, _ in sim.strategies]}; seeds {sim.cfg.seeds}; output {out}",
        file=sys.stderr,
    )
    cfg.dump(str(out / "config.py"))
    started = time.perf_counter()
    results: dict[str, Any] = {
        "task": cfg.get("task", "cls"),
        "metric": metric,
        "config": _shown(args.config),
        "pool_size": len(pool.ids),
        "test_size": len(test.ids),
        "runs": sim.run(),
    }
    if getattr(sim.cfg, "reference", False):  # segmentation: full supervision per seed
        results["reference"] = sim.reference_runs()
        results["pool_cost"] = sim.total_pixels
    results["cost_unit"] = getattr(sim, "cost_unit", None)
    results["seconds"] = round(time.perf_counter() - started)
    distributed.close()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = write_summary(results, out)
    print(table)
    print(
        f"[simulate] wrote {out}/results.json, learning_curve.png, summary.md "
        f"({results['seconds']} s)",
        file=sys.stderr,
    )
    return results


def write_summary(results: dict[str, Any], out: Path) -> str:
    """``summary.md`` and ``learning_curve.png`` of ``results`` in ``out``; returns the
    tables. Deterministic given ``results.json``, so ``--summarize`` rewrites them."""
    from taskal.simulation import format_reference_table, format_table, plot_curves, summarize

    rows = summarize(results)
    table = format_table(rows, results["metric"], cost=results.get("cost_unit"))
    if "reference" in results:
        table += "\n" + format_reference_table(results, results["pool_cost"])
    plot_curves(results, out / "learning_curve.png")
    (out / "summary.md").write_text(
        f"# Simulation summary\n\nconfig: `{results['config']}`; {results['pool_size']} pool / "
        f"{results['test_size']} test items; {results['seconds']:.0f} s in all.\n\n{table}"
    )
    return table


def summarize_folder(folder: str) -> None:
    """Rewrite ``summary.md`` and ``learning_curve.png`` of a finished run from its
    ``results.json`` (runs written before taskal recorded the config, sizes and seconds
    there take them from the old ``summary.md``)."""
    import re

    out = Path(folder)
    if not (out / "results.json").is_file():
        raise SystemExit(f"{out / 'results.json'} does not exist; pass a simulation's output dir")
    results = json.loads((out / "results.json").read_text())
    old = (out / "summary.md").read_text() if (out / "summary.md").is_file() else ""
    found = re.search(r"config: `([^`]*)`; (\d+) pool / (\d+) test items; (\d+) s in all", old)
    if "seconds" not in results:
        if found is None:
            raise SystemExit(f"{out} records no config, sizes or seconds to summarize with")
        results["config"], results["pool_size"] = found[1], int(found[2])
        results["test_size"], results["seconds"] = int(found[3]), int(found[4])
    if "cost_unit" not in results:
        boxes = results["metric"] == "mAP" and "boxes to reach" in old
        results["cost_unit"] = "boxes" if boxes else ("pixels" if "pool_cost" in results else None)
    print(write_summary(results, out))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
