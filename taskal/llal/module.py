"""The loss-prediction module of Learning Loss for Active Learning (Yoo & Kweon, CVPR 2019)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from taskal.types import FeatureInfo, FeatureMap, as_levels


class LossPredictionModule(nn.Module):
    """Predict a sample's task loss from several hidden layers.

    Each layer (each level of a multi-level layer such as an FPN) goes through global
    average pooling, a fully connected layer and ReLU; the concatenated vectors feed one
    linear output (the paper's Figure 2).

    Args:
        feature_info: the adapter's layers to read (at least three maps in all, shallow to
            deep; the levels of a multi-level layer count one each).
        hidden: width of each per-map branch (128 in the paper).
    """

    def __init__(self, feature_info: Sequence[FeatureInfo], hidden: int = 128) -> None:
        super().__init__()
        maps = sum(f.num_levels for f in feature_info)
        if maps < 3:
            raise ValueError(
                f"LLAL reads at least three hidden maps, got {maps} from "
                f"{[f.name for f in feature_info]}; expose more layers from the adapter."
            )
        self.layers = [f.name for f in feature_info]
        self.levels = {f.name: f.num_levels for f in feature_info}
        self.branches = nn.ModuleDict(
            {
                _key(f.name, level): nn.Sequential(
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU()
                )
                for f in feature_info
                for level, channels in enumerate(f.level_channels)
            }
        )
        self.head = nn.Linear(hidden * maps, 1)

    def forward(self, feats: Mapping[str, FeatureMap], detach: bool = False) -> Tensor:
        """``feats[name]`` ``[B, C, H, W]`` (or its levels) -> predicted loss ``[B]``.

        Args:
            feats: the layers named in ``self.layers``.
            detach: stop the gradient into the task model (after the paper's epoch 120 of
                200, i.e. 60 % of the schedule).
        """
        parts = []
        for name in self.layers:
            levels = as_levels(feats[name])
            if len(levels) != self.levels[name]:
                raise ValueError(
                    f"layer {name!r} arrived with {len(levels)} levels, expected "
                    f"{self.levels[name]}"
                )
            for level, x in enumerate(levels):
                if x.dim() == 2:
                    x = x[:, :, None, None]
                parts.append(self.branches[_key(name, level)](x.detach() if detach else x))
        return self.head(torch.cat(parts, dim=1)).squeeze(1)


def _key(name: str, level: int) -> str:
    return f"{name.replace('.', '__')}__l{level}"
