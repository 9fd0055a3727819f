"""Time of MC dropout on a dense torchvision detector against one deterministic pass.

MC samples of a RetinaNet/FCOS head re-run only ``cls_logits`` on the cached
classification tower; the reference in the same process re-runs the whole
classification head on the cached FPN maps (the adapter's fallback for a tower with
dropout of its own). The script prints seconds and the ratios to one pass (best of
``--repeats``).

    python benchmarks/detection_mc.py                 # small RetinaNet, 16 images 96x96, T=20
    python benchmarks/detection_mc.py --arch fcos --samples 10
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from taskal.adapters import TorchvisionDetectionAdapter
from taskal.detectors import small_detector
from taskal.types import Batch


def _best(adapter: TorchvisionDetectionAdapter, batch: Batch, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        adapter.predict(batch, n_samples=n)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", choices=["retinanet", "fcos"], default="retinanet")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*has no dropout with p > 0")
    torch.manual_seed(0)
    model = small_detector(args.arch, 3, image_size=args.size)
    adapter = TorchvisionDetectionAdapter(model)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, args.size, args.size, generator=g) for _ in range(args.images)]
    batch = Batch(images, [str(i) for i in range(args.images)])
    one = _best(adapter, batch, 1, args.repeats)
    cached = _best(adapter, batch, args.samples, args.repeats)
    adapter._tower = None  # the reference: the whole classification head per sample
    whole = _best(adapter, batch, args.samples, args.repeats)
    print(
        f"{args.arch}, {args.images} images {args.size}x{args.size}, T={args.samples}: "
        f"one pass {one:.3f} s; cached tower {cached:.3f} s ({cached / one:.2f}x one pass); "
        f"whole head {whole:.3f} s ({whole / one:.2f}x); cached / whole {cached / whole:.3f}"
    )


if __name__ == "__main__":
    main()
