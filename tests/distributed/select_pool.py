"""Score a small pool and select with several strategies; rank 0 writes the queries as JSON.

Run by tests/distributed/test_distributed.py in one process and under torchrun:

    python tests/distributed/select_pool.py OUT.json [--cache-dir DIR] [--slow-after N]
    torchrun --standalone --nproc-per-node 2 tests/distributed/select_pool.py OUT.json

``--slow-after N`` sleeps after the pool's N-th batch (for a test that kills the process
while it scores).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from taskal import distributed
from taskal.adapters import ClassificationAdapter
from taskal.data import TensorPool
from taskal.models import SmallCNN
from taskal.selector import Selector
from taskal.types import Batch, ItemId

STRATEGIES = ("entropy", {"type": "bald", "n_samples": 5}, "coreset", "badge", "random")


class SlowPool(TensorPool):
    """A TensorPool that sleeps after ``slow_after`` batches (0: never)."""

    slow_after = 0

    def batches(self, ids: Sequence[ItemId], batch_size: int) -> Iterator[Batch]:
        for n, batch in enumerate(super().batches(ids, batch_size), 1):
            yield batch
            if self.slow_after and n >= self.slow_after:
                time.sleep(60)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--slow-after", type=int, default=0)
    p.add_argument("--strategies", nargs="*", default=None)
    args = p.parse_args()
    distributed.init_from_env()
    torch.manual_seed(0)
    adapter = ClassificationAdapter(SmallCNN(1, 3, width=4), input_shape=(1, 8, 8))
    g = torch.Generator().manual_seed(1)
    n = 45
    pool = SlowPool(
        torch.rand(n, 1, 8, 8, generator=g), None, [f"img_{i:02d}.png" for i in range(n)]
    )
    pool.slow_after = args.slow_after
    labeled = pool.ids[::5]
    result = {}
    specs = {s if isinstance(s, str) else s["type"]: s for s in STRATEGIES}
    for name in args.strategies or specs:
        spec = specs[name]
        cache = None if args.cache_dir is None else args.cache_dir / name
        selector = Selector(spec, batch_size=4, progress=False, cache_dir=cache, distributed=True)
        queries = selector.select(adapter, pool, labeled, 7, torch.Generator().manual_seed(2))
        scores = selector.last_scores
        result[name] = {
            "items": [q.item for q in queries],
            "scores": None if scores is None else scores.tolist(),
        }
    if distributed.is_main():
        args.out.write_text(json.dumps(result))
    distributed.close()


if __name__ == "__main__":
    main()
