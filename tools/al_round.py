"""Run one round of a label campaign: train (or load a checkpoint), score the unlabeled pool,
select what to label next, and write it out for annotators.

    python tools/al_round.py CONFIG --work-dir DIR --train
    python tools/al_round.py CONFIG --work-dir DIR --checkpoint model.pth --budget 20
    python tools/al_round.py CONFIG --work-dir DIR --train --resume   # finish a killed round
    torchrun --nproc-per-node 4 tools/al_round.py CONFIG --work-dir DIR --train  # score on 4

CONFIG is an OpenMMLab config (inheriting an upstream one through ``_base_``) with taskal's
``al`` block (see ``taskal/campaign/settings.py`` and ``configs/campaign/``). The campaign's
state lives in ``DIR/campaign.sqlite``; round N's outputs in ``DIR/rounds/round_NNN/queries/``
(``queries.json``, COCO json, Label Studio tasks, masks for segmentation, the resolved
config); the report in ``DIR/report.html``. Bring labels back with ``tools/campaign.py
import``; then run the next round.

Under ``torchrun`` rank 0 runs the round (training included) and the other ranks wait for
it, then every rank scores its share of the pool (gloo on CPU, NCCL on GPUs); the queries
are those of a single process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from taskal.campaign.cli import quiet_third_party, run_tool

quiet_third_party()


def get_args_parser() -> argparse.ArgumentParser:
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", help="the campaign config (an OpenMMLab config with an `al` block)")
    p.add_argument("--work-dir", required=True, help="the campaign's folder (created if new)")
    p.add_argument("--checkpoint", type=Path, help="score with these weights (no training)")
    p.add_argument("--train", action="store_true", help="train on the labeled set first")
    p.add_argument("--budget", type=float, help="what this round buys (overrides al.budget)")
    p.add_argument("--strategy", help="a registered strategy name (overrides al.strategy)")
    p.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        help="override config settings, key=value (e.g. al.seed=1 al.train.max_iters=50)",
    )
    p.add_argument("--resume", action="store_true", help="finish the interrupted round")
    p.add_argument(
        "--restart",
        action="store_true",
        help="start the interrupted round again with this config (its model is not reused)",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle --checkpoint fully (only for a file you trust: it can run code)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def main(args: argparse.Namespace) -> Any:
    from taskal import distributed
    from taskal.campaign.round import RoundOptions, release_workers, run_round, serve_round
    from taskal.campaign.settings import CampaignSettings, load_campaign_config
    from taskal.campaign.tasks import task_kit
    from taskal.registry import import_custom_modules

    cfg = load_campaign_config(args.config, args.cfg_options, args.budget, args.strategy)
    import_custom_modules(cfg)
    settings = CampaignSettings.from_config(cfg.al.to_dict())
    kit = task_kit(cfg, settings)
    work_dir = Path(args.work_dir)
    options = RoundOptions(
        train=args.train,
        checkpoint=args.checkpoint,
        trust_checkpoint=args.trust_checkpoint,
        resume=args.resume,
        restart=args.restart,
        progress=not args.no_progress,
    )
    if distributed.launch_rank() != 0:  # torchrun: score what rank 0 hands over
        serve_round(kit, settings)
        return None
    try:
        result = run_round(kit, settings, cfg.pretty_text, work_dir, options)
    finally:
        release_workers()
    counts = result.counts
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if k not in ("cost",))
    print(
        f"[al_round] round {result.round}: {len(result.queries)} queries in {result.out_dir} "
        f"({shown}); items: {counts}"
    )
    print(f"[al_round] report: {result.report}")
    return result


def run(argv: list[str] | None = None) -> int:
    return run_tool("al_round", main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
