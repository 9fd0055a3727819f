"""The selector over a real adapter and pool, for every registered strategy."""

from __future__ import annotations

import pytest
import torch

from taskal.adapters import ClassificationAdapter, EnsembleAdapter
from taskal.data import TensorPool
from taskal.llal import LossPredictionModule
from taskal.models import SmallCNN
from taskal.selector import Selector, build_strategy
from taskal.types import Adapter

from .strategies.template import registered_names


def _adapter(seed: int = 0) -> ClassificationAdapter:
    torch.manual_seed(seed)
    adapter = ClassificationAdapter(SmallCNN(1, 3, width=4), input_shape=(1, 8, 8))
    adapter.attach_loss_predictor(LossPredictionModule(adapter.feature_info, hidden=8))
    return adapter


def _adapter_for(name: str) -> Adapter:
    if build_strategy(name).sampling == "ensemble":
        return EnsembleAdapter([_adapter(s) for s in range(3)])
    return _adapter()


@pytest.fixture
def pool() -> TensorPool:
    g = torch.Generator().manual_seed(0)
    n = 30
    return TensorPool(
        torch.rand(n, 1, 8, 8, generator=g),
        torch.arange(n) % 3,
        [f"img_{i:02d}.png" for i in range(n)],
    )


@pytest.mark.parametrize("name", registered_names())
def test_never_returns_labeled_or_duplicates(name: str, pool: TensorPool) -> None:
    labeled = pool.ids[::3]
    picks = Selector(name, batch_size=7, progress=False).select(
        _adapter_for(name), pool, labeled, 8, torch.Generator().manual_seed(0)
    )
    assert len(picks) == 8 and len(set(picks)) == 8
    assert not set(picks) & set(labeled)
    assert set(picks) <= set(pool.ids)


@pytest.mark.parametrize("name", registered_names())
def test_same_seed_same_ids(name: str, pool: TensorPool) -> None:
    """The generator alone decides: the global RNG state (MC-dropout masks) does not."""
    adapter = _adapter_for(name)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(
            Selector(name, progress=False).select(
                adapter, pool, pool.ids[:5], 6, torch.Generator().manual_seed(4)
            )
        )
    assert runs[0] == runs[1]


def test_selection_leaves_global_rng_alone(pool: TensorPool) -> None:
    adapter = _adapter()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    Selector("bald", progress=False).select(adapter, pool, [], 3, torch.Generator())
    assert torch.equal(torch.rand(3), expected)


def test_budget_larger_than_pool(pool: TensorPool) -> None:
    with pytest.raises(ValueError, match="larger than the unlabeled pool \\(20 items\\)"):
        Selector("entropy", progress=False).select(_adapter(), pool, pool.ids[:10], 21)


def test_empty_pool(pool: TensorPool) -> None:
    with pytest.raises(ValueError, match="pool is empty"):
        Selector("entropy", progress=False).select(_adapter(), pool, pool.ids, 1)


def test_unknown_labeled_id(pool: TensorPool) -> None:
    with pytest.raises(KeyError, match="not in the pool"):
        Selector("random", progress=False).select(_adapter(), pool, ["nope.png"], 1)


def test_ensemble_strategy_needs_ensemble(pool: TensorPool) -> None:
    with pytest.raises(ValueError, match="EnsembleAdapter"):
        Selector("vote_entropy", progress=False).select(_adapter(), pool, [], 2)


def test_llal_needs_loss_predictor(pool: TensorPool) -> None:
    torch.manual_seed(0)
    bare = ClassificationAdapter(SmallCNN(1, 3, width=4), input_shape=(1, 8, 8))
    with pytest.raises(RuntimeError, match="no loss predictor"):
        Selector("llal", progress=False).select(bare, pool, [], 2)


def test_nan_model_output_is_reported(pool: TensorPool) -> None:
    adapter = _adapter()
    with torch.no_grad():
        adapter.model.fc.weight.fill_(float("nan"))  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="NaN"):
        Selector("entropy", progress=False).select(adapter, pool, [], 2)
