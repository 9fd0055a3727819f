"""Scoring throughput (images/s) of every single-pass strategy against plain inference.

One model per task, random weights (nothing downloaded), a small in-memory pool of random
images (:class:`taskal.data.TensorPool`), everything measured in the same process:

* ``cls``: torchvision's ResNet-18, ``--cls-size`` square images;
* ``seg``: torchvision's DeepLabV3 on MobileNetV3-Large, 21 classes, ``--seg-size``
  (pixel units: 65,536 per 256x256 image);
* ``det``: torchvision's Faster R-CNN on taskal's small backbone
  (:func:`taskal.detectors.small_detector`, softmax boxes, so BADGE applies).

Plain inference is the adapter's ``predict`` over the pool's batches with nothing scored
(and, for scale, the model's own forward: ``model(x)`` for the classifier and the segmenter,
``model(images)`` with torchvision's post-processing for the detector). A strategy's
throughput is ``Selector(strategy, batch_size=..., progress=False).stream(adapter, pool,
ids)``: the predictions and what the strategy reduces them to, item by item.

The single-pass strategies are the registered ones whose scoring needs one deterministic
pass per batch; the script walks :data:`taskal.registry.QUERY_STRATEGIES` and says why it
leaves each of the others out (MC dropout and ensembles sample several passes, LLAL needs a
trained loss predictor, region-only strategies rank regions, composites need their parts).
``coreset`` streams the adapter's ``embed``; ``badge`` and ``two_stage`` (entropy, then
core-set) stream ``predict_and_embed``: one forward for a classifier, ``predict`` then
``embed`` (two passes) where the adapter does not override it; ``difficulty_calibrated``
runs with a uniform ``adapter.class_quality`` of 0.5 (it is measured after training in real
use). Throughput is the best of ``--repeats`` runs, each alternating with a plain run, and
its ratio is to the best of those alternating plain runs (same number of tries, same
moments), so that load from other processes hits both alike; the plain figure printed first
is the best of all; torch runs on ``--threads`` threads (1 by default: steadier timings on a
shared machine).

    python benchmarks/throughput.py                   # cls, seg and det
    python benchmarks/throughput.py --tasks cls --pool 128 --batch-size 32
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from _common import best_of, machine

from taskal.data import TensorPool
from taskal.registry import QUERY_STRATEGIES
from taskal.selector import Selector, build_strategy
from taskal.strategies.base import QueryStrategy
from taskal.types import Adapter

#: what a single deterministic pass (predict, or embed) can gather.
ONE_PASS = frozenset({"probs", "item_probs", "item_class", "class_quality"})


def build_task(task: str, args: argparse.Namespace) -> tuple[Adapter, TensorPool, Callable]:
    """The adapter, the pool, and the model's own forward on one batch."""
    g = torch.Generator().manual_seed(0)
    if task == "cls":
        from taskal.adapters import ClassificationAdapter
        from taskal.models import torchvision_classifier

        size = args.cls_size
        model: Any = torchvision_classifier("resnet18", num_classes=10)
        adapter: Adapter = ClassificationAdapter(model, input_shape=(3, size, size))
        forward: Callable = lambda b: model(b.inputs)  # noqa: E731
    elif task == "seg":
        from taskal.adapters import TorchvisionSegmentationAdapter
        from taskal.adapters.torchvision_segmentation import torchvision_segmenter

        size = args.seg_size
        model = torchvision_segmenter("deeplabv3_mobilenet_v3_large", num_classes=21)
        seg = TorchvisionSegmentationAdapter(model)
        adapter = seg
        forward = lambda b: model(seg.preprocess(b.inputs)[0])["out"]  # noqa: E731
    elif task == "det":
        from taskal.adapters import TorchvisionDetectionAdapter
        from taskal.detectors import small_detector

        size = args.det_size
        model = small_detector("faster_rcnn", 4, image_size=size, width=32, fpn_channels=128)
        adapter = TorchvisionDetectionAdapter(model)
        forward = lambda b: model(list(b.inputs))  # noqa: E731
    else:
        raise SystemExit(f"unknown task {task!r}")
    model.eval()
    # difficulty_calibrated reads it, one value per foreground class (measured after
    # training in real use)
    foreground = adapter.num_classes - (getattr(adapter, "background", None) is not None)
    setattr(adapter, "class_quality", torch.full((foreground,), 0.5))  # noqa: B010
    pool = TensorPool(torch.rand(args.pool, 3, size, size, generator=g))
    return adapter, pool, forward


def single_pass_strategies() -> tuple[dict[str, QueryStrategy], dict[str, str]]:
    """Registered strategies that score with deterministic passes (built with their
    defaults), and why each other registered name is left out."""
    QUERY_STRATEGIES.import_from_location()
    kept: dict[str, QueryStrategy] = {}
    left: dict[str, str] = {}
    seen: dict[type, str] = {}
    for name, cls in QUERY_STRATEGIES.module_dict.items():  # registration order: aliases last
        if cls in seen:
            left[name] = f"an alias of {seen[cls]}"
            continue
        seen[cls] = name
        try:
            strategy = build_strategy(name)
        except (TypeError, ValueError) as err:
            left[name] = f"needs configuration ({type(err).__name__}: {str(err)[:60]}...)"
            continue
        needs = strategy.needs
        if strategy.sampling != "deterministic":
            left[name] = f"samples several passes ({strategy.sampling})"
        elif "item" not in strategy.query_kinds:
            left[name] = "ranks regions only (region queries)"
        elif "loss_pred" in needs:
            left[name] = "needs a trained loss predictor (adapter.predict_loss)"
        elif not needs:
            left[name] = "needs no model pass (no scoring to time)"
        elif needs <= ONE_PASS | {"embeddings", "labeled_embeddings"}:
            kept[name] = strategy
        else:
            left[name] = f"needs {sorted(needs)}"
    return dict(sorted(kept.items())), dict(sorted(left.items()))


def _calls(strategy: QueryStrategy) -> list[str]:
    needs = strategy.needs
    predicts = bool(needs & {"probs", "item_probs", "item_class"})
    if predicts and "embeddings" in needs:
        return ["predict_and_embed"]  # one forward where the adapter overrides it
    return ["predict"] if predicts else ["embed"]


def run_task(task: str, args: argparse.Namespace, strategies: dict[str, QueryStrategy]) -> None:
    """Plain inference, then every strategy's stream, over one task's pool."""
    adapter, pool, forward = build_task(task, args)
    ids, n = pool.ids, len(pool)

    def plain() -> None:
        for batch in pool.batches(ids, args.batch_size):
            adapter.predict(batch.without_labels())

    def model_forward() -> None:
        with torch.no_grad():
            for batch in pool.batches(ids, args.batch_size):
                forward(batch)

    plain()  # warm-up
    plain_times = [best_of(plain, args.repeats)]
    raw = n / best_of(model_forward, args.repeats)
    results: list[tuple[str, QueryStrategy, float | None, float | None, str]] = []
    for name, strategy in strategies.items():
        selector = Selector(strategy, batch_size=args.batch_size, progress=False)
        times, paired = [], []
        try:
            for _ in range(args.repeats):  # plain and strategy alternate: drift hits both
                paired.append(best_of(plain, 1))
                start = time.perf_counter()
                selector.stream(adapter, pool, ids)
                times.append(time.perf_counter() - start)
        except ValueError as err:
            results.append((name, strategy, None, None, str(err)))
            continue
        plain_times += paired
        results.append((name, strategy, n / min(times), n / min(paired), ""))
    base = n / min(plain_times)
    runs = len(plain_times) - 1 + args.repeats
    print(
        f"\n{task}: plain predict {base:.2f} images/s (best of {runs}); model forward alone "
        f"{raw:.2f} images/s (predict / forward {base / raw:.3f})",
        flush=True,
    )
    for name, strategy, rate, pair, why in results:
        if rate is None or pair is None:
            print(f"  {name:<22} skipped: {why[:90]}", flush=True)
            continue
        calls = _calls(strategy)
        print(
            f"  {name:<22} {rate:8.2f} images/s   {rate / pair:6.3f} x plain predict "
            f"({pair:.2f} images/s in the runs alternating with it)   "
            f"({' + '.join(calls)})",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    tasks = ["cls", "seg", "det"]
    p.add_argument("--tasks", nargs="+", choices=tasks, default=tasks)
    p.add_argument("--pool", type=int, default=32, help="images in the pool")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cls-size", type=int, default=224)
    p.add_argument("--seg-size", type=int, default=256)
    p.add_argument("--det-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*has no dropout with p > 0")
    strategies, left = single_pass_strategies()
    print(machine())
    print(
        f"pool {args.pool} random images, batch size {args.batch_size}, best of "
        f"{args.repeats}; single-pass strategies: {', '.join(strategies)}"
    )
    for name, why in left.items():
        print(f"  left out: {name}: {why}")
    for task in args.tasks:
        torch.manual_seed(0)
        run_task(task, args, strategies)


if __name__ == "__main__":
    main()
