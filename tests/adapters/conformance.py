"""The adapter contract as a test template: every adapter test inherits it.

A subclass declares what its task expects (``unit_kind``, ``prob_kind``,
``deterministic_samples``) and provides ``make_adapter(seed)`` and ``make_batch()`` (a batch
with labels; a list of differently sized images for box and pixel adapters). The template
checks shapes, probabilities valid for their kind, owners in range, units fixed by the
deterministic pass and kept by MC samples, by ``predict(units=...)`` and by an ensemble;
variation inside ``stochastic()``; features matching ``feature_info`` level by level and
equal to the outputs of the modules they name; hooks removed and train/eval modes restored
afterwards; embeddings and per-sample losses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

from taskal.adapters import EnsembleAdapter
from taskal.types import Adapter, Batch, as_levels, same_units

TASK_OF_UNIT = {"image": "cls", "box": "det", "pixel": "seg"}


def _hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _tensors(out: object) -> list[Tensor]:
    """A module output as the list of tensors it holds (itself, or a tuple/list/dict's)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for t in out.values() if isinstance(t, Tensor)]
    assert isinstance(out, (tuple, list)), f"a module returned a {type(out).__name__}"
    return [t for t in out if isinstance(t, Tensor)]


def _same_map(captured: Tensor, output: Tensor) -> bool:
    """``captured`` is ``output``, or ``output`` ``[B, H, W, C]`` permuted to ``[B, C, H, W]``."""
    if captured.shape == output.shape and torch.equal(captured, output):
        return True
    if output.dim() == 4 and output.permute(0, 3, 1, 2).shape == captured.shape:
        return torch.equal(captured, output.permute(0, 3, 1, 2))
    return False


class AdapterConformance:
    """Inherit, set the task's class attributes and ``make_adapter`` / ``make_batch``."""

    #: what a unit is: "image", "box" or "pixel".
    unit_kind: ClassVar[str] = "image"
    #: the probability kind the adapter must return: "softmax" or "sigmoid".
    prob_kind: ClassVar[str] = "softmax"
    #: samples ``K`` of a deterministic prediction (an ensemble returns one per member).
    deterministic_samples: ClassVar[int] = 1

    def make_adapter(self, seed: int = 0) -> Adapter:
        raise NotImplementedError

    def make_batch(self) -> Batch:
        raise NotImplementedError

    def make_bad_batch(self) -> Batch:
        """A batch whose forward fails (a 99-channel image)."""
        return Batch([torch.zeros(99, 32, 32)], ["bad"])

    # -- predictions ----------------------------------------------------------------------
    def test_declares_its_task_and_kind(self) -> None:
        adapter = self.make_adapter()
        assert adapter.task == TASK_OF_UNIT[self.unit_kind]
        assert adapter.prob_kind == self.prob_kind

    def test_predict_shapes(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        pred = adapter.predict(batch)
        U, C, K = pred.probs_UCK.shape
        assert adapter.num_classes == C and self.deterministic_samples == K
        assert pred.kind == self.prob_kind
        assert U > 0, "the test batch should give some units"
        for t in (pred.owner_U, pred.unit_U):
            assert t is not None and t.shape == (U,) and t.dtype == torch.long
        assert int(pred.owner_U.min()) >= 0 and int(pred.owner_U.max()) < len(batch)
        assert pred.regions().shape == (U,) and pred.costs().shape == (U,)
        assert (pred.costs() > 0).all()
        sizes = batch.image_sizes()
        if self.unit_kind == "image":
            assert torch.equal(pred.owner_U.cpu(), torch.arange(len(batch)))
        if self.unit_kind == "pixel":
            assert sum(h * w for h, w in sizes) == U
            per_item = torch.tensor([h * w for h, w in sizes])[pred.owner_U.cpu()]
            assert (pred.units().unit_U.cpu() < per_item).all()
        if self.unit_kind == "box":
            boxes = pred.boxes_U4
            assert boxes is not None and boxes.shape == (U, 4)
            assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        else:
            assert pred.boxes_U4 is None

    def test_probabilities_valid_for_kind(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        for n in (1, 3):
            probs = adapter.predict(batch, n_samples=n).probs_UCK
            assert torch.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
            if self.prob_kind == "softmax":
                ones = torch.ones(probs.shape[0], probs.shape[2])
                assert torch.allclose(probs.sum(1).cpu(), ones, atol=1e-4)

    def test_deterministic_outside_stochastic(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        a, b = adapter.predict(batch), adapter.predict(batch)
        assert same_units(a.units(), b.units())
        assert torch.equal(a.probs_UCK, b.probs_UCK)

    def test_units_fixed_by_the_deterministic_pass(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        fixed = adapter.predict(batch)
        torch.manual_seed(0)
        sampled = adapter.predict(batch, n_samples=3)
        assert same_units(sampled.units(), fixed.units())
        assert sampled.num_samples == 3 * self.deterministic_samples
        again = adapter.predict(batch, units=fixed.units())
        assert same_units(again.units(), fixed.units())
        assert torch.allclose(again.probs_UCK, fixed.probs_UCK)
        resampled = adapter.predict(batch, n_samples=2, units=fixed.units())
        assert same_units(resampled.units(), fixed.units())

    def test_mc_samples_vary(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        torch.manual_seed(0)
        probs = adapter.predict(batch, n_samples=4).probs_UCK
        assert not torch.allclose(probs[..., 0], probs[..., 1])

    def test_ensemble_lines_up(self) -> None:
        members = [self.make_adapter(0), self.make_adapter(1)]
        ensemble, batch = EnsembleAdapter(members), self.make_batch()
        fixed = members[0].predict(batch).units()
        pred = ensemble.predict(batch, n_samples=2)
        assert same_units(pred.units(), fixed)
        assert pred.num_samples == 2 * 2 * self.deterministic_samples
        second = members[1].predict(batch, units=fixed)
        assert same_units(second.units(), fixed)
        d = self.deterministic_samples
        assert torch.allclose(ensemble.predict(batch).probs_UCK[..., d : 2 * d], second.probs_UCK)

    # -- modes ----------------------------------------------------------------------------
    def test_stochastic_keeps_batchnorm_in_eval_and_restores(self) -> None:
        adapter = self.make_adapter()
        model = adapter.model
        model.train()
        before = _modes(model)
        with adapter.stochastic():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    assert not m.training
        assert _modes(model) == before

    def test_every_call_restores_train_mode(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        adapter.model.train()
        before = _modes(adapter.model)
        fixed = adapter.predict(batch)
        adapter.predict(batch, n_samples=2)
        adapter.predict(batch, n_samples=2, units=fixed.units())
        adapter.features(batch)
        adapter.embed(batch)
        adapter.per_sample_loss(batch)
        assert _modes(adapter.model) == before

    # -- features -------------------------------------------------------------------------
    def test_features_match_feature_info(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        info = adapter.feature_info
        assert info, "an adapter exposes at least one feature layer"
        finest = [f.strides[0] for f in info]
        assert finest == sorted(finest), "feature_info runs shallow to deep"
        hooks = _hook_counts(adapter.model)
        feats = adapter.features(batch)
        assert list(feats) == [f.name for f in info]
        height = max(h for h, _ in batch.image_sizes())
        width = max(w for _, w in batch.image_sizes())
        for f in info:
            levels = as_levels(feats[f.name])
            assert len(levels) == f.num_levels == len(f.strides), f.name
            assert list(f.strides) == sorted(f.strides), f"{f.name}: levels run fine to coarse"
            for x, stride, channels in zip(levels, f.strides, f.level_channels, strict=True):
                assert x.dim() == 4 and x.shape[0] == len(batch), (f.name, x.shape)
                assert x.shape[1] == channels, (f.name, x.shape, channels)
                assert abs(x.shape[2] - max(1.0, height / stride)) <= 1, (f.name, x.shape)
                assert abs(x.shape[3] - max(1.0, width / stride)) <= 1, (f.name, x.shape)
                assert not x.requires_grad
        assert _hook_counts(adapter.model) == hooks, "forward hooks must be removed"

    def test_features_are_the_outputs_of_their_modules(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        modules = dict(adapter.model.named_modules())
        outputs: dict[str, list[Tensor]] = {f.name: [] for f in adapter.feature_info}
        handles = []
        for f in adapter.feature_info:
            assert f.module in modules, f"{f.name}: no module {f.module!r} in adapter.model"

            def hook(_m: nn.Module, _i: object, out: object, name: str = f.name) -> None:
                outputs[name].extend(_tensors(out))

            handles.append(modules[f.module].register_forward_hook(hook))
        try:
            feats = adapter.features(batch)
        finally:
            for h in handles:
                h.remove()
        for f in adapter.feature_info:
            levels = as_levels(feats[f.name])
            assert len(levels) == len(outputs[f.name]), (f.name, len(outputs[f.name]))
            for got, out in zip(levels, outputs[f.name], strict=True):
                assert _same_map(got, out), f"{f.name} is not the output of {f.module}"

    def test_capture_features_yields_every_level(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        hooks = _hook_counts(adapter.model)
        with adapter.capture_features() as store:
            feats = adapter.features(batch)  # any forward of the model fills the capture
            assert isinstance(store, Mapping) and not hasattr(store, "__setitem__")
            assert set(store) == set(feats)
            for name, x in feats.items():
                got, want = as_levels(store[name]), as_levels(x)
                assert len(got) == len(want)
                assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        assert _hook_counts(adapter.model) == hooks

    def test_hooks_removed_when_forward_fails(self) -> None:
        adapter = self.make_adapter()
        hooks = _hook_counts(adapter.model)
        with pytest.raises(RuntimeError):
            adapter.features(self.make_bad_batch())
        assert _hook_counts(adapter.model) == hooks
        with pytest.raises(RuntimeError), adapter.capture_features():
            raise RuntimeError("a failing forward")
        assert _hook_counts(adapter.model) == hooks

    # -- embeddings and losses ------------------------------------------------------------
    def test_embed_and_loss(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        emb = adapter.embed(batch)
        assert emb.dim() == 2 and emb.shape[0] == len(batch) and not emb.requires_grad
        assert torch.isfinite(emb).all()
        loss = adapter.per_sample_loss(batch)
        assert loss.shape == (len(batch),) and torch.isfinite(loss).all()

    def test_predict_and_embed_equal_predict_then_embed(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        predictions, emb = adapter.predict_and_embed(batch)
        alone = adapter.predict(batch)
        assert torch.equal(predictions.probs_UCK, alone.probs_UCK)
        assert torch.equal(predictions.owner_U, alone.owner_U)
        assert torch.equal(emb, adapter.embed(batch)) and not emb.requires_grad

    def test_loss_needs_labels(self) -> None:
        adapter, batch = self.make_adapter(), self.make_batch()
        with pytest.raises(ValueError):
            adapter.per_sample_loss(batch.without_labels())
