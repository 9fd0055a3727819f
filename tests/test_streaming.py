"""Scores cached on disk batch by batch (``Selector(cache_dir=...)``): an interrupted pass
resumes without scoring again what it finished, and gives the same queries."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from taskal.adapters import ClassificationAdapter
from taskal.data import TensorPool
from taskal.models import SmallCNN
from taskal.selector import Selector
from taskal.streaming import ChunkCache, batch_spans, shard
from taskal.types import Batch, ItemId


class Interrupted(Exception):
    pass


class BreakingPool(TensorPool):
    """Raises after ``limit`` batches (``None``: never), as a killed run stops."""

    limit: int | None = None

    def batches(self, ids: Sequence[ItemId], batch_size: int) -> Iterator[Batch]:
        for n, batch in enumerate(super().batches(ids, batch_size)):
            if self.limit is not None and n >= self.limit:
                raise Interrupted
            yield batch


class CountingAdapter(ClassificationAdapter):
    seen: list[str]

    def predict(self, batch: Batch, n_samples: int = 1, units: object = None) -> object:  # type: ignore[override]
        self.seen.extend(map(str, batch.ids))
        return super().predict(batch, n_samples)


def _adapter(seed: int = 0) -> CountingAdapter:
    torch.manual_seed(seed)
    adapter = CountingAdapter(SmallCNN(1, 3, width=4), input_shape=(1, 8, 8))
    adapter.seen = []
    return adapter


def _pool() -> BreakingPool:
    g = torch.Generator().manual_seed(0)
    return BreakingPool(
        torch.rand(30, 1, 8, 8, generator=g), None, [f"i{i:02d}" for i in range(30)]
    )


def _select(adapter: CountingAdapter, pool: BreakingPool, cache: Path | None) -> list[str]:
    selector = Selector({"type": "bald", "n_samples": 4}, 4, False, cache_dir=cache)
    queries = selector.select(adapter, pool, pool.ids[:6], 5, torch.Generator().manual_seed(3))
    return [str(q.item) for q in queries]


def test_an_interrupted_pass_resumes_where_it_stopped(tmp_path: Path) -> None:
    pool = _pool()
    expected = _select(_adapter(), pool, None)
    adapter = _adapter()
    pool.limit = 2
    with pytest.raises(Interrupted):
        _select(adapter, pool, tmp_path)
    assert adapter.seen == pool.ids[6:14]  # two batches of four, written to disk
    pool.limit = None
    adapter.seen = []
    assert _select(adapter, pool, tmp_path) == expected
    assert adapter.seen == pool.ids[14:]  # only what was left
    adapter.seen = []
    assert _select(adapter, pool, tmp_path) == expected  # all cached: no forward at all
    assert adapter.seen == []


def test_another_model_clears_the_cache(tmp_path: Path) -> None:
    pool = _pool()
    _select(_adapter(0), pool, tmp_path)
    other = _adapter(1)
    with pytest.warns(UserWarning, match="of another run"):
        queries = _select(other, pool, tmp_path)
    assert other.seen == pool.ids[6:]
    assert queries == _select(_adapter(1), pool, None)


def test_a_damaged_batch_file_is_scored_again(tmp_path: Path) -> None:
    pool = _pool()
    expected = _select(_adapter(), pool, tmp_path)
    (tmp_path / "pool" / "0000002.pt").write_bytes(b"not a tensor file")
    adapter = _adapter()
    assert _select(adapter, pool, tmp_path) == expected
    assert adapter.seen == pool.ids[14:18]


def test_region_queries_take_no_cache(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cache_dir"):
        Selector("entropy", query="region", cache_dir=tmp_path)


def test_batches_and_shards() -> None:
    assert batch_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_spans(0, 4) == []
    assert [shard(5, r, 2) for r in (0, 1)] == [[0, 2, 4], [1, 3]]
    cache = ChunkCache(Path("unused"), {"a": 1})
    assert cache.fingerprint == {"a": 1}


def test_the_fingerprint_holds_every_strategy_and_adapter_setting() -> None:
    pool = _pool()
    adapter = _adapter()

    def fingerprint(spec: object, key: str | None = None) -> dict[str, object]:
        selector = Selector(spec, 4, False, cache_dir="unused", cache_key=key)  # type: ignore[arg-type]
        return selector._fingerprint(adapter, pool.ids[6:], pool.ids[:6], 0)

    base = {"type": "entropy", "reduction": "topk_mean", "top_k": 3}
    assert fingerprint(base) == fingerprint(dict(base))
    assert fingerprint(base) != fingerprint({**base, "top_k": 10})
    assert fingerprint(base) != fingerprint(base, key="another config")
    before = fingerprint(base)
    adapter.dropout_p = 0.05
    assert fingerprint(base) != before
