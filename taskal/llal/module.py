"""The loss-prediction module of Learning Loss for Active Learning (Yoo & Kweon, CVPR 2019)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from taskal.types import FeatureInfo


class LossPredictionModule(nn.Module):
    """Predict a sample's task loss from several hidden layers.

    Each layer goes through global average pooling, a fully connected layer and ReLU; the
    concatenated vectors feed one linear output (the paper's Figure 2).

    Args:
        feature_info: the adapter's layers to read (at least three, shallow to deep).
        hidden: width of each per-layer branch (128 in the paper).
    """

    def __init__(self, feature_info: Sequence[FeatureInfo], hidden: int = 128) -> None:
        super().__init__()
        if len(feature_info) < 3:
            raise ValueError(
                f"LLAL reads at least three hidden layers, got {len(feature_info)}: "
                f"{[f.name for f in feature_info]}; expose more layers from the adapter."
            )
        self.layers = [f.name for f in feature_info]
        self.branches = nn.ModuleDict(
            {
                _key(f.name): nn.Sequential(
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(f.channels, hidden), nn.ReLU()
                )
                for f in feature_info
            }
        )
        self.head = nn.Linear(hidden * len(feature_info), 1)

    def forward(self, feats: Mapping[str, Tensor], detach: bool = False) -> Tensor:
        """``feats[name]`` ``[B, C_l, H_l, W_l]`` -> predicted loss ``[B]``.

        Args:
            feats: the layers named in ``self.layers``.
            detach: stop the gradient into the task model (after the paper's epoch 120).
        """
        parts = []
        for name in self.layers:
            x = feats[name]
            if x.dim() == 2:
                x = x[:, :, None, None]
            parts.append(self.branches[_key(name)](x.detach() if detach else x))
        return self.head(torch.cat(parts, dim=1)).squeeze(1)


def _key(name: str) -> str:
    return name.replace(".", "__")
