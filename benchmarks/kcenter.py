"""Time and peak memory of pruned k-center greedy (core-set) against unpruned references.

Features are a Gaussian mixture standing in for embeddings: ``--clusters`` component means
drawn from N(0, I_D), members spread by ``--spread`` around them; ``--labeled`` more points
from the same mixture are the labeled (initial) centers. Each variant runs in its own
process so peak RSS is its own:

* ``pruned``: :func:`taskal.functional.diversity.k_center_greedy_features`;
* ``plain``: the plain ``O(N)``-memory loop, :func:`k_center_greedy` on the same distance
  function (one full ``N``-row pass per pick): its picks must be identical;
* ``cdist``: the textbook reference, the full ``N x N`` matrix ``torch.cdist(x, x) ** 2``
  (and ``N x L`` to the labeled points) with the same farthest-first loop and tie-breaking.
  In float64 its picks match too; in float32 its different rounding of the distances may
  flip near-ties, so only ``plain`` is the exactness check there.

The script prints each variant's seconds and peak memory (the process's peak RSS while the
variant runs, reset once the features exist, and its growth over the RSS at that point) and
the ratios ``reference / pruned``. Every variant runs ``--runs`` times (5), each in a fresh
process; its time is the fastest run's (the least disturbed by other work on the machine),
its memory the largest, and all its runs must pick the same points. With ``--device cuda``
the features are moved to the GPU before the clock starts, every variant runs there
(synchronised before the clock stops), and the peak is the GPU memory allocated by torch
beyond the features.

    python benchmarks/kcenter.py          # N=20000 D=512 1000 picks float64, all variants
    python benchmarks/kcenter.py --n 1000000 --picks 10000 --labeled 1000 --clusters 1000 \\
        --dtype float32 --no-reference --runs 1    # the large run, pruned only
    python benchmarks/kcenter.py --device cuda    # the same on a GPU

Unless set, ``OMP_WAIT_POLICY=PASSIVE`` is put in the variants' environment: the pick loop
runs many small tensor ops, and on a shared machine busy-waiting OpenMP workers otherwise
steal the cores it runs on (10x slower on a loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch
from _common import machine, peak_mb, reset_peak, run_json, status_mb


def make_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features ``[N, D]`` and labeled ``[L, D]`` (or None), filled chunk by chunk."""
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(args.seed)
    means = torch.randn(args.clusters, args.d, generator=g, dtype=dtype)

    def fill(out: torch.Tensor) -> torch.Tensor:
        for r0 in range(0, out.shape[0], 65536):
            rows = out[r0 : r0 + 65536]
            comp = torch.randint(args.clusters, (rows.shape[0],), generator=g)
            torch.randn(rows.shape, generator=g, dtype=dtype, out=rows)
            rows.mul_(args.spread).add_(means[comp])
        return out

    x = fill(torch.empty(args.n, args.d, dtype=dtype))
    labeled = fill(torch.empty(args.labeled, args.d, dtype=dtype)) if args.labeled else None
    return x, labeled


def _farthest_first(min_d: torch.Tensor, rows: Any, k: int, g: torch.Generator) -> list[int]:
    """The plain loop's farthest-first with its generator protocol, rows from a matrix."""
    n, dev = min_d.shape[0], min_d.device
    picks: list[int] = []
    if torch.isinf(min_d).all():  # nothing labeled: random first pick
        first = int(torch.randint(n, (1,), generator=g))
        min_d = rows(first).clone()
        picks.append(first)
    priority = torch.rand(n, generator=g).to(dev)
    chosen = torch.zeros(n, dtype=torch.bool, device=dev)
    chosen[picks] = True
    while len(picks) < k:
        masked = min_d.masked_fill(chosen, -1.0)
        j = int(torch.where(masked == masked.max(), priority, -1.0).argmax())
        picks.append(j)
        chosen[j] = True
        min_d = torch.minimum(min_d, rows(j))
    return picks


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    from taskal.functional import diversity as D

    x, labeled = make_data(args)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        x = x.to(dev)
        labeled = labeled.to(dev) if labeled is not None else None
        torch.cuda.synchronize(dev)
        gpu_base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    reset_peak()  # so the data generation's temporaries do not count as the variant's
    base = status_mb("VmRSS") or peak_mb()
    info: dict[str, Any] = {}
    start = time.perf_counter()
    if args.variant == "pruned":
        stats = D.KCenterStats()
        picks = D.k_center_greedy_features(
            x, args.picks, labeled, torch.Generator().manual_seed(args.seed), stats=stats
        ).tolist()
        info = {
            "read_fraction": stats.read_fraction,
            "rows_read": stats.rows_read,
            "updates": stats.updates,
            "groups_scanned_per_update": stats.groups_scanned / max(1, stats.updates),
            "entries_scanned_per_update": stats.entries_scanned / max(1, stats.updates),
            "rows_screened": stats.rows_screened,
            "screen": stats.screen,
            "batches": stats.batches,
            "refreshed": stats.refreshed,
        }
    elif args.variant == "plain":
        dist = D.sq_dists_to(x)
        init = D.min_sq_dists(x, labeled) if labeled is not None else None
        picks = D.k_center_greedy(
            lambda j: dist(j), args.n, args.picks, init, torch.Generator().manual_seed(args.seed)
        ).tolist()
    elif args.variant == "cdist":
        full = torch.cdist(x, x).pow_(2)  # the N x N matrix
        if labeled is not None:
            init = torch.cdist(x, labeled).pow_(2).amin(1)
        else:
            init = torch.full((args.n,), float("inf"), dtype=x.dtype, device=dev)
        g = torch.Generator().manual_seed(args.seed)
        picks = _farthest_first(init, lambda j: full[j], args.picks, g)
    else:
        raise SystemExit(f"unknown variant {args.variant}")
    if cuda:
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    peak = peak_mb()
    out = {"seconds": seconds, "peak_mb": peak, "growth_mb": peak - base, "data_mb": base}
    if cuda:  # the memory that matters is the GPU's: peak beyond the features
        gpu_peak = torch.cuda.max_memory_allocated(dev) / 2**20
        out = {"seconds": seconds, "peak_mb": gpu_peak, "growth_mb": gpu_peak - gpu_base / 2**20}
        out["data_mb"] = gpu_base / 2**20
    return {**out, "picks": picks, **info}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--picks", type=int, default=1_000)
    p.add_argument("--labeled", type=int, default=0)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--spread", type=float, default=0.2)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda: where every variant runs"
    )
    p.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the plain loop and the full-matrix cdist reference",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=5,
        help="processes per variant: the fastest one's time, the largest peak memory",
    )
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    variants = ["pruned", "plain", "cdist"] if args.reference else ["pruned"]
    env = {**os.environ}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    print(f"{machine()}; variants run with OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}")
    print(
        f"N={args.n} D={args.d} picks={args.picks} labeled={args.labeled} "
        f"clusters={args.clusters} spread={args.spread} dtype={args.dtype} seed={args.seed} "
        f"device={args.device}; each variant run {args.runs} times, each in its own process"
    )
    if torch.device(args.device).type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device available")
        print(f"GPU {torch.cuda.get_device_name(torch.device(args.device))}; memory below: GPU")
    results: dict[str, dict[str, Any]] = {}
    mem = "GPU" if torch.device(args.device).type == "cuda" else "RSS"
    for variant in variants:
        cmd = [sys.executable, __file__, "--variant", variant]
        for name in ("n", "d", "picks", "labeled", "clusters", "spread", "dtype", "seed", "device"):
            cmd += [f"--{name}", str(getattr(args, name))]
        runs = [run_json(cmd, env) for _ in range(args.runs)]
        if any(run["picks"] != runs[0]["picks"] for run in runs):
            raise SystemExit(f"{variant}: runs of the same variant picked differently")
        # the fastest run's time (the least disturbed by other work), the largest memory
        r = {**min(runs, key=lambda run: run["seconds"])}
        r["peak_mb"] = max(run["peak_mb"] for run in runs)
        r["growth_mb"] = max(run["growth_mb"] for run in runs)
        results[variant] = r
        print(
            f"{variant:<8} {r['seconds']:>9.2f} s   peak {mem} {r['peak_mb']:>8.0f} MB   "
            f"growth {r['growth_mb']:>8.1f} MB ({mem} before: {r['data_mb']:.0f} MB, "
            + ("features)" if mem == "GPU" else "torch and features)"),
            flush=True,
        )
    mine = results["pruned"]
    print(
        f"pruned: {args.picks / mine['seconds']:.1f} picks/s, rows read per update "
        f"{mine['read_fraction']:.4f} of N on average ({mine['rows_read']} over "
        f"{mine['updates']} updates), groups scanned per update "
        f"{mine['groups_scanned_per_update']:.1f}, member entries scanned per update "
        f"{mine['entries_scanned_per_update']:.0f}, {mine['batches']} batches, "
        f"{mine['refreshed']} lazy points refreshed, bound rows read "
        f"per update {mine['rows_screened'] / max(1, mine['updates'] * args.n):.4f} of N ("
        + ("a float32 copy" if mine["screen"] else "the features themselves")
        + ")"
    )
    for ref in variants[1:]:
        r = results[ref]
        same = r["picks"] == mine["picks"]
        first_diff = next(
            (i for i, (a, b) in enumerate(zip(r["picks"], mine["picks"], strict=True)) if a != b),
            None,
        )
        print(
            f"vs {ref}: time ratio {ref}/pruned = {r['seconds'] / mine['seconds']:.1f}x, "
            f"peak {mem} ratio pruned/{ref} = {mine['peak_mb'] / r['peak_mb']:.3f}, "
            f"growth ratio pruned/{ref} = "
            f"{max(mine['growth_mb'], 0.1) / max(r['growth_mb'], 0.1):.4f}, "
            f"picks identical: {same}" + ("" if same else f" (first differ at pick {first_diff})")
        )


if __name__ == "__main__":
    main()
