"""Deterministic seeds derived from several integers (rounds, batches, ensemble members)."""

from __future__ import annotations


def mix_seed(*parts: int) -> int:
    """A deterministic seed from several integers."""
    value = 0x9E3779B9
    for p in parts:
        value = (value * 1_000_003 + int(p) + 1) % (2**61 - 1)
    return value


__all__ = ["mix_seed"]
