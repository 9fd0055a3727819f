"""What the detection adapters share: checking given box units against a batch."""

from __future__ import annotations

import torch

from taskal.types import Units


def check_box_units(units: Units, sizes: list[tuple[int, int]], device: torch.device) -> Units:
    """``units`` on ``device``, after checking that they can belong to a batch of images of
    ``sizes`` ``(H, W)``: boxes present, owners inside the batch, boxes inside their image
    (1e-3 px of slack)."""
    if units.boxes_U4 is None:
        raise ValueError("detection units need boxes_U4; pass Predictions.units()")
    owner, boxes = units.owner_U.to(device), units.boxes_U4.to(device)
    if len(units) and (int(owner.min()) < 0 or int(owner.max()) >= len(sizes)):
        raise ValueError(
            f"units belong to items outside this batch of {len(sizes)}; pass the units of a "
            "prediction on this batch"
        )
    limits = torch.tensor(sizes, device=device)[owner].flip(1).repeat(1, 2)
    if bool((boxes < -1e-3).any() or (boxes > limits + 1e-3).any()):
        raise ValueError("unit boxes lie outside their images: are they from this batch?")
    return Units(owner, units.unit_U.to(device), boxes)
