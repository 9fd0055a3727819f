"""The loss-prediction ranking loss of Learning Loss for Active Learning (Yoo & Kweon 2019)."""

from __future__ import annotations

from torch import Tensor


def loss_ranking_loss(pred_B: Tensor, target_B: Tensor, margin: float = 1.0) -> Tensor:
    """Pairwise margin ranking loss between predicted and true per-sample losses.

    The batch is split into pairs ``(i, B-1-i)`` as in the reference code; for each pair the
    predicted losses must be ordered like the true ones by at least ``margin``:
    ``max(0, -sign(l_i - l_j) * (p_i - p_j) + margin)``, averaged over pairs.

    Args:
        pred_B: predicted losses ``[B]`` (B even; an odd last item is dropped).
        target_B: true per-sample losses ``[B]``; detached here, as in the paper.
        margin: the ranking margin ξ (1.0 in the paper).

    Returns:
        A scalar loss.
    """
    if pred_B.shape != target_B.shape or pred_B.dim() != 1:
        raise ValueError(
            f"pred and target must both be [B], got {tuple(pred_B.shape)} and "
            f"{tuple(target_B.shape)}"
        )
    half = pred_B.shape[0] // 2
    if half == 0:
        return pred_B.sum() * 0.0
    target_B = target_B.detach()
    pred_i, pred_j = pred_B[:half], pred_B.flip(0)[:half]
    tgt_i, tgt_j = target_B[:half], target_B.flip(0)[:half]
    # as the reference code: +1 where l_i > l_j, else -1 (ties count as -1)
    sign = 2.0 * (tgt_i > tgt_j).to(pred_B.dtype) - 1.0
    return (-sign * (pred_i - pred_j) + margin).clamp_min(0.0).mean()
