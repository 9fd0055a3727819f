"""What a strategy picks after one round: class histogram of its picks, and for LLAL how
well predicted losses rank the true ones (Spearman ρ) on the unlabeled pool.

    python tools/pick_diagnostics.py --strategies llal entropy random --labeled 60
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "cls" / "digits_smallcnn.py"))
    p.add_argument("--strategies", nargs="+", default=["llal", "entropy", "random"])
    p.add_argument("--labeled", type=int, default=60, help="random labeled set size")
    p.add_argument("--budget", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    from mmengine.config import Config
    from scipy.stats import spearmanr

    from taskal.data import split_pool
    from taskal.registry import DATASETS, build
    from taskal.selector import Selector
    from taskal.simulation import Simulation, SimulationConfig

    cfg = Config.fromfile(args.config)
    data = build(DATASETS, dict(cfg.dataset))
    pool, test = split_pool(data, cfg.get("test_fraction", 0.25), seed=0)
    al = {k: v for k, v in cfg.al.items() if k != "strategies"}
    sim_cfg = SimulationConfig(
        strategies=list(args.strategies),
        model=dict(cfg.model),
        adapter=dict(cfg.get("adapter", {"type": "classification"})),
        train=dict(cfg.train),
        progress=False,
        **dict(al, initial=args.labeled),
    )
    sim = Simulation(sim_cfg, pool, test)
    labeled = sim.initial_labeled(args.seed)
    report: dict[str, Any] = {}
    for label, strategy in sim.strategies:
        adapter = sim.train(strategy, labeled, args.seed, 0)
        queries = Selector(strategy, progress=False).select(
            adapter, pool, labeled, args.budget, torch.Generator().manual_seed(args.seed)
        )
        picks = [q.item for q in queries]
        counts = torch.bincount(pool.take(picks).targets, minlength=10).tolist()
        line = f"{label:<12} picks per class {counts}"
        report[label] = {"class_counts": counts}
        if "loss_pred" in strategy.needs:
            rest = pool.take([i for i in pool.ids if i not in set(labeled)])
            rho = spearmanr(
                adapter.predict_loss(rest).numpy(), adapter.per_sample_loss(rest).numpy()
            )
            report[label]["spearman"] = float(rho.statistic)
            line += f"; Spearman(predicted, true loss) = {rho.statistic:.2f}"
        print(line)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
