"""What the benchmark scripts share: the machine's description, peak memory, best-of timing.

Imported by the scripts in this folder (``python benchmarks/<script>.py`` puts the folder on
``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {os.cpu_count()} cores"


def machine() -> str:
    """The CPU, torch and its threads, the OpenMP settings and python, on one line."""
    import torch

    return (
        f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads "
        f"(OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', 'unset')}, OMP_WAIT_POLICY "
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}), python {platform.python_version()}"
    )


def run_json(cmd: Sequence[str], env: Mapping[str, str]) -> dict[str, Any]:
    """Run ``cmd`` (a variant in its own process, for its own peak RSS) and parse the JSON
    object on the last line of its output."""
    out = subprocess.run(list(cmd), check=True, capture_output=True, text=True, env=dict(env))
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB, if readable."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1]) / 1024  # kB
    except (OSError, StopIteration):
        return None


def reset_peak() -> bool:
    """Reset the kernel's peak RSS (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """The process's peak RSS in MB (since the last :func:`reset_peak`)."""
    hwm = status_mb("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The shortest of ``repeats`` timed calls of ``fn``, in seconds."""
    return best_of_interleaved([fn], repeats)[0]


def best_of_interleaved(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """The shortest of ``repeats`` timed calls of each of ``fns``, called in turn (``a, b,
    a, b, ...``) so that a machine whose speed drifts during the run (other jobs, memory
    reclaim) slows both alike rather than only the one timed later."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, own in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            own.append(time.perf_counter() - start)
    return [min(own) for own in times]
