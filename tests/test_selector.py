"""The selector over a real adapter and pool, for every registered strategy."""

from __future__ import annotations

import pytest
import torch

from taskal.adapters import ClassificationAdapter, EnsembleAdapter
from taskal.data import TensorPool
from taskal.llal import LossPredictionModule
from taskal.models import SmallCNN
from taskal.queries import LabelState
from taskal.selector import Selector, build_strategy
from taskal.types import Adapter, Batch, Predictions, Units

from .strategies.template import item_query_names


def _adapter(seed: int = 0) -> ClassificationAdapter:
    torch.manual_seed(seed)
    adapter = ClassificationAdapter(SmallCNN(1, 3, width=4), input_shape=(1, 8, 8))
    adapter.attach_loss_predictor(LossPredictionModule(adapter.feature_info, hidden=8))
    adapter.class_quality = torch.tensor([0.9, 0.5, 0.1])  # difficulty_calibrated reads it
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


@pytest.mark.parametrize("name", item_query_names())
def test_never_returns_labeled_or_duplicates(name: str, pool: TensorPool) -> None:
    labeled = pool.ids[::3]
    queries = Selector(name, batch_size=7, progress=False).select(
        _adapter_for(name), pool, labeled, 8, torch.Generator().manual_seed(0)
    )
    assert all(q.region is None and q.cost == 1.0 for q in queries)
    picks = [q.item for q in queries]
    assert len(picks) == 8 and len(set(picks)) == 8
    assert not set(picks) & set(labeled)
    assert set(picks) <= set(pool.ids)


@pytest.mark.parametrize("name", item_query_names())
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


class _SpyAdapter(ClassificationAdapter):
    """Records every batch the selector hands it."""

    seen: list[Batch]

    def predict(self, batch: Batch, n_samples: int = 1, units: Units | None = None) -> Predictions:
        self.seen.append(batch)
        return super().predict(batch, n_samples, units)

    def embed(self, batch: Batch) -> torch.Tensor:
        self.seen.append(batch)
        return super().embed(batch)

    def predict_loss(self, batch: Batch) -> torch.Tensor:
        self.seen.append(batch)
        return super().predict_loss(batch)


@pytest.mark.parametrize("name", ["entropy", "bald", "coreset", "badge", "llal", "hybrid"])
def test_labels_never_reach_the_adapter(name: str, pool: TensorPool) -> None:
    """Defect 1: the pool's ground truth is stripped before any adapter call."""
    assert pool.targets is not None
    torch.manual_seed(0)
    adapter = _SpyAdapter(SmallCNN(1, 3, width=4), input_shape=(1, 8, 8))
    adapter.attach_loss_predictor(LossPredictionModule(adapter.feature_info, hidden=8))
    adapter.seen = []
    Selector(name, batch_size=8, progress=False).select(adapter, pool, pool.ids[:4], 3)
    assert adapter.seen, "the adapter was called"
    assert all(b.targets is None for b in adapter.seen)


def test_without_labels_strips_data_samples() -> None:
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData, PixelData
    from mmseg.structures import SegDataSample

    sample = DetDataSample(metainfo={"img_shape": (8, 8), "img_id": 3})
    sample.gt_instances = InstanceData(bboxes=torch.rand(2, 4), labels=torch.tensor([0, 1]))
    seg = SegDataSample(metainfo={"img_shape": (6, 9), "seg_map_path": "gt/a.png"})
    seg.gt_sem_seg = PixelData(data=torch.zeros(1, 6, 9))
    plain = {"boxes": torch.rand(1, 4), "labels": torch.tensor([1]), "label": 3, "image_id": 5}
    images = [torch.rand(3, 8, 8), torch.rand(3, 6, 9), torch.rand(3, 5, 5)]
    batch = Batch(images, ["a", "b", "c"], None, [sample, seg, plain])
    clean = batch.without_labels()
    assert clean.data_samples is not None
    stripped, stripped_seg, stripped_plain = clean.data_samples
    assert "gt_instances" not in stripped and stripped.metainfo["img_id"] == 3
    assert "gt_sem_seg" not in stripped_seg and "seg_map_path" not in stripped_seg.metainfo
    assert stripped_seg.metainfo["img_shape"] == (6, 9)
    assert stripped_plain == {"image_id": 5}
    assert "gt_instances" in sample, "the original sample is untouched"
    kept = batch.without_labels(keep={"seg_map_path"}).data_samples
    assert kept is not None and kept[1].metainfo == {"seg_map_path": "gt/a.png"}


class _CountingAdapter(ClassificationAdapter):
    calls: list[int]

    def predict(self, batch: Batch, n_samples: int = 1, units: Units | None = None) -> Predictions:
        self.calls.append(n_samples)
        return super().predict(batch, n_samples, units)


@pytest.mark.parametrize(
    "cfg",
    [
        {"type": "entropy", "n_samples": 20},
        {"type": "margin", "n_samples": 20},
        {"type": "two_stage", "first": {"type": "least_confidence", "n_samples": 20}},
    ],
)
def test_n_samples_reaches_the_adapter(cfg: dict, pool: TensorPool) -> None:  # type: ignore[type-arg]
    """Defect 2: the MC samples a strategy asks for are the samples the adapter draws."""
    torch.manual_seed(0)
    adapter = _CountingAdapter(SmallCNN(1, 3, width=4), input_shape=(1, 8, 8))
    adapter.calls = []
    Selector(cfg, batch_size=16, progress=False).select(adapter, pool, [], 3)
    assert adapter.calls == [20, 20]


def test_no_generator_is_reproducible_and_leaves_global_rng(pool: TensorPool) -> None:
    """Defect 7: generator=None neither draws from nor depends on the global RNG."""
    adapter = _adapter()
    torch.manual_seed(7)
    expected = torch.rand(3)
    runs = []
    for global_seed in (7, 8):
        torch.manual_seed(global_seed)
        runs.append(Selector("random", progress=False).select(adapter, pool, [], 5))
        if global_seed == 7:
            assert torch.equal(torch.rand(3), expected)
    assert runs[0] == runs[1]


def test_partially_labeled_items_are_not_item_candidates(pool: TensorPool) -> None:
    state = LabelState(full=set(pool.ids[:10]), partial={pool.ids[10]: {0}})
    queries = Selector("random", progress=False).select(_adapter(), pool, state, 19)
    assert {q.item for q in queries} == set(pool.ids[11:])
