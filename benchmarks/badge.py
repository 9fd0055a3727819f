"""Time and peak memory of BADGE seeding (k-means++ on gradient embeddings) at scale.

Inputs stand in for a classifier's pool outputs: ``--d``-dim embeddings from a Gaussian
mixture (``--clusters`` means drawn from N(0, I_D), members spread by ``--spread``), and
probabilities ``softmax(emb @ W)`` from a random linear head ``W ~ N(0, gain^2 / D)`` over
``--classes`` classes (``--gain 3``: median top probability about 0.56, 5 % below 0.25 and
5 % above 0.97, every class predicted). Float64, as ``badge_select`` uses. Each variant runs
in its own process so peak RSS is its own:

* ``pruned``: today's :func:`taskal.functional.badge_select` (gradient factors, then the
  pruned :func:`~taskal.functional.kmeanspp.kmeans_pp`: triangle inequality on groups of
  points around their seed, a one-factor Cauchy-Schwarz bound, exact rows for the rest);
* ``plain``: the seeding before pruning, the reference: the same factors, the distance
  ``||g_i||^2 + ||g_j||^2 - 2 (a @ a_j)(h @ h_j)`` and the plain loop, one full ``N``-row
  pass per pick (BLAS matrix-vector products). Its picks should be the same (the two
  round the dot products differently, so a D^2 draw could in principle flip at a
  boundary; the script says whether they agree);
* ``textbook`` (``--textbook-n``): the ``[N, C (D + 1)]`` gradient embedding materialized
  and k-means++ on it; 100k x 100 x 513 float64 would be 41 GB, so it runs at
  ``--textbook-n`` points and ``N / 10`` picks, with ``pruned`` and ``plain`` again at that
  size for the ratio.

The script prints each variant's seconds, picks/s and peak memory (the process's peak RSS
while the variant runs, reset once the inputs exist, and its growth over the RSS then) and
the ratios ``plain / pruned``.

    python benchmarks/badge.py        # N=100000 C=100 D=512, 1000 picks, pruned and plain
    python benchmarks/badge.py --spread 0.2 --textbook-n 1000
    python benchmarks/badge.py --n 20000 --no-reference   # pruned only

Unless set, ``OMP_WAIT_POLICY=PASSIVE`` is put in the variants' environment: the pick loop
runs many small tensor ops, and on a shared machine busy-waiting OpenMP workers otherwise
steal the cores it runs on.
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


def make_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities ``[N, C]`` and embeddings ``[N, D]``, float64, filled chunk by chunk."""
    g = torch.Generator().manual_seed(args.seed)
    means = torch.randn(args.clusters, args.d, generator=g, dtype=torch.float64)
    head = torch.randn(args.d, args.classes, generator=g, dtype=torch.float64)
    head *= args.gain / args.d**0.5
    emb = torch.empty(args.n, args.d, dtype=torch.float64)
    probs = torch.empty(args.n, args.classes, dtype=torch.float64)
    for r0 in range(0, args.n, 65536):
        rows = emb[r0 : r0 + 65536]
        comp = torch.randint(args.clusters, (rows.shape[0],), generator=g)
        torch.randn(rows.shape, generator=g, dtype=torch.float64, out=rows)
        rows.mul_(args.spread).add_(means[comp])
        torch.softmax(rows @ head, 1, out=probs[r0 : r0 + 65536])
    return probs, emb


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    from taskal import functional as F

    probs, emb = make_data(args)
    reset_peak()  # so the data generation's temporaries do not count as the variant's
    base = status_mb("VmRSS") or peak_mb()
    info: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    if args.variant == "pruned":  # badge_select, step by step to collect the statistics
        a, h = F.gradient_factors(probs, emb)
        dists = F.gradient_sq_dists_to(a, h)
        stats = F.KMeansPPStats()
        first = int(dists.sq_norm_N.argmax())
        picks = F.kmeans_pp(dists, args.n, args.picks, first, gen, stats=stats).tolist()
        info = {
            "read_fraction": stats.read_fraction,
            "screened_fraction": stats.rows_screened / max(1, stats.updates * args.n),
            "groups_scanned_per_update": stats.groups_scanned / max(1, stats.updates),
        }
    elif args.variant == "plain":  # taskal's badge_select before pruning, verbatim
        a, h = F.gradient_factors(probs, emb)
        sq = (a * a).sum(1) * (h * h).sum(1)

        def dist_to(j: int) -> torch.Tensor:
            cross = (a @ a[j]) * (h @ h[j])
            return (sq + sq[j] - 2.0 * cross).clamp_min(0.0)

        picks = F.kmeans_pp(dist_to, args.n, args.picks, int(sq.argmax()), gen).tolist()
    elif args.variant == "textbook":  # the [N, C (D + 1)] embedding, materialized
        a, h = F.gradient_factors(probs, emb)
        g_NE = (a[:, :, None] * h[:, None, :]).flatten(1)
        del a, h
        sq = (g_NE * g_NE).sum(1)

        def dist_to(j: int) -> torch.Tensor:
            return (g_NE - g_NE[j]).pow_(2).sum(1)

        picks = F.kmeans_pp(dist_to, args.n, args.picks, int(sq.argmax()), gen).tolist()
    else:
        raise SystemExit(f"unknown variant {args.variant}")
    seconds = time.perf_counter() - start
    peak = peak_mb()
    top = probs.max(1).values
    quant = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    return {
        "seconds": seconds,
        "peak_mb": peak,
        "growth_mb": peak - base,
        "data_mb": base,
        "picks": picks,
        "top_prob_quantiles": top.quantile(quant).tolist(),
        "classes_predicted": int(probs.argmax(1).unique().numel()),
        **info,
    }


def _run(args: argparse.Namespace, variant: str, n: int, picks: int) -> dict[str, Any]:
    env = {**os.environ}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, __file__, "--variant", variant, "--n", str(n), "--picks", str(picks)]
    for name in ("classes", "d", "clusters", "spread", "gain", "seed"):
        cmd += [f"--{name}", str(getattr(args, name))]
    r = run_json(cmd, env)
    print(
        f"{variant:<9} N={n:<7} {r['seconds']:>8.2f} s  {picks / r['seconds']:>7.1f} picks/s  "
        f"peak RSS {r['peak_mb']:>7.0f} MB  growth {r['growth_mb']:>7.1f} MB "
        f"(RSS before: {r['data_mb']:.0f} MB, torch and inputs)",
        flush=True,
    )
    return r


def _compare(results: dict[str, dict[str, Any]], tag: str) -> None:
    mine = results["pruned"]
    print(
        f"{tag}pruned: full rows read per update {mine['read_fraction']:.4f} of N on average, "
        f"one-factor bound evaluated on {mine['screened_fraction']:.4f} of N, "
        f"groups scanned per update {mine['groups_scanned_per_update']:.1f}"
    )
    for ref, r in results.items():
        if ref == "pruned":
            continue
        same = r["picks"] == mine["picks"]
        first_diff = next(
            (i for i, (a, b) in enumerate(zip(r["picks"], mine["picks"], strict=True)) if a != b),
            None,
        )
        print(
            f"{tag}vs {ref}: time ratio {ref}/pruned = {r['seconds'] / mine['seconds']:.2f}x, "
            f"peak RSS ratio pruned/{ref} = {mine['peak_mb'] / r['peak_mb']:.3f}, growth "
            f"pruned {mine['growth_mb']:.0f} MB vs {r['growth_mb']:.0f} MB, picks identical: "
            f"{same}" + ("" if same else f" (first differ at pick {first_diff})")
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--picks", type=int, default=1_000)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--spread", type=float, default=1.0)
    p.add_argument("--gain", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the plain loop (the seeding before pruning)",
    )
    p.add_argument(
        "--textbook-n",
        type=int,
        default=0,
        help="also run the materialized-embedding reference at this N (0: skip)",
    )
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    policy = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    print(f"{machine()}; variants run with OMP_WAIT_POLICY={policy}")
    print(
        f"N={args.n} C={args.classes} D={args.d} picks={args.picks} clusters={args.clusters} "
        f"spread={args.spread} gain={args.gain} seed={args.seed} float64"
    )
    results = {"pruned": _run(args, "pruned", args.n, args.picks)}
    q = results["pruned"]["top_prob_quantiles"]
    print(
        f"inputs: top probability 5/50/95 % quantiles {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}, "
        f"{results['pruned']['classes_predicted']} classes predicted"
    )
    if args.reference:
        results["plain"] = _run(args, "plain", args.n, args.picks)
    _compare(results, "")
    if args.textbook_n:
        n, k = args.textbook_n, min(args.picks, max(1, args.textbook_n // 10))
        small = {v: _run(args, v, n, k) for v in ("pruned", "plain", "textbook")}
        _compare(small, f"[N={n}, {k} picks] ")


if __name__ == "__main__":
    main()
