"""The contract's data types: unit identity, batches of any size, features, label state."""

from __future__ import annotations

import pytest
import torch

from taskal.queries import LabelState, Query
from taskal.types import Batch, FeatureInfo, Predictions, Units, as_levels, same_units


def test_units_default_to_their_rank_inside_the_item() -> None:
    owner = torch.tensor([2, 0, 2, 1, 0, 2])
    pred = Predictions(torch.full((6, 2, 1), 0.5), owner)
    assert pred.unit_U is not None and pred.unit_U.tolist() == [0, 0, 1, 0, 1, 2]
    assert pred.regions().tolist() == pred.unit_U.tolist()
    assert pred.costs().tolist() == [1.0] * 6


def test_predictions_validate_shapes_and_kind() -> None:
    with pytest.raises(ValueError, match="unknown probability kind"):
        Predictions(torch.rand(2, 2, 1), torch.zeros(2, dtype=torch.long), kind="logits")
    with pytest.raises(ValueError, match=r"\[U, C, K\]"):
        Predictions(torch.rand(2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="boxes_U4"):
        Predictions(
            torch.rand(2, 2, 1), torch.zeros(2, dtype=torch.long), boxes_U4=torch.rand(3, 4)
        )


def test_same_units_compares_owners_ids_and_boxes() -> None:
    a = Units(
        torch.tensor([0, 1]), torch.tensor([5, 7]), torch.tensor([[0.0, 0, 4, 4], [1, 1, 3, 3]])
    )
    assert same_units(a, Units(a.owner_U.clone(), a.unit_U.clone(), a.boxes_U4.clone()))  # type: ignore[union-attr]
    moved = a.boxes_U4.clone()  # type: ignore[union-attr]
    moved[1, 0] += 500
    assert not same_units(a, Units(a.owner_U, a.unit_U, moved)), "owners alone must not match"
    assert not same_units(a, Units(a.owner_U, torch.tensor([5, 8]), a.boxes_U4))


def test_batches_of_differently_sized_images() -> None:
    batch = Batch([torch.rand(3, 8, 6), torch.rand(3, 5, 9)], ["a", "b"], None, [{}, {}])
    assert batch.image_sizes() == [(8, 6), (5, 9)] and len(batch) == 2
    with pytest.raises(ValueError, match="2 inputs but 1 data samples"):
        Batch([torch.rand(3, 8, 6), torch.rand(3, 5, 9)], ["a", "b"], None, [{}])
    with pytest.raises(ValueError, match="one stable id per item"):
        Batch(torch.rand(2, 3, 4, 4), ["a"])


def test_feature_info_levels() -> None:
    fpn = FeatureInfo("fpn", 256, (8, 16, 32), module="neck")
    assert fpn.num_levels == 3 and fpn.level_channels == (256, 256, 256) and fpn.stride == 8
    stages = FeatureInfo("backbone", (64, 128), (4, 8))
    assert stages.level_channels == (64, 128) and stages.module == "backbone"
    with pytest.raises(ValueError, match="2 levels but 3 channel counts"):
        FeatureInfo("x", (1, 2, 3), (4, 8))
    assert len(as_levels(torch.zeros(1))) == 1


def test_label_state_records_full_and_partial_labels() -> None:
    state = LabelState.of(["a"])
    state.add([Query("b", region=3), Query("b", region=4), Query("c"), Query("a", region=1)])
    assert state.full == {"a", "c"} and state.partial == {"b": {3, 4}}
    state.add([Query("b")])
    assert state.full == {"a", "b", "c"} and state.partial == {}
    copy = state.copy()
    copy.add([Query("d", region=0)])
    assert "d" not in state.items() and "d" in copy.items()
