"""Pool scoring across processes started by ``torchrun``.

Selection itself runs once per process on the gathered results and is deterministic, so
every rank returns the same queries; only the scoring (the forward passes) is split. Rank
``r`` of ``W`` scores the pool's batches ``r, r + W, r + 2W, ...`` (see
:mod:`taskal.streaming`). The process group is whatever the caller initialised; the tools
initialise it from torchrun's environment with :func:`init_from_env` (gloo on CPU, NCCL
when the process has a GPU).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

#: seconds a rank waits for the others (rank 0 may be training meanwhile); override with
#: the environment variable ``TASKAL_DIST_TIMEOUT``
DEFAULT_TIMEOUT_S = 24 * 3600


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes outputs: rank 0, or the only process."""
    return world()[0] == 0


def launched() -> bool:
    """Whether the environment says this process is one of several (torchrun's
    ``WORLD_SIZE`` above 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_rank() -> int:
    """This process's rank as torchrun's ``RANK`` gives it (0 for a single process), known
    before the process group is joined."""
    return int(os.environ.get("RANK", "0"))


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment; ``False`` (and nothing
    done) for a single process or a group that is already initialised.

    The backend is NCCL when CUDA is available (each rank takes GPU ``LOCAL_RANK``), gloo
    otherwise.
    """
    if not launched() or not dist.is_available() or dist.is_initialized():
        return False
    timeout = timedelta(seconds=float(os.environ.get("TASKAL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return True


def close() -> None:
    """Leave the process group (a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op for a single process)."""
    if world()[1] > 1:
        dist.barrier()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for a single process)."""
    size = world()[1]
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself for a single process)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


__all__ = [
    "all_gather",
    "barrier",
    "broadcast",
    "close",
    "init_from_env",
    "is_main",
    "launch_rank",
    "launched",
    "world",
]
