from __future__ import annotations

import pytest
import torch

from taskal import functional as F


def test_reduce_units() -> None:
    scores = torch.tensor([0.1, 0.9, 0.4, 0.2])
    owner = torch.tensor([0, 0, 2, 2])
    assert F.reduce_units(scores, owner, 3, "max").tolist() == pytest.approx([0.9, 0.0, 0.4])
    assert F.reduce_units(scores, owner, 3, "mean").tolist() == pytest.approx([0.5, 0.0, 0.3])
    assert F.reduce_units(scores, owner, 3, "sum").tolist() == pytest.approx([1.0, 0.0, 0.6])
    with pytest.raises(ValueError, match="reduction"):
        F.reduce_units(scores, owner, 3, "median")
    with pytest.raises(ValueError, match="owner indices"):
        F.reduce_units(scores, owner, 2)


# units, deliberately out of order: (owner, region) -> scores, costs
#   (0, 3): 0.2, 0.6          costs 1, 2
#   (0, 0): 0.5               cost  4
#   (2, 0): 0.1, 0.3, 0.8     costs 1, 1, 1
#   (1, 5): 0.4               cost  0.5
SCORES = torch.tensor([0.2, 0.1, 0.5, 0.3, 0.6, 0.4, 0.8])
OWNER = torch.tensor([0, 2, 0, 2, 0, 1, 2])
REGION = torch.tensor([3, 0, 0, 0, 3, 5, 0])
COST = torch.tensor([1.0, 1.0, 4.0, 1.0, 2.0, 0.5, 1.0])


@pytest.mark.parametrize(
    ("reduction", "want"),
    [
        ("max", [0.5, 0.6, 0.4, 0.8]),
        ("mean", [0.5, 0.4, 0.4, 0.4]),
        ("sum", [0.5, 0.8, 0.4, 1.2]),
    ],
)
def test_reduce_regions_hand_computed(reduction: str, want: list[float]) -> None:
    owner, region, score, cost = F.reduce_regions(SCORES, OWNER, REGION, COST, reduction)
    assert owner.tolist() == [0, 0, 1, 2]  # sorted by (owner, region)
    assert region.tolist() == [0, 3, 5, 0]
    assert owner.dtype == region.dtype == torch.long
    assert score.tolist() == pytest.approx(want)
    assert cost.tolist() == pytest.approx([4.0, 3.0, 0.5, 3.0])


def test_reduce_regions_default_cost_counts_units() -> None:
    _, _, score, cost = F.reduce_regions(SCORES, OWNER, REGION)
    assert score.tolist() == pytest.approx([0.5, 0.6, 0.4, 0.8])  # max by default
    assert cost.tolist() == [1.0, 2.0, 1.0, 3.0]


def test_reduce_regions_one_region_per_unit_and_empty() -> None:
    owner = torch.tensor([1, 0, 1])
    unit = torch.tensor([0, 0, 1])
    o, r, s, c = F.reduce_regions(torch.tensor([0.3, 0.2, 0.9]), owner, unit)
    assert (o.tolist(), r.tolist(), s.tolist(), c.tolist()) == (
        [0, 1, 1],
        [0, 0, 1],
        pytest.approx([0.2, 0.3, 0.9]),
        [1.0, 1.0, 1.0],
    )
    empty = torch.empty(0, dtype=torch.long)
    out = F.reduce_regions(torch.empty(0), empty, empty)
    assert [t.shape for t in out] == [(0,)] * 4


def test_reduce_regions_permutation_invariant() -> None:
    perm = torch.randperm(len(SCORES), generator=torch.Generator().manual_seed(0))
    want = F.reduce_regions(SCORES, OWNER, REGION, COST, "mean")
    got = F.reduce_regions(SCORES[perm], OWNER[perm], REGION[perm], COST[perm], "mean")
    for a, b in zip(want, got, strict=True):
        assert torch.allclose(a, b)


def test_reduce_regions_validates() -> None:
    with pytest.raises(ValueError, match="reduction"):
        F.reduce_regions(SCORES, OWNER, REGION, reduction="median")
    with pytest.raises(ValueError, match=r"region .* must match scores"):
        F.reduce_regions(SCORES, OWNER, REGION[:-1])
    with pytest.raises(ValueError, match=r"cost .* must match scores"):
        F.reduce_regions(SCORES, OWNER, REGION, COST[:3])
    with pytest.raises(ValueError, match="region ids must be >= 0"):
        F.reduce_regions(SCORES, OWNER, REGION - 1)
    with pytest.raises(ValueError, match="owner ids must be >= 0"):
        F.reduce_regions(SCORES, OWNER - 1, REGION)
    with pytest.raises(ValueError, match="integer"):
        F.reduce_regions(SCORES, OWNER, REGION.float())
    with pytest.raises(ValueError, match="costs must be >= 0"):
        F.reduce_regions(SCORES, OWNER, REGION, -COST)
    with pytest.raises(ValueError, match="1-D"):
        F.reduce_regions(SCORES[None], OWNER, REGION)


def test_topk_mean_averages_each_items_best_units() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.4])
    owner = torch.tensor([0, 0, 0, 0, 2, 2])
    out = F.reduce_units(scores, owner, 4, "topk_mean", k=2, empty=-1.0)
    assert torch.allclose(out, torch.tensor([0.8, -1.0, 0.3, -1.0]))
    # with k at least the unit count it is the plain mean
    assert torch.allclose(
        F.reduce_units(scores, owner, 3, "topk_mean", k=10),
        F.reduce_units(scores, owner, 3, "mean"),
    )


@pytest.mark.parametrize("reduction", ["max", "mean", "sum", "topk_mean"])
def test_items_without_units_get_the_empty_score(reduction: str) -> None:
    out = F.reduce_units(torch.tensor([0.5]), torch.tensor([1]), 3, reduction, empty=7.0)
    assert out.tolist() == [7.0, 0.5, 7.0]
