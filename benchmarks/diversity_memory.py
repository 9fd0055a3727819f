"""Peak memory and time of taskal's core-set and BADGE against the textbook versions.

The references build what taskal avoids: core-set from a full ``N x N`` distance matrix,
BADGE from explicit ``[N, C x D]`` gradient embeddings. Each variant runs in its own
process so peak RSS is its own; the script prints taskal / reference ratios.

    python benchmarks/diversity_memory.py            # N=12000, C=10, D=256, k=100
    python benchmarks/diversity_memory.py --n 20000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _data(n: int, c: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, c, generator=g).softmax(1), torch.randn(n, d, generator=g)


def run_variant(name: str, n: int, c: int, d: int, k: int) -> dict[str, float]:
    from taskal import functional as F

    probs, emb = _data(n, c, d)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if name == "coreset":
        F.k_center_greedy(F.sq_dists_to(emb), n, k, None, torch.Generator().manual_seed(0))
    elif name == "coreset_reference":
        dist = torch.cdist(emb, emb).pow(2)  # the N x N matrix
        picks = [0]
        min_d = dist[0].clone()
        for _ in range(k - 1):
            j = int(min_d.argmax())
            picks.append(j)
            min_d = torch.minimum(min_d, dist[j])
    elif name == "badge":
        F.badge_select(probs, emb, k, torch.Generator().manual_seed(0))
    elif name == "badge_reference":
        a, h = F.gradient_factors(probs, emb)
        g_emb = (a[:, :, None] * h[:, None, :]).flatten(1)  # [N, C x (D+1)]
        F.kmeans_pp(F.sq_dists_to(g_emb), n, k, 0, torch.Generator().manual_seed(0))
    else:
        raise SystemExit(f"unknown variant {name}")
    seconds = time.perf_counter() - start
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"seconds": seconds, "peak_mb": peak_mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=12_000)
    p.add_argument("--c", type=int, default=10)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.n, args.c, args.d, args.k)))
        return
    results = {}
    for variant in ("coreset", "coreset_reference", "badge", "badge_reference"):
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--n",
            str(args.n),
            "--c",
            str(args.c),
            "--d",
            str(args.d),
            "--k",
            str(args.k),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    print(f"N={args.n} C={args.c} D={args.d} k={args.k}")
    print(f"{'variant':<20}{'seconds':>10}{'peak MB':>10}")
    for name, r in results.items():
        print(f"{name:<20}{r['seconds']:>10.3f}{r['peak_mb']:>10.1f}")
    for ours in ("coreset", "badge"):
        ref = results[f"{ours}_reference"]
        mine = results[ours]
        print(
            f"{ours}: memory ratio taskal/reference = "
            f"{max(mine['peak_mb'], 0.1) / max(ref['peak_mb'], 0.1):.3f}, "
            f"time ratio = {mine['seconds'] / ref['seconds']:.3f}"
        )


if __name__ == "__main__":
    main()
