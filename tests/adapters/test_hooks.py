"""MC dropout's sampling helpers (adapters/_hooks.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from taskal.adapters._hooks import InjectedDropout, inject_dropout, mc_dropout, sampled_dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampled_dropout_keeps_one_minus_p_and_scales(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.rand(200_000, dtype=dtype) + 0.5  # no element is 0 before dropout
    p = 0.3
    y = sampled_dropout(x, p)
    kept = y != 0
    assert y.dtype == dtype and y.shape == x.shape
    # 200k Bernoulli(0.7) draws: the kept share lies within 5 standard errors of 0.7
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * (p * (1 - p) / len(x)) ** 0.5
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))


def test_sampled_dropout_follows_the_global_seed_and_leaves_its_input() -> None:
    x = torch.randn(4, 8, 5, 5)
    before = x.clone()
    torch.manual_seed(3)
    a = sampled_dropout(x, 0.5)
    torch.manual_seed(3)
    b = sampled_dropout(x, 0.5)
    c = sampled_dropout(x, 0.5)
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert torch.equal(x, before)


def test_sampled_dropout_hands_autograd_and_edge_rates_to_f_dropout() -> None:
    x = torch.randn(1000, requires_grad=True)
    torch.manual_seed(1)
    y = sampled_dropout(x, 0.2)
    torch.manual_seed(1)
    assert torch.equal(y, F.dropout(x, 0.2, training=True))
    y.sum().backward()  # gradients flow as through F.dropout
    assert x.grad is not None and torch.equal(x.grad != 0, y != 0)
    assert torch.equal(sampled_dropout(x.detach(), 1.0), torch.zeros(1000))
    half = torch.randn(100).half()
    torch.manual_seed(2)
    out = sampled_dropout(half, 0.5)
    torch.manual_seed(2)
    assert torch.equal(out, F.dropout(half, 0.5, training=True))


def test_mc_dropout_samples_plain_dropout_fast_and_gives_its_forward_back() -> None:
    drop = nn.Dropout(0.5)
    model = nn.Sequential(nn.Linear(6, 64), drop, nn.Linear(64, 3)).eval()
    x = torch.randn(2, 6)
    with torch.no_grad(), mc_dropout(model):
        assert "forward" in vars(drop) and drop.training
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(0)
        hidden = model[0](x)
        expected = model[2](sampled_dropout(hidden, 0.5))
    torch.testing.assert_close(a, expected)
    assert "forward" not in vars(drop) and not drop.training
    with torch.no_grad(), mc_dropout(model):
        assert torch.equal(drop(input=hidden), drop(hidden)) is False  # keywords work; samples
        drop.eval()  # the module's own flag and p are read at every call
        assert torch.equal(drop(hidden), hidden)
        drop.train()
        drop.p = 0.0
        assert torch.equal(drop(hidden), hidden)
        drop.p = 0.5
    with pytest.raises(RuntimeError, match="boom"), mc_dropout(model):
        raise RuntimeError("boom")
    assert "forward" not in vars(drop)  # given back after an error too


def test_injected_dropout_samples_in_mc_and_is_identity_in_eval() -> None:
    lin = nn.Linear(10, 10)
    model = nn.Sequential(lin)
    inject_dropout(lin, 0.5)
    assert any(isinstance(h, InjectedDropout) for h in lin._forward_pre_hooks.values())
    x = torch.ones(3, 10)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), F.linear(x, lin.weight, lin.bias))
        with mc_dropout(model):
            torch.manual_seed(5)
            a = model(x)
            torch.manual_seed(5)
            b = F.linear(sampled_dropout(x, 0.5), lin.weight, lin.bias)
    torch.testing.assert_close(a, b)
