from __future__ import annotations

import pytest
import torch

from taskal.functional import loss_ranking_loss


def test_ranking_loss_known_values() -> None:
    target = torch.tensor([3.0, 1.0, 0.0, 2.0])  # pairs (0, 3) and (1, 2)
    good = torch.tensor([10.0, 5.0, 0.0, 0.0])  # ordered right with margin >= 1
    assert loss_ranking_loss(good, target).item() == 0.0
    bad = torch.tensor([0.0, 0.0, 0.0, 0.0])  # no separation: margin violated by 1 per pair
    assert loss_ranking_loss(bad, target).item() == pytest.approx(1.0)
    wrong = torch.tensor([0.0, 0.0, 2.0, 2.0])  # both pairs reversed by 2 -> 3 each
    assert loss_ranking_loss(wrong, target).item() == pytest.approx(3.0)


def test_ranking_loss_trains_a_predictor_and_detaches_target() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    target = (x[:, 0] * 2).requires_grad_()
    w = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = loss_ranking_loss(x @ w, target)
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    assert target.grad is None


def test_ranking_loss_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[B\]"):
        loss_ranking_loss(torch.zeros(4, 1), torch.zeros(4))
    assert loss_ranking_loss(torch.zeros(1), torch.zeros(1)).item() == 0.0
