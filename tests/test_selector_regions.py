"""Selection over the toy box and per-pixel adapters: region queries with costs, partial
labels, sigmoid heads, ensembles whose members score the same boxes, and the bounded
region buffer."""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Iterator, Sequence

import pytest
import torch

from taskal.adapters import EnsembleAdapter
from taskal.queries import LabelState
from taskal.regions import RegionBuffer
from taskal.selector import Selector
from taskal.types import Batch, ItemId, Predictions, Units

from .adapters.toys import ToyBoxAdapter, ToyPixelAdapter


class ImageList:
    """Differently sized images with ground truth in dict data samples."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids: list[ItemId] = [f"scan_{i:02d}.png" for i in range(n)]
        self.images = {}
        self.samples = {}
        for i, item in enumerate(self.ids):
            h, w = 12 + 4 * (i % 3), 16 - 4 * (i % 2)
            self.images[item] = torch.rand(3, h, w, generator=g)
            self.samples[item] = {
                "gt_sem_seg": torch.randint(0, 3, (h, w), generator=g),
                "boxes": torch.tensor([[1.0, 1.0, 6.0, 6.0]]),
                "labels": torch.tensor([0]),
                "img_shape": (h, w),
            }

    def batches(self, ids: Sequence[ItemId], batch_size: int) -> Iterator[Batch]:
        ids = list(ids)
        for start in range(0, len(ids), batch_size):
            part = ids[start : start + batch_size]
            yield Batch(
                [self.images[i] for i in part], part, None, [dict(self.samples[i]) for i in part]
            )


def _pixel() -> ToyPixelAdapter:
    torch.manual_seed(0)
    return ToyPixelAdapter(num_classes=3, width=4, patch=4)


def _box(kind: str = "softmax", seed: int = 0) -> ToyBoxAdapter:
    torch.manual_seed(seed)
    return ToyBoxAdapter(num_classes=1 if kind == "sigmoid" else 2, kind=kind, score_thr=0.0)


@pytest.mark.parametrize("name", ["entropy", "margin", "random", {"type": "bald", "n_samples": 3}])
def test_patch_queries_fit_the_pixel_budget(name: object) -> None:
    source = ImageList(6)
    selector = Selector(name, batch_size=4, progress=False, query="region")  # type: ignore[arg-type]
    queries = selector.select(_pixel(), source, [], 100.0, torch.Generator().manual_seed(0))
    assert queries and sum(q.cost for q in queries) <= 100.0
    assert all(q.region is not None and q.cost <= 16 for q in queries)
    assert len({(q.item, q.region) for q in queries}) == len(queries)
    scores = [q.score for q in queries]
    if name != "random":
        assert scores == sorted(scores, reverse=True)


def test_region_queries_skip_labeled_regions_and_full_items() -> None:
    source = ImageList(5)
    adapter = _pixel()
    selector = Selector("entropy", batch_size=2, progress=False, query="region")
    state = LabelState(full={source.ids[0]})
    first = selector.select(adapter, source, state, 64.0)
    state.add(first)
    second = selector.select(adapter, source, state, 64.0)
    assert not {(q.item, q.region) for q in first} & {(q.item, q.region) for q in second}
    assert source.ids[0] not in {q.item for q in first + second}
    assert state.partial and all(state.regions_of(q.item) for q in first)


def test_box_regions_are_the_boxes() -> None:
    source = ImageList(4)
    adapter = _box()
    queries = Selector("entropy", progress=False, query="region").select(adapter, source, [], 5.0)
    assert len(queries) == 5 and all(q.cost == 1.0 for q in queries)
    batch = next(source.batches([queries[0].item], 1))
    pred = adapter.predict(batch)
    boxes = {tuple(b) for b in pred.boxes_U4.tolist()}  # type: ignore[union-attr]
    assert queries[0].box is not None and tuple(queries[0].box) in boxes


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("name", ["entropy", "least_confidence", {"type": "bald", "n_samples": 4}])
def test_item_queries_over_boxes(kind: str, name: object) -> None:
    source = ImageList(7)
    queries = Selector(
        name, batch_size=3, progress=False
    ).select(  # type: ignore[arg-type]
        _box(kind), source, source.ids[:2], 3, torch.Generator().manual_seed(1)
    )
    assert len({q.item for q in queries}) == 3 and not {q.item for q in queries} & set(
        source.ids[:2]
    )


def test_ensemble_of_detectors_scores_one_set_of_boxes() -> None:
    source = ImageList(4)
    ensemble = EnsembleAdapter([_box(seed=s) for s in range(3)])
    queries = Selector("ensemble_kl", progress=False, query="region").select(
        ensemble, source, [], 4.0
    )
    assert len(queries) == 4 and all(q.score >= 0 for q in queries)


def test_region_budget_larger_than_the_pool() -> None:
    source = ImageList(2)
    with pytest.raises(ValueError, match="larger than the unlabeled regions' total cost"):
        Selector("entropy", progress=False, query="region").select(_pixel(), source, [], 1e6)


@pytest.mark.parametrize("name", ["coreset", "badge", "llal", "hybrid"])
def test_strategies_without_unit_scores_refuse_region_queries(name: str) -> None:
    with pytest.raises(ValueError, match="cannot rank regions"):
        Selector(name, query="region")


def test_unknown_query_kind() -> None:
    with pytest.raises(ValueError, match="unknown query kind 'pixels'"):
        Selector("entropy", query="pixels")


def test_badge_averages_box_units_when_every_image_has_some() -> None:
    """A softmax head without a background column: fine while every image has boxes (an
    image without any is refused, tests/test_detection_selection.py)."""
    queries = Selector("badge", progress=False).select(_box(), ImageList(4), [], 2)
    assert len({q.item for q in queries}) == 2


def test_region_buffer_keeps_only_what_the_budget_can_spend() -> None:
    g = torch.Generator().manual_seed(0)
    buffer = RegionBuffer(budget=5.0)  # keeps regions worth twice the budget
    for _ in range(50):
        n = 100
        buffer.push(
            torch.rand(n, generator=g),
            torch.randint(0, 1000, (n,), generator=g),
            torch.arange(n),
            torch.full((n,), 2.0),
            torch.full((n, 4), float("nan")),
            g,
        )
        assert len(buffer.score) <= 6  # 5 regions of cost 2 reach 10, one more at most
    assert buffer.total_cost == 50 * 100 * 2.0
    assert bool((buffer.score[buffer.order()].diff() <= 0).all())


def test_regions_dearer_than_the_budget_are_never_kept() -> None:
    g = torch.Generator().manual_seed(0)
    buffer = RegionBuffer(budget=10.0)
    cost = torch.tensor([50.0, 50.0, 4.0, 4.0, 4.0])
    score = torch.tensor([9.0, 8.0, 1.0, 0.5, 0.2])
    buffer.push(score, torch.arange(5), torch.zeros(5), cost, torch.zeros(5, 4), g)
    assert buffer.affordable == 3 and buffer.cost.tolist() == [4.0, 4.0, 4.0]


def test_budget_below_every_region_cost_is_an_error() -> None:
    torch.manual_seed(0)
    adapter = ToyPixelAdapter(num_classes=3, width=4, patch=16)  # one region per image
    with pytest.raises(ValueError, match="every unlabeled region costs more than the budget"):
        Selector("entropy", progress=False, query="region").select(adapter, ImageList(3), [], 40.0)


class _TwoRegions:
    """One item: region 0 holds 50 units, region 1 holds one; each region costs 1."""

    def __init__(self) -> None:
        self.ids: list[ItemId] = ["only"]

    def batches(self, ids: Sequence[ItemId], batch_size: int) -> Iterator[Batch]:
        yield Batch(torch.zeros(1, 1, 2, 2), list(ids))

    def predict(self, batch: Batch, n_samples: int = 1, units: Units | None = None) -> Predictions:
        region = torch.tensor([0] * 50 + [1])
        cost = torch.where(region == 0, 1 / 50, 1.0)
        probs = torch.full((51, 2, n_samples), 0.5)
        return Predictions(probs, torch.zeros(51, dtype=torch.long), region_U=region, cost_U=cost)


def test_random_regions_are_uniform_whatever_their_size() -> None:
    source = _TwoRegions()
    selector = Selector("random", progress=False, query="region")
    picks = [
        selector.select(source, source, [], 1.0, torch.Generator().manual_seed(seed))[0].region  # type: ignore[arg-type]
        for seed in range(200)
    ]
    assert 70 <= picks.count(1) <= 130  # the one-unit region about half the time


def test_a_source_that_reorders_ids_is_refused() -> None:
    class Shuffled(ImageList):
        def batches(self, ids: Sequence[ItemId], batch_size: int) -> Iterator[Batch]:
            yield from super().batches(list(ids)[::-1], batch_size)

    with pytest.raises(ValueError, match="out of order"):
        Selector("entropy", progress=False).select(_pixel(), Shuffled(4), [], 1)


class _WatchedPixels(ToyPixelAdapter):
    """Fails if a previous batch's per-pixel probabilities are still alive."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(num_classes=3, width=4, patch=4)
        self.alive: list[weakref.ref[torch.Tensor]] = []
        self.batches = 0

    def predict(self, batch: Batch, n_samples: int = 1, units: Units | None = None) -> Predictions:
        gc.collect()
        assert all(ref() is None for ref in self.alive), "a batch's unit tensors outlived it"
        pred = super().predict(batch, n_samples, units)
        self.alive = [weakref.ref(pred.probs_UCK), weakref.ref(pred.owner_U)]
        self.batches += 1
        return pred


@pytest.mark.parametrize("query, budget", [("item", 2), ("region", 64.0)])
def test_streaming_keeps_one_batch_of_units_alive(query: str, budget: float) -> None:
    """Per-pixel tensors live for one batch: what the selector keeps is per item or region."""
    adapter = _WatchedPixels()
    Selector("entropy", batch_size=2, progress=False, query=query).select(
        adapter, ImageList(7), [], budget
    )
    assert adapter.batches == 4


def test_topk_mean_is_an_item_reduction() -> None:
    with pytest.raises(ValueError, match="region queries reduce a region's units"):
        Selector({"type": "entropy", "reduction": "topk_mean"}, query="region")
    queries = Selector(
        {"type": "entropy", "reduction": "topk_mean", "top_k": 2}, progress=False
    ).select(_box(), ImageList(5), [], 2)
    assert len(queries) == 2


def test_labeled_boxes_are_recognised_by_overlap_not_by_index() -> None:
    """A retrained detector renumbers its boxes: a labeled box is matched by IoU."""
    from taskal.queries import Query
    from taskal.regions import unlabeled_regions

    state = LabelState()
    state.add([Query("img", region=0, box=(0.0, 0.0, 10.0, 10.0))])
    owner = torch.tensor([0, 0, 0])
    region = torch.tensor([0, 1, 2])  # the labeled box now comes second
    boxes = torch.tensor(
        [[40.0, 40.0, 50.0, 50.0], [0.5, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 4.0]],
        dtype=torch.float64,
    )
    keep = unlabeled_regions(owner, region, 0, ["img"], state, boxes)
    assert keep.tolist() == [True, False, True]
    # regions without boxes (patches) still go by their index
    patches = torch.full((3, 4), float("nan"), dtype=torch.float64)
    assert unlabeled_regions(owner, region, 0, ["img"], state, patches).tolist() == [
        False,
        True,
        True,
    ]


def test_boxes_without_area_are_never_queried() -> None:
    """A detection clipped flat at the border has nothing to show an annotator."""

    class FlatBoxes(ToyBoxAdapter):
        def predict(
            self, batch: Batch, n_samples: int = 1, units: Units | None = None
        ) -> Predictions:
            pred = super().predict(batch, n_samples, units)
            assert pred.boxes_U4 is not None
            pred.boxes_U4[::2, 3] = pred.boxes_U4[::2, 1]  # every other box: zero height
            return pred

    torch.manual_seed(0)
    adapter = FlatBoxes(num_classes=2, kind="softmax", score_thr=0.0)
    source = ImageList(4)
    units = len(adapter.predict(next(source.batches(source.ids, 256))).owner_U)
    selector = Selector("entropy", progress=False, query="region")  # one batch of 4
    queries = selector.select(adapter, source, [], float(units // 2))  # every box with area
    assert len(queries) == units // 2
    assert all(q.box is not None and q.box[3] > q.box[1] for q in queries)
    with pytest.raises(ValueError, match="larger than the unlabeled regions' total cost"):
        selector.select(adapter, source, [], float(units // 2 + 1))


def test_region_impurity_asks_for_regions_where_classes_meet() -> None:
    """Two regions equally uncertain on average: the one whose pixels are predicted as two
    classes beats the one predicted as a single class; a pure region scores 0."""
    from taskal import functional as F
    from taskal.strategies import RegionImpurity

    probs = torch.tensor(
        [
            [0.6, 0.4],
            [0.6, 0.4],
            [0.6, 0.4],
            [0.6, 0.4],
            [0.6, 0.4],
            [0.4, 0.6],
            [0.9, 0.1],
            [0.9, 0.1],
        ]
    )[:, :, None]
    p = Predictions(
        probs,
        torch.zeros(8, dtype=torch.long),
        unit_U=torch.arange(8),
        region_U=torch.tensor([0, 0, 1, 1, 1, 1, 2, 2]),
    )
    strategy = RegionImpurity()
    _, region, score, cost = strategy.reduce_regions(p, strategy.region_unit_scores(p).double())
    assert region.tolist() == [0, 1, 2] and cost.tolist() == [2.0, 4.0, 2.0]
    assert score[0] == 0.0 and score[2] == 0.0 and score[1] > 0.0
    impurity = F.region_impurity(
        torch.tensor([0, 0, 1, 1]), torch.zeros(4), torch.tensor([0, 0, 0, 0]), 2
    )
    assert torch.allclose(impurity, torch.tensor([math.log(2)], dtype=torch.float64))
    with pytest.raises(ValueError, match="ranks region queries only"):
        Selector("region_impurity", query="item")
    queries = Selector("region_impurity", progress=False, query="region").select(
        _pixel(), ImageList(3), [], 32.0, torch.Generator().manual_seed(0)
    )
    assert queries and sum(q.cost for q in queries) <= 32.0


def test_item_and_class_caps_spread_region_queries() -> None:
    source = ImageList(6)
    adapter = _pixel()
    free = Selector("entropy", progress=False, query="region").select(adapter, source, [], 160.0)
    per_item: dict[ItemId, float] = {}
    for q in free:
        per_item[q.item] = per_item.get(q.item, 0.0) + q.cost
    capped = Selector("entropy", progress=False, query="region", max_item_share=0.2).select(
        adapter, source, [], 160.0
    )
    spent: dict[ItemId, float] = {}
    for q in capped:
        spent[q.item] = spent.get(q.item, 0.0) + q.cost
    assert max(per_item.values()) > 32.0, "uncapped, one image takes more than a fifth"
    assert max(spent.values()) <= 32.0 and len(spent) >= 5
    assert sum(spent.values()) == pytest.approx(160.0)


def test_region_buffer_class_cap() -> None:
    buffer = RegionBuffer(4.0, max_class_share=0.5)
    g = torch.Generator().manual_seed(0)
    n = 8
    buffer.push(
        torch.arange(n, 0, -1).double(),  # region 0 best
        torch.arange(n),
        torch.zeros(n, dtype=torch.long),
        torch.ones(n),
        torch.full((n, 4), math.nan),
        g,
        torch.tensor([1, 1, 1, 2, 2, 2, 3, 3]),
    )
    picks = buffer.queries([f"i{k}" for k in range(n)])
    assert [q.item for q in picks] == ["i0", "i1", "i3", "i4"]  # two per class at most


def test_caps_are_checked() -> None:
    with pytest.raises(ValueError, match="caps region queries"):
        Selector("entropy", max_item_share=0.5)
    with pytest.raises(ValueError, match=r"max_class_share must lie in \(0, 1\]"):
        Selector("entropy", query="region", max_class_share=0.0)


def test_class_cap_through_the_selector() -> None:
    """Each queried patch's dominant predicted class spends at most half the budget."""
    source = ImageList(6)
    adapter = _pixel()
    queries = Selector("entropy", progress=False, query="region", max_class_share=0.5).select(
        adapter, source, [], 96.0
    )
    batch = next(source.batches(source.ids, 6))
    pred = adapter.predict(batch)
    classes = pred.probs_UCK[..., 0].argmax(1)
    spent: dict[int, float] = {}
    for q in queries:
        mine = (pred.owner_U == source.ids.index(q.item)) & (pred.regions() == q.region)
        dominant = int(torch.bincount(classes[mine], minlength=3).argmax())
        spent[dominant] = spent.get(dominant, 0.0) + q.cost
    assert queries and max(spent.values()) <= 48.0


def test_caps_do_not_starve_the_buffer() -> None:
    """The best 40 regions all belong to one item: with a 25 % item cap the buffer still
    keeps regions of other items, so the whole budget is spent."""
    buffer = RegionBuffer(8.0, max_item_share=0.25)
    g = torch.Generator().manual_seed(0)
    item = torch.cat([torch.zeros(40, dtype=torch.long), torch.arange(1, 21)])
    buffer.push(
        torch.cat([torch.full((40,), 9.0), torch.linspace(1, 2, 20)]).double(),
        item,
        torch.arange(60),
        torch.ones(60),
        torch.full((60, 4), math.nan),
        g,
    )
    picks = buffer.queries([f"i{k}" for k in range(21)])
    assert len(picks) == 8 and sum(q.item == "i0" for q in picks) == 2


def test_region_impurity_scores_each_owner_and_region_by_hand() -> None:
    """Two items with uneven regions (the second item's units listed first): every
    (owner, region) row is impurity x mean entropy, computed here by hand."""
    from taskal.strategies import RegionImpurity

    g = torch.Generator().manual_seed(3)
    probs = torch.rand(9, 3, 1, generator=g).softmax(1)
    owner = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1, 0])
    region = torch.tensor([2, 0, 2, 1, 0, 1, 1, 0, 0])
    p = Predictions(probs, owner, unit_U=torch.arange(9), region_U=region)
    strategy = RegionImpurity()
    entropy_U = strategy.region_unit_scores(p).double()
    owner_R, region_R, score_R, _ = strategy.reduce_regions(p, entropy_U)
    assert list(zip(owner_R.tolist(), region_R.tolist(), strict=True)) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 2),
    ]
    classes = probs[:, :, 0].argmax(1)
    for o, r, got in zip(owner_R.tolist(), region_R.tolist(), score_R.tolist(), strict=True):
        mine = (owner == o) & (region == r)
        share = torch.bincount(classes[mine], minlength=3).double() / int(mine.sum())
        impurity = float(-(share[share > 0] * share[share > 0].log()).sum())
        assert got == pytest.approx(impurity * float(entropy_U[mine].mean()))
