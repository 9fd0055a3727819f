"""Cost of writing every scored batch to disk (``Selector(cache_dir=...)``) and of resuming.

Scores a pool of random images with torchvision's ResNet-18 (random weights, no download)
through :class:`~taskal.adapters.ClassificationAdapter` under BALD (MC dropout, T samples
on the cached classifier input) and core-set (512-d embeddings), in one process:

* ``memory``: the pass with results kept in memory only (the reference);
* ``cache``: the same pass writing each batch to a fresh cache folder;
* ``resume``: a pass interrupted after half the batches, then run again on its folder:
  the time of the second run, which loads the first half and scores the rest.

Each line prints seconds (best of ``--repeats``), the ratio to the reference and whether
the queries equal the reference's.

    python benchmarks/scoring_cache.py                  # 512 images 64x64, batch 32
    python benchmarks/scoring_cache.py --items 2048 --size 96
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torchvision
from _common import machine

from taskal.adapters import ClassificationAdapter
from taskal.data import TensorPool
from taskal.selector import Selector
from taskal.types import Batch, ItemId


class Stop(Exception):
    pass


class StoppingPool(TensorPool):
    """Stops (raises) after ``limit`` batches; ``None``: never."""

    limit: int | None = None

    def batches(self, ids: Sequence[ItemId], batch_size: int) -> Iterator[Batch]:
        for n, batch in enumerate(super().batches(ids, batch_size)):
            if self.limit is not None and n >= self.limit:
                raise Stop
            yield batch


def _select(
    selector: Selector, adapter: ClassificationAdapter, pool: StoppingPool, budget: int
) -> list[ItemId]:
    labeled = pool.ids[: len(pool.ids) // 10]
    queries = selector.select(adapter, pool, labeled, budget, torch.Generator().manual_seed(0))
    return [q.item for q in queries]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--items", type=int, default=512)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=20, help="MC samples of BALD")
    p.add_argument("--budget", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*has no dropout with p > 0")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    adapter = ClassificationAdapter(model, input_shape=(3, args.size, args.size))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.items, 3, args.size, args.size, generator=g)
    pool = StoppingPool(images, None, [f"img_{i:06d}" for i in range(args.items)])
    batches = -(-(args.items - args.items // 10) // args.batch_size)
    print(
        f"{machine()}; ResNet-18, {args.items} images {args.size}x{args.size}, batch "
        f"{args.batch_size} ({batches} batches)"
    )
    root = Path(tempfile.mkdtemp(prefix="taskal_cache_bench_"))
    try:
        for spec in ({"type": "bald", "n_samples": args.samples}, "coreset"):
            name = spec if isinstance(spec, str) else spec["type"]
            times: dict[str, list[float]] = {"memory": [], "cache": [], "resume": []}
            picks: dict[str, list[ItemId]] = {}
            for r in range(args.repeats):
                plain = Selector(spec, args.batch_size, progress=False)
                t0 = time.perf_counter()
                picks["memory"] = _select(plain, adapter, pool, args.budget)
                times["memory"].append(time.perf_counter() - t0)
                folder = root / f"{name}_{r}"
                cached = Selector(spec, args.batch_size, progress=False, cache_dir=folder)
                t0 = time.perf_counter()
                picks["cache"] = _select(cached, adapter, pool, args.budget)
                times["cache"].append(time.perf_counter() - t0)
                shutil.rmtree(folder)
                pool.limit = batches // 2
                with contextlib.suppress(Stop):
                    _select(cached, adapter, pool, args.budget)
                pool.limit = None
                t0 = time.perf_counter()
                picks["resume"] = _select(cached, adapter, pool, args.budget)
                times["resume"].append(time.perf_counter() - t0)
            ref = min(times["memory"])
            for kind in ("memory", "cache", "resume"):
                best = min(times[kind])
                same = "same queries" if picks[kind] == picks["memory"] else "OTHER QUERIES"
                print(f"{name:8s} {kind:7s} {best:7.3f} s  {best / ref:5.2f}x memory  {same}")
            size = sum(f.stat().st_size for f in (root / f"{name}_0").rglob("*.pt"))
            print(f"{name:8s} on disk: {size / 1024:.0f} KiB for {batches} batches")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
