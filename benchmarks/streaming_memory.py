"""Peak memory of scoring a segmentation-sized pool: it must not grow with the pool.

Scores pools of 1,000 and 10,000 synthetic 256x256 images with a per-pixel model of 20
classes (the test suite's toy segmenter, ``tests/adapters/toys.py``): 65,536 units per
image, 655 million at 10,000 images. Each pool size runs in its own process so its peak
RSS is its own; the script prints the growth of peak RSS while scoring (above the RSS
after imports and model set-up) and the ratio 10,000 / 1,000. Item queries keep a score
per item; region queries (16x16 patches) keep only the regions that could spend the
budget. For scale, gathering every unit's probabilities on the CPU, as taskal did before
streaming, would hold 65,536 x 20 x 4 B = 5.2 MB per image: 5.2 GB at 1,000 images and
52 GB at 10,000.

    python benchmarks/streaming_memory.py                    # entropy, items and regions
    python benchmarks/streaming_memory.py --sizes 100 1000   # a quicker look
    python benchmarks/streaming_memory.py --adapter fcn --sizes 200 2000 --classes 4

``--adapter fcn`` scores with a real segmentation adapter instead of the toy: torchvision's
FCN on taskal's small CNN (:func:`taskal.segmenters.small_segmenter`, width 16) through
:class:`~taskal.adapters.TorchvisionSegmentationAdapter`, 16x16 patches as regions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


class SyntheticImages:
    """``n`` RGB images generated on demand from their id (nothing is held in memory)."""

    def __init__(self, n: int, size: int) -> None:
        self.ids: list[int | str] = list(range(n))
        self.size = size

    def batches(self, ids: Sequence[int | str], batch_size: int) -> Iterator[object]:
        from taskal.types import Batch

        ids = list(ids)
        for start in range(0, len(ids), batch_size):
            part = ids[start : start + batch_size]
            images = [
                torch.rand(3, self.size, self.size, generator=torch.Generator().manual_seed(int(i)))
                for i in part
            ]
            yield Batch(images, part)


def _toy_pixel_adapter(num_classes: int, patch: int) -> object:
    path = ROOT / "tests" / "adapters" / "toys.py"
    spec = importlib.util.spec_from_file_location("taskal_bench_toys", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.ToyPixelAdapter(num_classes=num_classes, width=8, patch=patch)


def _fcn_adapter(num_classes: int, patch: int) -> object:
    from taskal.adapters import TorchvisionSegmentationAdapter
    from taskal.segmenters import small_segmenter

    torch.manual_seed(0)
    model = small_segmenter(num_classes, arch="fcn", width=16)
    return TorchvisionSegmentationAdapter(model, regions=dict(patch=patch))


def run_variant(
    n: int, query: str, size: int, classes: int, batch_size: int, kind: str = "toy"
) -> dict[str, float]:
    from taskal.selector import Selector

    torch.set_num_threads(2)
    build = _fcn_adapter if kind == "fcn" else _toy_pixel_adapter
    adapter = build(classes, patch=16)
    source = SyntheticImages(n, size)
    selector = Selector("entropy", batch_size=batch_size, progress=False, query=query)
    # warm up the allocator and kernels on a few items so the baseline includes them
    warm = SyntheticImages(batch_size, size)
    warm_budget = 1 if query == "item" else 256.0
    selector.select(adapter, warm, [], warm_budget, torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    picks = min(50, n // 2)
    budget = picks if query == "item" else picks * 256.0  # images, or patches of 16x16
    queries = selector.select(adapter, source, [], budget, torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "n": n,
        "seconds": seconds,
        "growth_mb": (peak - base) / 1024,
        "peak_mb": peak / 1024,
        "queries": len(queries),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs=2, default=[1_000, 10_000])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--query", choices=["item", "region"], nargs="+", default=["item", "region"])
    p.add_argument(
        "--adapter",
        choices=["toy", "fcn"],
        default="toy",
        help="the tests' toy segmenter, or torchvision's FCN on a small CNN",
    )
    p.add_argument(
        "--fixed-mmap-threshold",
        action="store_true",
        help="run with MALLOC_MMAP_THRESHOLD_=65536: glibc then returns every large freed\n"
        "block to the OS, which separates what taskal keeps from heap fragmentation",
    )
    p.add_argument("--variant", nargs=2, help=argparse.SUPPRESS)  # internal: n query
    args = p.parse_args()
    if args.variant:
        n, query = int(args.variant[0]), args.variant[1]
        row = run_variant(n, query, args.image_size, args.classes, args.batch_size, args.adapter)
        print(json.dumps(row))
        return
    small, large = args.sizes
    allocator = "MALLOC_MMAP_THRESHOLD_=65536" if args.fixed_mmap_threshold else "glibc defaults"
    print(
        f"[{allocator}] scoring {small:,} and {large:,} images of "
        f"{args.image_size}x{args.image_size}, {args.classes} classes, entropy, "
        f"batch {args.batch_size}, {args.adapter} adapter; each run in its own process"
    )
    print("| query | items | seconds | peak RSS MB | growth while scoring MB |")
    print("|---|---|---|---|---|")
    for query in args.query:
        rows = {}
        for n in (small, large):
            cmd = [
                sys.executable,
                __file__,
                "--variant",
                str(n),
                query,
                "--image-size",
                str(args.image_size),
                "--classes",
                str(args.classes),
                "--batch-size",
                str(args.batch_size),
                "--adapter",
                args.adapter,
            ]
            env = dict(os.environ)
            if args.fixed_mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = "65536"
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            rows[n] = json.loads(out.strip().splitlines()[-1])
            r = rows[n]
            print(
                f"| {query} | {n:,} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | "
                f"{r['growth_mb']:.1f} |"
            )
        ratio = rows[large]["peak_mb"] / rows[small]["peak_mb"]
        growth = rows[large]["growth_mb"] / max(rows[small]["growth_mb"], 1e-9)
        print(f"| {query} | ratio {large:,} / {small:,} | | {ratio:.3f} | {growth:.2f} |")


if __name__ == "__main__":
    main()
