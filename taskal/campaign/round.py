"""One round of a label campaign: train (or load a checkpoint), score the pool, select,
export for annotators, record, report.

A round moves through states recorded in the campaign database, each in one transaction:
``started`` (config, strategy and seed fixed), ``trained`` (the checkpoint written
atomically), ``selected`` (queries recorded with their outputs in place). A process killed
anywhere leaves the last state; ``--resume`` continues from it (a trained model is loaded,
not retrained) and, with the same seed, selects the same queries. Outputs are written into a
temporary folder and renamed into ``rounds/round_NNN/`` before the queries are recorded, so
a recorded round always has its outputs.

Scoring writes each batch's results to ``rounds/round_NNN/scores/`` as it goes, so a round
killed while scoring resumes there. Under ``torchrun`` rank 0 runs the round (the other
ranks never touch the campaign) and, once the model is ready, hands the other ranks what
to score (:func:`serve_round`): each scores its share of the pool and every rank selects
the same queries.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from taskal import distributed
from taskal.campaign.labelstudio import labeling_config
from taskal.campaign.report import RoundSummary, write_report
from taskal.campaign.settings import CampaignSettings
from taskal.campaign.store import (
    DB_NAME,
    WHOLE,
    Campaign,
    CampaignError,
    QueryRow,
    RoundRow,
    campaign_lock,
)
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
    counts: dict[str, int]  # items per status afterwards


def strategy_name(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    return str(spec.get("name") or spec.get("type"))


@dataclass
class _Plan:
    """What a run found before writing anything: the campaign (or what a new one would
    hold), the round to run and whether it starts now."""

    campaign: Campaign | None
    files: dict[str, str]  # every item of the campaign after this run: key -> path
    new_files: list[tuple[str, str]]  # pool images the campaign does not know yet
    initial: list[Any]  # a new campaign's labels
    stop: list[str]
    interrupted: RoundRow | None
    starts: bool  # a round starts (or restarts) now; False: --resume


def _existing(path: Path, kit: TaskKit) -> Campaign:
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
    return campaign


def _plan(kit: TaskKit, work_dir: Path, settings: CampaignSettings, options: RoundOptions) -> _Plan:
    """Read the campaign (or the config's data for a new one) and decide the round."""
    path = work_dir / DB_NAME
    if path.exists():
        campaign = _existing(path, kit)
        interrupted = campaign.interrupted()
        starts = interrupted is None or interrupted.state == "started" or options.restart
        files = campaign.items()
        # images that appeared in the pool join when a round starts, never on --resume
        new = [f for f in kit.pool_files() if f[0] not in files] if starts else []
        kit.check_keys([*files, *(k for k, _ in new)])
        return _Plan(campaign, {**files, **dict(new)}, new, [], [], interrupted, starts)
    labeled, initial = kit.initial()
    files = dict(labeled)
    for key, p in kit.pool_files():
        if key in files and Path(files[key]).resolve() != Path(p).resolve():
            raise CampaignError(
                f"the labeled set and the pool both have an image named {key}; rename one"
            )
        files.setdefault(key, p)
    kit.check_keys(list(files))
    unlabeled = [k for k in files if k not in dict(labeled)]
    g = torch.Generator().manual_seed(mix_seed(settings.seed, 7))
    count = min(settings.stop_set, len(unlabeled) // 2)
    stop = sorted(unlabeled[int(i)] for i in torch.randperm(len(unlabeled), generator=g)[:count])
    return _Plan(None, files, [], initial, stop, None, True)


def run_round(
    kit: TaskKit,
    settings: CampaignSettings,
    config_text: str,
    work_dir: Path,
    options: RoundOptions,
) -> RoundResult:
    """Run (or, with ``options.resume``, finish) the next round of the campaign in
    ``work_dir``, creating the campaign on first use. Every check that can fail on a user's
    mistake runs before the database is created or changed; one process at a time holds
    ``work_dir`` (:func:`~taskal.campaign.store.campaign_lock`)."""
    _check_options(options)
    strategy = _strategy(settings)
    kit.preflight()
    with campaign_lock(work_dir):
        plan = _plan(kit, work_dir, settings, options)
        try:
            given = _check(kit, plan, settings, config_text, options, strategy)
            campaign = _record_start(kit, plan, settings, config_text, work_dir)
        except BaseException:
            if plan.campaign is not None:
                plan.campaign.close()
            raise
        with campaign:
            return _finish(kit, campaign, settings, config_text, work_dir, options, strategy, given)


def _check_options(options: RoundOptions) -> None:
    if options.train and options.checkpoint is not None:
        raise CampaignError("give --train or --checkpoint, not both")
    if options.resume and options.restart:
        raise CampaignError("give --resume or --restart, not both")


def _check(
    kit: TaskKit,
    plan: _Plan,
    settings: CampaignSettings,
    config_text: str,
    options: RoundOptions,
    strategy: QueryStrategy,
) -> Any:
    """Refuse what would fail later; returns the adapter of a given checkpoint, if any."""
    if distributed.launched() and settings.query == "region":
        raise CampaignError(
            "region queries are scored by one process; run without torchrun, or set al.query='item'"
        )
    busy = plan.interrupted
    if busy is not None and not plan.starts and not options.resume:
        raise CampaignError(
            f"round {busy.round} was interrupted ({busy.state}); run again with --resume to "
            "finish it, or with --restart to start it again"
        )
    if busy is None and (options.resume or options.restart):
        nxt = 0 if plan.campaign is None else plan.campaign.next_round()
        raise CampaignError(
            "nothing to resume or restart: every round is finished; run without --resume or "
            f"--restart to start round {nxt}"
        )
    if busy is not None and not plan.starts:
        if busy.config != config_text:
            raise CampaignError(
                f"the config differs from the one round {busy.round} started with; resume with "
                "the same config, or pass --restart to start the round again with this one"
            )
        if options.checkpoint is not None and _resolved(options.checkpoint) != busy.checkpoint:
            raise CampaignError(
                f"round {busy.round} was scored with {busy.checkpoint}; resume without "
                "--checkpoint, or --restart with the new one"
            )
        return None
    if not options.train and options.checkpoint is None:
        raise CampaignError("give --checkpoint CKPT to score with a trained model, or --train")
    if options.checkpoint is not None and not options.checkpoint.is_file():
        raise CampaignError(f"checkpoint {options.checkpoint} does not exist")
    status, labeled = _statuses(plan)
    stop = set(plan.stop if plan.campaign is None else plan.campaign.stop_set())
    if settings.query == "item":
        left = sum(1 for k, s in status.items() if s == "unlabeled" and k not in stop)
        if settings.budget > left:
            raise CampaignError(
                f"the budget ({int(settings.budget)}) is larger than the {left} image(s) left "
                "to query; lower --budget"
            )
    if options.train and labeled < kit.min_labels:
        raise CampaignError(
            f"training needs at least {kit.min_labels} labeled image(s), the campaign has "
            f"{labeled}; import labels first (tools/campaign.py import)"
        )
    if options.checkpoint is not None:  # refused here if it does not fit the model
        return kit.load(options.checkpoint, strategy, options.trust_checkpoint)
    return None


def _statuses(plan: _Plan) -> tuple[dict[str, str], int]:
    """Every item's status after this run's new items join, and how many are labeled."""
    if plan.campaign is None:
        labeled_keys = {x.item for x in plan.initial}
        status = {k: "labeled" if k in labeled_keys else "unlabeled" for k in plan.files}
    else:
        status = {**plan.campaign.statuses(), **{k: "unlabeled" for k, _ in plan.new_files}}
    return status, sum(1 for s in status.values() if s in ("labeled", "partial"))


def _record_start(
    kit: TaskKit, plan: _Plan, settings: CampaignSettings, config_text: str, work_dir: Path
) -> Campaign:
    """Create the campaign if new and record the round's start (or nothing, on --resume)."""
    campaign = plan.campaign
    if campaign is None:
        meta = {"task": kit.task, "classes": kit.classes, "cost_unit": kit.cost_unit}
        campaign = Campaign.create(
            work_dir / DB_NAME,
            meta,
            list(plan.files.items()),
            plan.stop,
            plan.initial,
            "config training data",
        )
    if not plan.starts:
        return campaign
    name = strategy_name(settings.strategy)
    args = (name, settings.seed, settings.budget, settings.query, config_text)
    busy = plan.interrupted
    if busy is not None:
        old_scores = work_dir / "rounds" / f"round_{busy.round:03d}" / "scores"
        shutil.rmtree(old_scores, ignore_errors=True)  # another attempt's batches
        campaign.restart_round(busy.round, *args, new_items=plan.new_files)
    else:
        campaign.start_round(campaign.next_round(), *args, new_items=plan.new_files)
    return campaign


def _finish(
    kit: TaskKit,
    campaign: Campaign,
    settings: CampaignSettings,
    config_text: str,
    work_dir: Path,
    options: RoundOptions,
    strategy: QueryStrategy,
    given: Any,
) -> RoundResult:
    """Train or load, score, select, export and record the round under way."""
    busy = campaign.interrupted()
    assert busy is not None
    r = busy.round
    round_dir = work_dir / "rounds" / f"round_{r:03d}"
    round_dir.mkdir(parents=True, exist_ok=True)
    _maybe_die("started")
    files = campaign.items()
    pool = kit.pool(list(files.items()))
    if given is not None:
        assert options.checkpoint is not None
        campaign.mark_trained(r, _resolved(options.checkpoint), 0.0)
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
    job = _ScoringJob(
        round=r,
        checkpoint=_checkpoint_of(campaign, r, options),
        trusted=options.trust_checkpoint,
        files=list(files.items()),
        selectable=[k for k in files if k not in set(stop_ids)],
        taken=_taken(campaign, settings.query),
        scores_dir=str(round_dir / "scores"),
        config_digest=hashlib.sha256(config_text.encode()).hexdigest(),
    )
    _say(options, f"round {r}: scoring the pool ({strategy_name(settings.strategy)})")
    with _shared_scoring(job):
        queries, pool_scores = _select(kit, settings, strategy, adapter, job, options.progress)
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
    labeled = sum(1 for s in campaign.statuses().values() if s in ("labeled", "partial"))
    spent = sum(q.cost for q in campaign.queries()) + sum(q.cost for q in queries)
    metrics.update(labeled=labeled, cost=float(spent))
    shown = pool_scores if pool_scores is not None else torch.tensor([q.score for q in queries])
    report = _Report(
        scores=shown.double().numpy(),
        counts=kit.batch_classes(queries, pool, adapter),
        gallery=kit.gallery(queries, pool, adapter),
        current=_summary(r, strategy_name(settings.strategy), metrics),
    )
    out_dir = _write_outputs(
        kit, round_dir, queries, rows, pool, adapter, config_text, report, campaign
    )
    _maybe_die("exported")
    campaign.finish_round(r, rows, select_seconds, metrics, _npy(stop_preds))
    shutil.rmtree(job.scores_dir, ignore_errors=True)  # only a resumed round needs them
    _maybe_die("selected")
    latest = write_campaign_report(campaign, work_dir / REPORT, report, kit)
    return RoundResult(r, rows, out_dir, latest, metrics, campaign.counts())


@dataclass
class _ScoringJob:
    """What selection needs beyond the config: rank 0 sends it to the other ranks."""

    round: int
    checkpoint: str  # the weights every rank scores with
    trusted: bool
    files: list[tuple[str, str]]  # every item of the campaign: key -> path
    selectable: list[str]  # the keys selection may pick from (the stop set left out)
    taken: list[ItemId] | LabelState  # what selection skips
    scores_dir: str  # per-batch results, kept for a resumed round
    config_digest: str  # the round's config


def _checkpoint_of(campaign: Campaign, r: int, options: RoundOptions) -> str:
    row = next(x for x in campaign.rounds() if x.round == r)
    return row.checkpoint or _resolved(options.checkpoint or Path())


def _select(
    kit: TaskKit,
    settings: CampaignSettings,
    strategy: QueryStrategy,
    adapter: Any,
    job: _ScoringJob,
    progress: bool,
) -> tuple[list[Query], torch.Tensor | None]:
    """The round's queries, scored batch by batch into ``job.scores_dir`` (item queries)."""
    options: dict[str, Any] = {}
    if settings.query == "region":
        options.update(settings.region_caps)
    else:  # the config and the checkpoint, beyond what the selector fingerprints itself
        key = hashlib.sha256(f"{job.config_digest}\0{job.checkpoint}".encode()).hexdigest()
        options.update(cache_dir=job.scores_dir, cache_key=key)
    return select_round(
        adapter,
        strategy,
        kit.pool(job.files).subset(job.selectable),
        job.taken,
        settings.budget,
        settings.seed,
        job.round,
        query=settings.query,
        batch_size=settings.batch_size,
        progress=progress,
        options=options,
    )


class _shared_scoring:
    """Rank 0 of a torchrun launch: join the other ranks (they wait in :func:`serve_round`)
    and send them ``job`` for the block; leave the group after it. A single process: nothing.

    Rank 0 joins the process group only now, so that training and evaluation before it run
    as in one process (mmengine would otherwise shard their data across the ranks).
    """

    #: whether this process has sent the other ranks their job (or word that there is none)
    sent = False

    def __init__(self, job: _ScoringJob | None) -> None:
        self.job = job

    def __enter__(self) -> None:
        if distributed.launched() and not _shared_scoring.sent:
            distributed.init_from_env()
            distributed.broadcast(self.job)
            _shared_scoring.sent = True

    def __exit__(self, *exc: object) -> None:
        if distributed.launched():
            distributed.close()


def release_workers() -> None:
    """Rank 0 of a torchrun launch whose round ended before scoring (an error, say): tell
    the waiting ranks there is nothing to score."""
    if distributed.launched() and not _shared_scoring.sent:
        with _shared_scoring(None):
            pass


def serve_round(kit: TaskKit, settings: CampaignSettings) -> bool:
    """A rank other than 0 of a torchrun launch: wait for rank 0's scoring job, score this
    rank's share of the pool and take part in selection. Returns whether there was a job
    (``False``: rank 0 ended before scoring; it reports why)."""
    strategy = _strategy(settings)
    distributed.init_from_env()
    try:
        job = distributed.broadcast(None)
        if job is None:
            return False
        adapter = kit.load(Path(job.checkpoint), strategy, job.trusted)
        _select(kit, settings, strategy, adapter, job, progress=False)
        return True
    finally:
        distributed.close()


def _resolved(path: Path) -> str:
    return str(Path(path).resolve())


def _strategy(settings: CampaignSettings) -> QueryStrategy:
    try:
        return build_strategy(settings.strategy)
    except (KeyError, ValueError, TypeError) as err:
        message = str(err.args[0]) if err.args else str(err)
        raise CampaignError(f"strategy {settings.strategy!r}: {message}") from None


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
        # the checkpoint this round recorded (weights only, unless the user trusts it)
        return kit.load(Path(row.checkpoint), strategy, options.trust_checkpoint)
    t0 = time.perf_counter()
    labels = campaign.labels()
    _say(options, f"round {r}: training on {len(labels)} labeled images")
    work = round_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    adapter = kit.train(pool, labels, work, train_seed(seed, r), strategy)
    path = round_dir / "model.pth"
    save_weights(kit.trained_module(adapter), path, {"round": r, "task": kit.task})
    campaign.mark_trained(r, _resolved(path), time.perf_counter() - t0)
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
    report: _Report,
    campaign: Campaign,
) -> Path:
    """Write the round's outputs, its report included, into a temporary folder, then rename
    it into place."""
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
    write_campaign_report(campaign, tmp / REPORT, report, kit)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _npy(array: np.ndarray | None) -> bytes | None:
    if array is None:
        return None
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@dataclass
class _Report:
    """What a round's report shows beyond the recorded rounds."""

    scores: np.ndarray  # the scores selection chose from
    counts: dict[str, int]  # predicted classes of the batch
    gallery: list[Any]  # the top queries drawn
    current: RoundSummary  # the round itself, before it is recorded


def _summary(r: int, strategy: str, m: Mapping[str, Any]) -> RoundSummary:
    name = next((k for k in ("mIoU", "mAP", "accuracy") if k in m), None)
    return RoundSummary(
        round=r,
        strategy=strategy,
        labeled=int(m.get("labeled", 0)),
        cost=m.get("cost"),
        metric=None if name is None else float(m[name]),
        metric_name=name,
        kappa=m.get("kappa"),
    )


def write_campaign_report(campaign: Campaign, path: Path, report: _Report, kit: TaskKit) -> Path:
    """The report at ``path``: every recorded round, then ``report.current`` if it is not
    recorded yet, with the latest round's scores, batch classes and gallery."""
    summaries = [
        _summary(row.round, row.strategy, row.metrics)
        for row in campaign.rounds()
        if row.state == "selected" and row.round != report.current.round
    ]
    finite = report.scores[np.isfinite(report.scores)]
    return write_report(
        path,
        title=f"taskal campaign: {path.resolve().parent.name}",
        task=kit.task,
        rounds=[*summaries, report.current],
        scores=finite,
        batch_class_counts=report.counts,
        gallery=report.gallery,
        cost_unit=kit.cost_unit,
    )


__all__ = [
    "KILL_AT_ENV",
    "RoundOptions",
    "RoundResult",
    "run_round",
    "write_campaign_report",
]
