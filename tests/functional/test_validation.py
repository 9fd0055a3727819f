from __future__ import annotations

import pytest
import torch

from taskal import functional as F


def test_check_probs_softmax() -> None:
    good = torch.tensor([[[0.2], [0.8]]])
    assert F.check_probs(good) is good
    assert F.check_probs(good, kind="softmax") is good
    with pytest.raises(ValueError, match="sum to one"):
        F.check_probs(torch.tensor([[[0.9], [0.8]]]))
    with pytest.raises(ValueError, match=r"at least 2 classes.*kind='sigmoid'"):
        F.check_probs(torch.tensor([[[0.9]]]))


def test_check_probs_sigmoid() -> None:
    multi = torch.tensor([[[0.9], [0.8], [1.0], [0.0]]])  # sums to 2.7: independent classes
    assert F.check_probs(multi, kind="sigmoid") is multi
    one = torch.tensor([[[0.3]], [[0.7]]])  # a one-class head
    assert F.check_probs(one, kind="sigmoid") is one
    with pytest.raises(ValueError, match=r"sigmoid scores must lie in \[0, 1\]; were logits"):
        F.check_probs(torch.tensor([[[2.3], [0.1]]]), kind="sigmoid")
    with pytest.raises(ValueError, match="apply sigmoid first"):
        F.check_probs(torch.tensor([[[-0.01]]]), kind="sigmoid")
    with pytest.raises(ValueError, match="NaN or inf"):
        F.check_probs(torch.tensor([[[float("inf")]]]), kind="sigmoid")
    with pytest.raises(ValueError, match=r"\[U, C, K\]"):
        F.check_probs(torch.rand(3, 2), kind="sigmoid")
    with pytest.raises(ValueError, match="at least 1 classes"):
        F.check_probs(torch.rand(3, 0, 1), kind="sigmoid")


def test_check_probs_unknown_kind_lists_the_kinds() -> None:
    with pytest.raises(ValueError, match=r"'logits'.*\('softmax', 'sigmoid'\)"):
        F.check_probs(torch.full((1, 2, 1), 0.5), kind="logits")


def test_a_checked_tensor_changed_in_place_is_checked_again() -> None:
    probs = torch.full((4, 2, 1), 0.5)
    F.check_probs(probs)
    F.check_probs(probs)  # the memo: the same tensor, unchanged
    probs[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        F.check_probs(probs)
    with pytest.raises(ValueError, match="sum to one"):
        F.check_probs(torch.full((4, 2, 1), 0.7))
