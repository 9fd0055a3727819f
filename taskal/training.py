"""Supervised training of a classification adapter's model, optionally with LLAL."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm import tqdm

from taskal.functional import loss_ranking_loss
from taskal.llal.module import LossPredictionModule
from taskal.types import Adapter, Batch


@dataclass
class TrainConfig:
    """How a model is trained on the labeled set each round.

    Attributes:
        epochs: passes over the (resampled) labeled set.
        batch_size: items per step.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        min_epoch_items: an epoch draws at least this many items (with repetition), so a
            20-item labeled set gets as many steps as a 500-item one.
    """

    epochs: int = 15
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 5e-4
    min_epoch_items: int = 256

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"train.batch_size must be >= 2 (BatchNorm), got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.min_epoch_items < 0:
            raise ValueError(f"train.min_epoch_items must be >= 0, got {self.min_epoch_items}")


@dataclass
class LLALConfig:
    """Learning Loss training (Yoo & Kweon 2019).

    Attributes:
        weight: λ, the weight of the ranking loss (1.0 in the paper).
        margin: ξ, the ranking margin (1.0 in the paper).
        stop_grad_fraction: after this fraction of the training schedule the loss module no
            longer back-propagates into the task model (the paper stops at epoch 120 of 200:
            0.6). The stop epoch is ``round(stop_grad_fraction * epochs)``.
        hidden: width of each per-map branch (128 in the paper).
    """

    weight: float = 1.0
    margin: float = 1.0
    stop_grad_fraction: float = 0.6
    hidden: int = 128

    def __post_init__(self) -> None:
        if not 0.0 <= self.stop_grad_fraction <= 1.0:
            raise ValueError(
                f"llal.stop_grad_fraction must lie in [0, 1] (0.6 = the paper's 120 of 200 "
                f"epochs), got {self.stop_grad_fraction!r}"
            )
        if not self.weight >= 0 or not self.margin >= 0:
            raise ValueError(f"llal.weight and llal.margin must be >= 0, got {self}")
        if self.hidden < 1:
            raise ValueError(f"llal.hidden must be >= 1, got {self.hidden}")

    def stop_grad_epoch(self, epochs: int) -> int:
        """The first epoch (0-based) of ``epochs`` in which the gradient is stopped."""
        return round(self.stop_grad_fraction * epochs)


def train_classifier(
    adapter: Adapter,
    labeled: Batch,
    cfg: TrainConfig,
    generator: torch.Generator,
    llal: LossPredictionModule | None = None,
    llal_cfg: LLALConfig | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Train ``adapter.model`` on ``labeled`` in place; returns the last epoch's mean losses.

    With ``llal`` the loss-prediction module is trained jointly through the ranking loss on
    the adapter's feature layers and attached to the adapter for the ``llal`` strategy.
    """
    if labeled.targets is None:
        raise ValueError("training needs labels: labeled.targets is None")
    if len(labeled) < 2:
        raise ValueError(f"training needs at least 2 labeled items, got {len(labeled)}")
    llal_cfg = llal_cfg or LLALConfig()
    model = adapter.model
    device = next(model.parameters()).device
    params = list(model.parameters()) + (list(llal.parameters()) if llal is not None else [])
    optim = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if not isinstance(labeled.inputs, torch.Tensor):
        raise TypeError("train_classifier needs the labeled inputs stacked in one tensor [N, ...]")
    x_all = labeled.inputs.to(device)
    y_all = labeled.targets.to(device)
    n = len(labeled)
    per_epoch = max(n, cfg.min_epoch_items)
    model.train()
    if llal is not None:
        llal.to(device).train()
    stats = {"task_loss": 0.0, "llal_loss": 0.0}
    stop_epoch = llal_cfg.stop_grad_epoch(cfg.epochs)
    for epoch in tqdm(range(cfg.epochs), desc="train", disable=not progress, leave=False):
        order = torch.cat(
            [torch.randperm(n, generator=generator) for _ in range(-(-per_epoch // n))]
        )
        order = order[:per_epoch]
        totals, steps = {"task_loss": 0.0, "llal_loss": 0.0}, 0
        for start in range(0, per_epoch, cfg.batch_size):
            idx = order[start : start + cfg.batch_size].to(device)
            if idx.numel() < 2:  # BatchNorm needs two items
                continue
            optim.zero_grad(set_to_none=True)
            if llal is None:
                loss_B = F.cross_entropy(model(x_all[idx]), y_all[idx], reduction="none")
                loss = loss_B.mean()
            else:
                with adapter.capture_features(llal.layers) as feats:
                    logits = model(x_all[idx])
                loss_B = F.cross_entropy(logits, y_all[idx], reduction="none")
                pred_B = llal(feats, detach=epoch >= stop_epoch)
                rank = loss_ranking_loss(pred_B, loss_B, llal_cfg.margin)
                loss = loss_B.mean() + llal_cfg.weight * rank
                totals["llal_loss"] += float(rank.detach())
            loss.backward()
            optim.step()
            totals["task_loss"] += float(loss_B.detach().mean())
            steps += 1
        stats = {k: v / max(steps, 1) for k, v in totals.items()}
    model.eval()
    if llal is not None:
        llal.eval()
        adapter.attach_loss_predictor(llal)
    return stats


@torch.no_grad()
def accuracy(adapter: Adapter, batch: Batch, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``adapter`` on ``batch`` (deterministic predictions)."""
    if batch.targets is None:
        raise ValueError("accuracy needs batch.targets")
    if not isinstance(batch.inputs, torch.Tensor):
        raise TypeError("accuracy needs the inputs stacked in one tensor [N, ...]")
    correct = 0
    for start in range(0, len(batch), batch_size):
        part = Batch(
            batch.inputs[start : start + batch_size], batch.ids[start : start + batch_size]
        )
        pred = adapter.predict(part).probs_UCK.mean(-1).argmax(1).cpu()
        correct += int((pred == batch.targets[start : start + batch_size].cpu()).sum())
    return correct / len(batch)
