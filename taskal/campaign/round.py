"""One round of a label campaign: train (or load a checkpoint), score the pool, select,
export for annotators, record, report.

A round moves through states recorded in the campaign database, each in one transaction:
``started`` (config, strategy and seed fixed), ``trained`` (the checkpoint written
atomically), ``selected`` (queries recorded with their outputs in place). A process killed
anywhere leaves the last state; ``--resume`` continues from it (a trained model is loaded,
not retrained) and, with the same seed, selects the same queries. Outputs are written into a
temporary folder and renamed into ``rounds/round_NNN/`` before the queries are recorded, so
a recorded round always has its outputs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from taskal.campaign.labelstudio import labeling_config
from taskal.campaign.report import RoundSummary, write_report
from taskal.campaign.settings import CampaignSettings
from taskal.campaign.store import DB_NAME, WHOLE, Campaign, CampaignError, QueryRow
from taskal.campaign.tasks import TaskKit
from taskal.checkpoints import save_weights
from taskal.data.images import ImagePool
from taskal.functional.agreement import cohen_kappa
from taskal.queries import LabelState, Query
from taskal.rounds import mix_seed, select_round, train_seed
from taskal.selector import build_strategy
from taskal.strategies.base import QueryStrategy
from taskal.types import ItemId

#: test hook: the process kills itself with SIGKILL when it reaches this named point
KILL_AT_ENV = "TASKAL_KILL_AT"
REPORT = "report.html"


def _say(options: RoundOptions, message: str) -> None:
    if options.progress:
        print(f"[al_round] {message}", file=sys.stderr, flush=True)


def _maybe_die(point: str) -> None:
    if os.environ.get(KILL_AT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class RoundOptions:
    """What the command line decides about a round."""

    train: bool = False
    checkpoint: Path | None = None
    trust_checkpoint: bool = False
    resume: bool = False
    restart: bool = False
    progress: bool = True


@dataclass
class RoundResult:
    round: int
    queries: list[QueryRow]
    out_dir: Path
    report: Path
    metrics: dict[str, Any]


def strategy_name(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    return str(spec.get("name") or spec.get("type"))


def open_campaign(kit: TaskKit, work_dir: Path, settings: CampaignSettings) -> Campaign:
    """The campaign in ``work_dir``, created from the config's data on first use; new images
    in the pool folder join it, and images it knows must still exist."""
    path = work_dir / DB_NAME
    if path.exists():
        campaign = Campaign.open(path)
        meta = campaign.meta()
        if meta.get("task") != kit.task or meta.get("classes") != kit.classes:
            campaign.close()
            raise CampaignError(
                f"{path} is a {meta.get('task')} campaign over classes {meta.get('classes')}; "
                f"the config gives {kit.task} over {kit.classes}: use another --work-dir"
            )
        known = campaign.items()
        missing = [k for k, p in known.items() if not Path(p).is_file()]
        if missing:
            campaign.close()
            raise CampaignError(
                f"{len(missing)} image(s) of the campaign are missing, e.g. {known[missing[0]]}; "
                "restore them"
            )
        campaign.add_items([f for f in kit.pool_files() if f[0] not in known])
        return campaign
    labeled, initial = kit.initial()
    files = dict(labeled)
    for key, p in kit.pool_files():
        if key in files and Path(files[key]).resolve() != Path(p).resolve():
            raise CampaignError(
                f"the labeled set and the pool both have an image named {key}; rename one"
            )
        files.setdefault(key, p)
    unlabeled = [k for k in files if k not in dict(labeled)]
    g = torch.Generator().manual_seed(mix_seed(settings.seed, 7))
    count = min(settings.stop_set, len(unlabeled) // 2)
    stop = [unlabeled[int(i)] for i in torch.randperm(len(unlabeled), generator=g)[:count]]
    meta = {"task": kit.task, "classes": kit.classes, "cost_unit": kit.cost_unit}
    source = "config training data"
    return Campaign.create(path, meta, list(files.items()), sorted(stop), initial, source)


def run_round(
    kit: TaskKit,
    campaign: Campaign,
    settings: CampaignSettings,
    config_text: str,
    work_dir: Path,
    options: RoundOptions,
) -> RoundResult:
    """Run (or, with ``options.resume``, finish) the campaign's next round."""
    strategy = _strategy(settings)
    interrupted = campaign.interrupted()
    given = None  # a given checkpoint is checked against the model before anything is recorded
    unstarted = interrupted is None or interrupted.state == "started" or options.restart
    checkpoint = options.checkpoint
    if unstarted and not options.train and checkpoint is not None and checkpoint.is_file():
        given = kit.load(checkpoint, strategy, options.trust_checkpoint)
    r = _begin(campaign, settings, config_text, options)
    round_dir = work_dir / "rounds" / f"round_{r:03d}"
    round_dir.mkdir(parents=True, exist_ok=True)
    _maybe_die("started")
    files = campaign.items()
    pool = kit.pool(list(files.items()))
    if given is not None:
        assert options.checkpoint is not None
        campaign.mark_trained(r, str(options.checkpoint), 0.0)
        adapter = given
    else:
        adapter = _model(kit, campaign, r, round_dir, pool, strategy, options, settings.seed)
    _maybe_die("trained")
    metrics: dict[str, Any] = dict(kit.evaluate(adapter))
    stop_ids = campaign.stop_set()
    stop_preds = kit.stop_predictions(adapter, pool, stop_ids) if stop_ids else None
    previous = next((x for x in reversed(campaign.rounds()) if x.round < r), None)
    if stop_preds is not None and previous is not None and previous.stop_predictions:
        old = np.load(io.BytesIO(previous.stop_predictions))
        metrics["kappa"] = cohen_kappa(
            torch.from_numpy(old.astype(np.int64)),
            torch.from_numpy(stop_preds.astype(np.int64)),
            kit.stop_values,
        )
    t0 = time.perf_counter()
    selectable = pool.subset([k for k in files if k not in set(stop_ids)])
    _say(options, f"round {r}: scoring the pool ({strategy_name(settings.strategy)})")
    queries, pool_scores = select_round(
        adapter,
        strategy,
        selectable,
        _taken(campaign, settings.query),
        settings.budget,
        settings.seed,
        r,
        query=settings.query,
        batch_size=settings.batch_size,
        progress=options.progress,
        options=settings.region_caps if settings.query == "region" else None,
    )
    select_seconds = time.perf_counter() - t0
    rows = [
        QueryRow(
            r,
            rank,
            str(q.item),
            WHOLE if q.region is None else int(q.region),
            q.score,
            q.cost,
            q.box,
        )
        for rank, q in enumerate(queries)
    ]
    out_dir = _write_outputs(kit, round_dir, queries, rows, pool, adapter, config_text)
    _maybe_die("exported")
    labeled = sum(1 for s in campaign.statuses().values() if s in ("labeled", "partial"))
    spent = sum(q.cost for q in campaign.queries()) + sum(q.cost for q in queries)
    metrics.update(labeled=labeled, cost=float(spent))
    gallery = kit.gallery(queries, pool, adapter)
    counts = kit.batch_classes(queries, pool, adapter)
    shown = pool_scores if pool_scores is not None else torch.tensor([q.score for q in queries])
    scores = shown.double().numpy()
    campaign.finish_round(r, rows, select_seconds, metrics, _npy(stop_preds))
    _maybe_die("selected")
    report = write_campaign_report(campaign, work_dir, scores, counts, gallery, kit)
    return RoundResult(r, rows, out_dir, report, metrics)


def _strategy(settings: CampaignSettings) -> QueryStrategy:
    try:
        return build_strategy(settings.strategy)
    except (KeyError, ValueError, TypeError) as err:
        message = str(err.args[0]) if err.args else str(err)
        raise CampaignError(f"strategy {settings.strategy!r}: {message}") from None


def _begin(
    campaign: Campaign, settings: CampaignSettings, config_text: str, options: RoundOptions
) -> int:
    """The round to run: the interrupted one with ``resume``, else a new one, started."""
    interrupted = campaign.interrupted()
    name = strategy_name(settings.strategy)
    if interrupted is not None and (interrupted.state == "started" or options.restart):
        # killed before its model existed (nothing of it but its row), or restarted on
        # request: it starts again with this run's settings
        _check_start(campaign, settings, options)
        r = interrupted.round
        campaign.restart_round(r, name, settings.seed, settings.budget, settings.query, config_text)
        return r
    if interrupted is not None and not options.resume:
        raise CampaignError(
            f"round {interrupted.round} was interrupted ({interrupted.state}); run again with "
            "--resume to finish it, or with --restart to start it again"
        )
    if interrupted is not None:
        if interrupted.config != config_text:
            raise CampaignError(
                f"the config differs from the one round {interrupted.round} started with; "
                "resume with the same config, or pass --restart to start the round again with "
                "this one"
            )
        return interrupted.round
    if options.resume or options.restart:
        raise CampaignError(
            f"nothing to resume or restart: every round is finished; run without --resume or "
            f"--restart to start round "
            f"{campaign.next_round()}"
        )
    _check_start(campaign, settings, options)
    r = campaign.next_round()
    campaign.start_round(r, name, settings.seed, settings.budget, settings.query, config_text)
    return r


def _check_start(campaign: Campaign, settings: CampaignSettings, options: RoundOptions) -> None:
    if not options.train and options.checkpoint is None:
        raise CampaignError("give --checkpoint CKPT to score with a trained model, or --train")
    if options.checkpoint is not None and not options.checkpoint.is_file():
        raise CampaignError(f"checkpoint {options.checkpoint} does not exist")
    _check_budget(campaign, settings)


def _check_budget(campaign: Campaign, settings: CampaignSettings) -> None:
    if settings.query != "item":
        return
    stop = set(campaign.stop_set())
    left = sum(1 for k, s in campaign.statuses().items() if s == "unlabeled" and k not in stop)
    if settings.budget > left:
        raise CampaignError(
            f"the budget ({int(settings.budget)}) is larger than the {left} image(s) left to "
            "query; lower --budget"
        )


def _model(
    kit: TaskKit,
    campaign: Campaign,
    r: int,
    round_dir: Path,
    pool: ImagePool,
    strategy: QueryStrategy,
    options: RoundOptions,
    seed: int,
) -> Any:
    """Round ``r``'s adapter: trained (or reloaded after an interruption), or loaded."""
    row = next(x for x in campaign.rounds() if x.round == r)
    if row.state == "trained" and row.checkpoint:
        # the checkpoint this round recorded: written by taskal, or given by the user
        trusted = options.trust_checkpoint or row.checkpoint == str(round_dir / "model.pth")
        return kit.load(Path(row.checkpoint), strategy, trusted)
    if not options.train:
        assert options.checkpoint is not None
        adapter = kit.load(options.checkpoint, strategy, options.trust_checkpoint)
        campaign.mark_trained(r, str(options.checkpoint), 0.0)
        return adapter
    t0 = time.perf_counter()
    labels = campaign.labels()
    _say(options, f"round {r}: training on {len(labels)} labeled images")
    work = round_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    adapter = kit.train(pool, labels, work, train_seed(seed, r), strategy)
    path = round_dir / "model.pth"
    save_weights(kit.trained_module(adapter), path, {"round": r, "task": kit.task})
    campaign.mark_trained(r, str(path), time.perf_counter() - t0)
    return adapter


def _taken(campaign: Campaign, query: str) -> list[ItemId] | LabelState:
    """What selection must skip: labeled items, and items (or regions) already queried."""
    status = campaign.statuses()
    if query == "item":
        return [k for k, s in status.items() if s != "unlabeled"]
    state = LabelState(full={k for k, s in status.items() if s == "labeled"})
    for q in campaign.queries():
        if q.region == WHOLE:
            state.full.add(q.item)
        else:
            state.partial.setdefault(q.item, set()).add(q.region)
    return state


def _write_outputs(
    kit: TaskKit,
    round_dir: Path,
    queries: Sequence[Query],
    rows: Sequence[QueryRow],
    pool: ImagePool,
    adapter: Any,
    config_text: str,
) -> Path:
    """Write the round's outputs into a temporary folder, then rename it into place."""
    out, tmp = round_dir / "queries", round_dir / ".queries.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kit.export(tmp, queries, pool, adapter)
    (tmp / "label_studio_config.xml").write_text(labeling_config(kit.task, kit.classes))
    (tmp / "config.py").write_text(config_text)
    listing = [
        {"rank": q.rank, "item": q.item, "region": None if q.region == WHOLE else q.region}
        | {"score": q.score if np.isfinite(q.score) else None, "cost": q.cost, "box": q.box}
        for q in rows
    ]
    (tmp / "queries.json").write_text(json.dumps(listing, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _npy(array: np.ndarray | None) -> bytes | None:
    if array is None:
        return None
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_campaign_report(
    campaign: Campaign,
    work_dir: Path,
    scores: np.ndarray,
    counts: dict[str, int],
    gallery: list[Any],
    kit: TaskKit,
) -> Path:
    """``<work_dir>/report.html`` from the recorded rounds and the latest round's data."""
    summaries = []
    for row in campaign.rounds():
        if row.state != "selected":
            continue
        m = row.metrics
        name = next((k for k in ("mIoU", "mAP", "accuracy") if k in m), None)
        summaries.append(
            RoundSummary(
                round=row.round,
                strategy=row.strategy,
                labeled=int(m.get("labeled", 0)),
                cost=m.get("cost"),
                metric=None if name is None else float(m[name]),
                metric_name=name,
                kappa=m.get("kappa"),
            )
        )
    finite = scores[np.isfinite(scores)]
    return write_report(
        work_dir / REPORT,
        title=f"taskal campaign: {work_dir.name}",
        task=kit.task,
        rounds=summaries,
        scores=finite,
        batch_class_counts=counts,
        gallery=gallery,
        cost_unit=kit.cost_unit,
    )


__all__ = [
    "KILL_AT_ENV",
    "RoundOptions",
    "RoundResult",
    "open_campaign",
    "run_round",
    "write_campaign_report",
]
