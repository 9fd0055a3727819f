"""The batches of one pass over the pool: split across torchrun ranks, cached on disk.

A pass cuts its ids into batches of ``batch_size`` in order; batch ``b`` holds ids
``[b * batch_size, (b + 1) * batch_size)``. Rank ``r`` of ``W`` scores batches ``r, r + W,
...`` and every batch draws its random numbers (MC-dropout masks) from a seed of its own,
``mix_seed(pass seed, b)``, so a batch's results do not depend on which process scored it,
on what was scored before it, or on an interruption in between.

With a :class:`ChunkCache` every scored batch is written to disk at once (``<b>.pt``,
written to a temporary name and renamed, so a file that exists is complete). A pass that
is run again with the same fingerprint loads the batches it finds and scores only the rest:
a killed scoring run resumes where it stopped and gives the same results.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from taskal import distributed
from taskal.types import ItemId

#: one batch's per-item results: ``{field: [B, ...] tensor}``
Chunk = dict[str, Tensor]

MANIFEST = "manifest.json"


def batch_spans(num_items: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of every batch of a pass over ``num_items`` ids."""
    return [(s, min(s + batch_size, num_items)) for s in range(0, num_items, batch_size)]


def shard(num_batches: int, rank: int, world_size: int) -> list[int]:
    """The batches rank ``rank`` scores: every ``world_size``-th, from ``rank`` on."""
    return list(range(rank, num_batches, world_size))


def ids_digest(ids: Sequence[ItemId]) -> str:
    """A digest of an ordered id list (the cache is only valid for the same candidates)."""
    h = hashlib.sha256()
    for i in ids:
        h.update(repr(i).encode())
        h.update(b"\0")
    return h.hexdigest()


class ChunkCache:
    """Per-batch results of passes in one folder, valid for one fingerprint.

    Args:
        root: the folder (created if missing). Each pass has a subfolder (its ``name``).
        fingerprint: everything the results depend on (candidates, batch size, seed,
            strategy, model); :meth:`open` clears chunks recorded under another one.

    With ``shared=True`` the ranks of a process group share the folder (one machine, or a
    file system every node sees): rank 0 checks the manifest, the others wait for it.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        fingerprint: Mapping[str, Any],
        shared: bool = False,
    ) -> None:
        self.root = Path(root)
        self.fingerprint = json.loads(json.dumps(dict(fingerprint), sort_keys=True, default=str))
        self.shared = shared

    def open(self) -> None:
        """Make the folder hold this fingerprint's chunks only (rank 0), then sync ranks."""
        if not self.shared or distributed.is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            manifest = self.root / MANIFEST
            found = None
            if manifest.is_file():
                try:
                    found = json.loads(manifest.read_text())
                except (OSError, ValueError):
                    found = None
            if found != self.fingerprint:
                stale = sorted(self.root.glob("*/*.pt"))
                if stale:
                    warnings.warn(
                        f"{self.root} holds {len(stale)} scored batches of another run "
                        "(other candidates, strategy, seed or model); scoring again",
                        UserWarning,
                        stacklevel=3,
                    )
                for p in [*stale, *self.root.glob("*/.*.tmp")]:
                    p.unlink()
                tmp = manifest.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.fingerprint, indent=1, sort_keys=True))
                os.replace(tmp, manifest)
        if self.shared:
            distributed.barrier()

    def _path(self, name: str, b: int) -> Path:
        return self.root / name / f"{b:07d}.pt"

    def load(self, name: str, b: int) -> Chunk | None:
        """Batch ``b`` of pass ``name``, or ``None`` when it was not scored (or unreadable)."""
        path = self._path(name, b)
        if not path.is_file():
            return None
        try:
            chunk = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None
        return chunk if isinstance(chunk, dict) else None

    def save(self, name: str, b: int, chunk: Chunk) -> None:
        """Write batch ``b`` of pass ``name`` (atomically: a temporary file, then a rename)."""
        path = self._path(name, b)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({k: v.contiguous() for k, v in chunk.items()}, tmp)
        os.replace(tmp, path)


__all__ = ["Chunk", "ChunkCache", "batch_spans", "ids_digest", "shard"]
