"""Look at a label campaign and bring annotators' labels back into it.

    python tools/campaign.py status DIR
    python tools/campaign.py import DIR LABELS --config CONFIG [--overwrite]
    python tools/campaign.py export DIR --round N --to FOLDER

``import`` reads what annotators returned for the queried items: a folder of PNG label maps
(255 on unlabeled pixels) or a Label Studio JSON export for segmentation, a COCO json or a
Label Studio export for detection, a Label Studio export or a JSON ``{item: class}`` for
classification. Every label is checked first; if one
fails, nothing is recorded. A label identical to a recorded one is skipped; a different
label for a labeled item is refused unless ``--overwrite`` (the old one stays in the
history). ``export`` copies a round's outputs (queries, COCO json, Label Studio tasks).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from taskal.campaign.cli import quiet_third_party, run_tool

quiet_third_party()


def get_args_parser() -> argparse.ArgumentParser:
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="items per status and the rounds so far")
    status.add_argument("work_dir")
    imp = sub.add_parser("import", help="record labels returned by annotators")
    imp.add_argument("work_dir")
    imp.add_argument("labels", type=Path, help="a folder of masks, a COCO json or a JSON export")
    imp.add_argument("--config", required=True, help="the campaign's config")
    imp.add_argument("--cfg-options", nargs="+", action=DictAction, help="as for al_round.py")
    imp.add_argument("--overwrite", action="store_true", help="replace recorded labels")
    exp = sub.add_parser("export", help="copy a round's outputs for annotators")
    exp.add_argument("work_dir")
    exp.add_argument("--round", type=int, help="the round (default: the latest)")
    exp.add_argument("--to", type=Path, required=True, help="a new folder")
    return p


def status(work_dir: Path) -> dict[str, Any]:
    from taskal.campaign.store import DB_NAME, Campaign

    with Campaign.open(work_dir / DB_NAME) as campaign:
        counts, meta, rounds = campaign.counts(), campaign.meta(), campaign.rounds()
    print(
        f"campaign {work_dir}: {meta['task']} over {len(meta['classes'])} classes; items {counts}"
    )
    for row in rounds:
        shown = ", ".join(
            f"{k} {v:.4g}" for k, v in row.metrics.items() if isinstance(v, (int, float))
        )
        print(f"  round {row.round}: {row.state}, {row.strategy}, seed {row.seed} ({shown})")
    return counts


def import_labels(args: argparse.Namespace) -> list[str]:
    from taskal.campaign.settings import CampaignSettings, load_campaign_config
    from taskal.campaign.store import DB_NAME, Campaign, CampaignError, campaign_lock
    from taskal.campaign.tasks import task_kit

    cfg = load_campaign_config(args.config, args.cfg_options)
    settings = CampaignSettings.from_config(cfg.al.to_dict())
    kit = task_kit(cfg, settings)
    if not args.labels.exists():
        raise CampaignError(f"{args.labels} does not exist")
    if not (Path(args.work_dir) / DB_NAME).is_file():
        raise CampaignError(f"no campaign in {args.work_dir}; run tools/al_round.py to start one")
    with campaign_lock(args.work_dir), Campaign.open(Path(args.work_dir) / DB_NAME) as campaign:
        meta = campaign.meta()
        if meta["task"] != kit.task or meta["classes"] != kit.classes:
            raise CampaignError(
                f"{args.work_dir} is a {meta['task']} campaign over classes {meta['classes']}; "
                f"the config gives {kit.task} over {kit.classes}: import with the campaign's "
                "config"
            )
        if (busy := campaign.interrupted()) is not None:
            raise CampaignError(
                f"round {busy.round} is under way ({busy.state}); finish it (al_round.py "
                "--resume) before importing, so that it selects from the labels it started with"
            )
        pool = kit.pool(list(campaign.items().items()))
        labels = kit.read_labels(args.labels, pool, campaign.labels(), args.overwrite)
        if not labels:
            raise CampaignError(f"{args.labels} holds no labels; nothing was imported")
        done = campaign.record_labels(labels, str(args.labels), args.overwrite)
        counts = campaign.counts()
    skipped = len(labels) - len(done)
    print(
        f"[campaign] imported {len(done)} label(s) from {args.labels}"
        + (f" ({skipped} already recorded, skipped)" if skipped else "")
        + f"; items {counts}"
    )
    return done


def export(args: argparse.Namespace) -> Path:
    from taskal.campaign.store import DB_NAME, Campaign, CampaignError

    with Campaign.open(Path(args.work_dir) / DB_NAME) as campaign:
        done = [r.round for r in campaign.rounds() if r.state == "selected"]
    if not done:
        raise CampaignError("no round has finished yet; run tools/al_round.py")
    r = done[-1] if args.round is None else args.round
    if r not in done:
        raise CampaignError(f"round {r} has not finished; finished rounds: {done}")
    if args.to.exists():
        raise CampaignError(f"{args.to} exists; give a new folder")
    shutil.copytree(Path(args.work_dir) / "rounds" / f"round_{r:03d}" / "queries", args.to)
    print(f"[campaign] round {r}'s queries copied to {args.to}")
    return args.to


def main(args: argparse.Namespace) -> Any:
    if args.command == "status":
        return status(Path(args.work_dir))
    if args.command == "import":
        return import_labels(args)
    return export(args)


def run(argv: list[str] | None = None) -> int:
    return run_tool("campaign", main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
