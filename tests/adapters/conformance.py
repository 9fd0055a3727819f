"""The adapter contract as a test template: every adapter test inherits it.

A subclass provides ``make_adapter()`` and ``make_batch()``; the template checks shapes,
that probabilities sum to one, owners in range, features matching ``feature_info``,
determinism outside ``stochastic()``, variation inside it, and that hooks and train/eval
modes are restored afterwards.
"""

from __future__ import annotations

import pytest
import torch

from taskal.types import Adapter, Batch


def _hook_counts(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _modes(model: torch.nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


class AdapterConformance:
    """Inherit, set ``make_adapter`` / ``make_batch``; pytest collects the ``test_`` methods."""

    #: samples ``K`` of a deterministic prediction (an ensemble returns one per member).
    deterministic_samples = 1

    def make_adapter(self) -> Adapter:
        raise NotImplementedError

    def make_batch(self) -> Batch:
        raise NotImplementedError

    def test_predict_shapes_and_probabilities(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        pred = adapter.predict(batch)
        U, C, K = pred.probs_UCK.shape
        assert adapter.num_classes == C and self.deterministic_samples == K
        assert pred.owner_U.shape == (U,) and pred.owner_U.dtype == torch.long
        if U:
            assert int(pred.owner_U.min()) >= 0 and int(pred.owner_U.max()) < len(batch)
        assert torch.allclose(pred.probs_UCK.sum(1), torch.ones(U, K), atol=1e-4)
        assert (pred.probs_UCK >= 0).all()
        if pred.boxes_U4 is not None:
            assert pred.boxes_U4.shape == (U, 4)

    def test_deterministic_outside_stochastic(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        a = adapter.predict(batch).probs_UCK
        b = adapter.predict(batch).probs_UCK
        assert torch.equal(a, b)

    def test_stochastic_samples_vary_and_align(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        torch.manual_seed(0)
        pred = adapter.predict(batch, n_samples=4)
        assert pred.probs_UCK.shape[-1] == 4 * self.deterministic_samples
        assert pred.owner_U.shape[0] == pred.probs_UCK.shape[0]
        assert not torch.allclose(pred.probs_UCK[..., 0], pred.probs_UCK[..., 1])

    def test_stochastic_keeps_batchnorm_in_eval_and_restores(self) -> None:
        adapter = self.make_adapter()
        model = adapter.model
        model.train()
        before = _modes(model)
        with adapter.stochastic():
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    assert not m.training
        assert _modes(model) == before

    def test_features_match_feature_info(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        info = adapter.feature_info
        assert info, "an adapter exposes at least one feature layer"
        hooks = _hook_counts(adapter.model)
        feats = adapter.features(batch)
        assert list(feats) == [f.name for f in info]
        w = batch.inputs.shape[-1]
        for f in info:
            x = feats[f.name]
            assert x.dim() == 4 and x.shape[0] == len(batch) and x.shape[1] == f.channels
            assert x.shape[-1] == max(1, round(w / f.stride))
            assert not x.requires_grad
        strides = [f.stride for f in info]
        assert strides == sorted(strides), "feature_info runs shallow to deep"
        assert _hook_counts(adapter.model) == hooks, "forward hooks must be removed"

    def test_hooks_removed_when_forward_fails(self) -> None:
        adapter = self.make_adapter()
        hooks = _hook_counts(adapter.model)
        bad = Batch(torch.zeros(1, 99, 8, 8), ["bad"])  # wrong channel count
        with pytest.raises(RuntimeError):
            adapter.features(bad)
        assert _hook_counts(adapter.model) == hooks

    def test_every_call_restores_train_mode(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        adapter.model.train()
        before = _modes(adapter.model)
        adapter.predict(batch)
        adapter.predict(batch, n_samples=2)
        adapter.features(batch)
        adapter.embed(batch)
        adapter.per_sample_loss(batch)
        assert _modes(adapter.model) == before

    def test_embed_and_loss(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        emb = adapter.embed(batch)
        assert emb.dim() == 2 and emb.shape[0] == len(batch) and not emb.requires_grad
        loss = adapter.per_sample_loss(batch)
        assert loss.shape == (len(batch),) and torch.isfinite(loss).all()
