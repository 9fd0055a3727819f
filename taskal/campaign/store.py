"""A label campaign's state in SQLite: items, rounds, queries and the labels brought back.

One database file per campaign (``<work_dir>/campaign.sqlite``). Every change is one
transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``), checked before it starts, so a process
killed at any point leaves the file as it was before the change or after it, never between;
a refused change leaves the file byte for byte as it was.

Tables:

- ``items``: one row per image, with its stable ``key`` (the path relative to its folder),
  its file, its ``status`` (``unlabeled``, ``queried``, ``partial`` when some regions are
  labeled, ``labeled``) and whether it belongs to the fixed, never-queried stop set.
- ``rounds``: one row per round, moving through ``started`` (config, strategy and seed
  fixed), ``trained`` (the checkpoint written) and ``selected`` (queries recorded); timings,
  metrics and the stop set's predictions.
- ``queries``: what a round asked: item, region (``-1`` for the whole item), score, rank,
  annotation cost and, for box regions, the box.
- ``labels``: append-only; every label ever imported with its source file and the round it
  answers (``NULL`` for the labels the campaign started with). A replacement is a new row;
  the newest row of an item wins, so nothing recorded is ever lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
#: the database file inside a campaign's work dir
DB_NAME = "campaign.sqlite"
WHOLE = -1  # the region id of a whole-item query or label
LABEL_KINDS = ("class", "boxes", "mask")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('unlabeled', 'queried', 'partial', 'labeled')),
    stop_set INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('started', 'trained', 'selected')),
    strategy TEXT NOT NULL,
    seed INTEGER NOT NULL,
    budget REAL NOT NULL,
    query TEXT NOT NULL,
    config TEXT NOT NULL,
    checkpoint TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    train_seconds REAL,
    select_seconds REAL,
    metrics TEXT,
    stop_predictions BLOB
);
CREATE TABLE queries (
    round INTEGER NOT NULL REFERENCES rounds (round),
    rank INTEGER NOT NULL,
    item_id INTEGER NOT NULL REFERENCES items (id),
    region INTEGER NOT NULL,
    score REAL,
    cost REAL NOT NULL,
    box TEXT,
    PRIMARY KEY (round, rank),
    UNIQUE (round, item_id, region)
);
CREATE TABLE labels (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items (id),
    round INTEGER,
    kind TEXT NOT NULL CHECK (kind IN ('class', 'boxes', 'mask')),
    whole INTEGER NOT NULL,
    value BLOB NOT NULL,
    digest TEXT NOT NULL,
    source TEXT NOT NULL,
    imported_at TEXT NOT NULL
);
CREATE INDEX labels_item ON labels (item_id);
"""


class CampaignError(ValueError):
    """A user's mistake about a campaign; the message says what to fix, one line."""


@dataclass(frozen=True)
class RoundRow:
    """A round as recorded."""

    round: int
    state: str
    strategy: str
    seed: int
    budget: float
    query: str
    config: str
    checkpoint: str | None
    train_seconds: float | None
    select_seconds: float | None
    metrics: dict[str, Any]
    stop_predictions: bytes | None


@dataclass(frozen=True)
class QueryRow:
    """One recorded query."""

    round: int
    rank: int
    item: str
    region: int
    score: float
    cost: float
    box: tuple[float, float, float, float] | None


@dataclass(frozen=True)
class LabelRow:
    """One recorded label (the newest of an item is its current one)."""

    item: str
    round: int | None
    kind: str
    whole: bool
    value: bytes
    source: str


@dataclass(frozen=True)
class NewLabel:
    """A label to record: ``value`` is the task's encoding (a class index as JSON, boxes as
    JSON, a mask as PNG bytes); ``whole`` says it labels the whole item (a mask with
    unlabeled pixels answering region queries is not whole)."""

    item: str
    kind: str
    value: bytes
    whole: bool = True


@contextlib.contextmanager
def campaign_lock(work_dir: str | Path) -> Iterator[None]:
    """Hold ``<work_dir>/.lock`` exclusively: one process at a time runs or imports into a
    campaign (a second one is refused at once, not queued). The lock dies with its process.

    Raises:
        CampaignError: another process holds it.
    """
    folder = Path(work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CampaignError(
                f"another process is working on the campaign in {folder} (it holds "
                f"{folder / '.lock'}); wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def digest(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()


class Campaign:
    """The campaign database at ``path``; open it with :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self.db = connection

    # ---- opening -------------------------------------------------------------------------

    @classmethod
    def _connect(cls, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA synchronous = FULL")
        return db

    @classmethod
    def create(
        cls,
        path: str | Path,
        meta: Mapping[str, Any],
        items: Sequence[tuple[str, str]],
        stop_set: Sequence[str] = (),
        initial: Sequence[NewLabel] = (),
        source: str = "initial",
    ) -> Campaign:
        """A new campaign with ``items`` (key, file path), ``initial`` labels and a stop set.

        The file is written under a temporary name and renamed when complete, so a crash
        leaves no campaign rather than half of one.

        Raises:
            CampaignError: the file exists, duplicate keys, stop-set or label items that are
                not items, or a stop-set item that is labeled.
        """
        path = Path(path)
        if path.exists():
            raise CampaignError(f"a campaign already exists at {path}; open it instead")
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise CampaignError(f"two images share the key(s) {dup[:3]}; rename them")
        known = set(keys)
        for what, names in (("stop-set", stop_set), ("labeled", [x.item for x in initial])):
            unknown = [k for k in names if k not in known]
            if unknown:
                raise CampaignError(f"{what} items are not images of the pool: {unknown[:3]}")
        if set(stop_set) & {x.item for x in initial}:
            raise CampaignError("the stop set must hold unlabeled items only")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.creating")
        tmp.unlink(missing_ok=True)
        db = cls._connect(tmp)
        try:
            db.executescript(_SCHEMA)
            campaign = cls(path, db)
            with campaign.transaction():
                values = {**meta, "schema_version": SCHEMA_VERSION, "created_at": _now()}
                db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [(k, json.dumps(v)) for k, v in values.items()],
                )
                stop = set(stop_set)
                db.executemany(
                    "INSERT INTO items (key, path, status, stop_set) VALUES (?, ?, 'unlabeled', ?)",
                    [(k, p, int(k in stop)) for k, p in items],
                )
                campaign._insert_labels(initial, None, source)
            db.close()
            tmp.replace(path)
        except BaseException:
            db.close()
            tmp.unlink(missing_ok=True)
            raise
        return cls.open(path)

    @classmethod
    def open(cls, path: str | Path) -> Campaign:
        """The existing campaign at ``path``.

        Raises:
            CampaignError: no campaign there, or one of another schema version.
        """
        path = Path(path)
        if not path.is_file():
            raise CampaignError(f"no campaign at {path}; run tools/al_round.py to start one")
        db = cls._connect(path)
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as err:
            db.close()
            raise CampaignError(f"{path} is not a taskal campaign database ({err})") from None
        if row is None or json.loads(row[0]) != SCHEMA_VERSION:
            db.close()
            raise CampaignError(
                f"{path} has campaign schema {row and row[0]}, this taskal reads {SCHEMA_VERSION}"
            )
        return cls(path, db)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Campaign:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed on success, rolled back on any exception."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---- meta and items ------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    def items(self) -> dict[str, str]:
        """Every item's key -> file path, in insertion order."""
        return dict(self.db.execute("SELECT key, path FROM items ORDER BY id"))

    def statuses(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, status FROM items ORDER BY id"))

    def stop_set(self) -> list[str]:
        rows = self.db.execute("SELECT key FROM items WHERE stop_set = 1 ORDER BY id")
        return [k for (k,) in rows]

    def counts(self) -> dict[str, int]:
        """Items per status, plus ``stop_set``."""
        out = {s: 0 for s in ("unlabeled", "queried", "partial", "labeled")}
        for status, n in self.db.execute("SELECT status, COUNT(*) FROM items GROUP BY status"):
            out[status] = n
        out["stop_set"] = len(self.stop_set())
        return out

    def _insert_items(self, items: Sequence[tuple[str, str]]) -> None:
        """Add new images (key, path), inside the caller's transaction."""
        self.db.executemany(
            "INSERT INTO items (key, path, status) VALUES (?, ?, 'unlabeled')", list(items)
        )

    def _item_ids(self, keys: Sequence[str]) -> dict[str, int]:
        ids = dict(self.db.execute("SELECT key, id FROM items"))
        unknown = [k for k in keys if k not in ids]
        if unknown:
            raise CampaignError(f"{len(unknown)} item(s) are not in the campaign: {unknown[:3]}")
        return {k: ids[k] for k in keys}

    # ---- rounds --------------------------------------------------------------------------

    def rounds(self) -> list[RoundRow]:
        rows = self.db.execute(
            "SELECT round, state, strategy, seed, budget, query, config, checkpoint, "
            "train_seconds, select_seconds, metrics, stop_predictions FROM rounds ORDER BY round"
        )
        return [
            RoundRow(
                round=row[0],
                state=row[1],
                strategy=row[2],
                seed=row[3],
                budget=row[4],
                query=row[5],
                config=row[6],
                checkpoint=row[7],
                train_seconds=row[8],
                select_seconds=row[9],
                metrics=json.loads(row[10]) if row[10] else {},
                stop_predictions=row[11],
            )
            for row in rows
        ]

    def interrupted(self) -> RoundRow | None:
        """The round that started but did not record its queries, if any."""
        return next((r for r in self.rounds() if r.state != "selected"), None)

    def next_round(self) -> int:
        (last,) = self.db.execute("SELECT MAX(round) FROM rounds").fetchone()
        return 0 if last is None else int(last) + 1

    def start_round(
        self,
        r: int,
        strategy: str,
        seed: int,
        budget: float,
        query: str,
        config: str,
        new_items: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Record round ``r``'s start; ``new_items`` (key, path) join the campaign with it."""
        if self.interrupted() is not None:
            raise CampaignError("a round is already under way; finish it with --resume")
        if r != self.next_round():
            raise CampaignError(f"the next round is {self.next_round()}, not {r}")
        with self.transaction() as db:
            self._insert_items(new_items)
            db.execute(
                "INSERT INTO rounds (round, state, strategy, seed, budget, query, config, "
                "started_at) VALUES (?, 'started', ?, ?, ?, ?, ?, ?)",
                (r, strategy, seed, budget, query, config, _now()),
            )

    def restart_round(
        self,
        r: int,
        strategy: str,
        seed: int,
        budget: float,
        query: str,
        config: str,
        new_items: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Start round ``r``, interrupted before it selected, again with new settings; its
        model, if it had one, is forgotten (its file stays on disk)."""
        with self.transaction() as db:
            self._insert_items(new_items)
            changed = db.execute(
                "UPDATE rounds SET state = 'started', strategy = ?, seed = ?, budget = ?, "
                "query = ?, config = ?, started_at = ?, checkpoint = NULL, train_seconds = NULL "
                "WHERE round = ? AND state != 'selected'",
                (strategy, seed, budget, query, config, _now(), r),
            ).rowcount
            if changed != 1:
                raise CampaignError(f"round {r} has finished; start the next one instead")

    def mark_trained(self, r: int, checkpoint: str, seconds: float) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE rounds SET state = 'trained', checkpoint = ?, train_seconds = ? "
                "WHERE round = ? AND state != 'selected'",
                (checkpoint, seconds, r),
            )

    def finish_round(
        self,
        r: int,
        queries: Sequence[QueryRow],
        select_seconds: float,
        metrics: Mapping[str, Any],
        stop_predictions: bytes | None,
    ) -> None:
        """Record round ``r``'s queries and mark their items queried, in one transaction."""
        ids = self._item_ids([q.item for q in queries])
        with self.transaction() as db:
            state = db.execute("SELECT state FROM rounds WHERE round = ?", (r,)).fetchone()
            if state is None or state[0] == "selected":
                raise CampaignError(f"round {r} is not under way")
            db.executemany(
                "INSERT INTO queries (round, rank, item_id, region, score, cost, box) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (r, q.rank, ids[q.item], q.region, _finite(q.score), q.cost, _box(q.box))
                    for q in queries
                ],
            )
            db.executemany(
                "UPDATE items SET status = 'queried' WHERE id = ? AND status = 'unlabeled'",
                [(ids[q.item],) for q in queries],
            )
            db.execute(
                "UPDATE rounds SET state = 'selected', finished_at = ?, select_seconds = ?, "
                "metrics = ?, stop_predictions = ? WHERE round = ?",
                (_now(), select_seconds, json.dumps(dict(metrics)), stop_predictions, r),
            )

    def queries(self, r: int | None = None) -> list[QueryRow]:
        """Recorded queries, of round ``r`` or of every round, in round and rank order."""
        sql = (
            "SELECT q.round, q.rank, i.key, q.region, q.score, q.cost, q.box FROM queries q "
            "JOIN items i ON i.id = q.item_id"
        )
        args: tuple[Any, ...] = ()
        if r is not None:
            sql, args = sql + " WHERE q.round = ?", (r,)
        rows = self.db.execute(sql + " ORDER BY q.round, q.rank", args)
        return [
            QueryRow(
                round=row[0],
                rank=row[1],
                item=row[2],
                region=row[3],
                score=math.nan if row[4] is None else row[4],
                cost=row[5],
                box=tuple(json.loads(row[6])) if row[6] else None,
            )
            for row in rows
        ]

    # ---- labels --------------------------------------------------------------------------

    def labels(self) -> dict[str, list[LabelRow]]:
        """Every item's recorded labels, oldest first."""
        out: dict[str, list[LabelRow]] = {}
        rows = self.db.execute(
            "SELECT i.key, l.round, l.kind, l.whole, l.value, l.source FROM labels l "
            "JOIN items i ON i.id = l.item_id ORDER BY l.id"
        )
        for key, r, kind, whole, value, source in rows:
            out.setdefault(key, []).append(LabelRow(key, r, kind, bool(whole), value, source))
        return out

    def plan_import(self, labels: Sequence[NewLabel], overwrite: bool = False) -> list[NewLabel]:
        """The labels of ``labels`` that :meth:`record_labels` would record.

        Identical to a recorded label: skipped (a repeated import is a no-op).

        Raises:
            CampaignError: an unknown item, an item never queried (and not labeled from the
                start), two labels for one item, or a different label for a labeled item
                without ``overwrite``. Nothing is recorded then.
        """
        keys = [x.item for x in labels]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise CampaignError(f"the import labels {dup[:3]} more than once; merge them first")
        self._item_ids(keys)
        status = self.statuses()
        queried = {q.item for q in self.queries()}
        recorded = self.labels()
        todo = []
        for x in labels:
            if x.kind not in LABEL_KINDS:
                raise CampaignError(f"unknown label kind {x.kind!r} for {x.item}")
            old = recorded.get(x.item, [])
            if old and digest(old[-1].value) == digest(x.value):
                continue  # the item's current label already: a repeated import
            if x.item not in queried and not old:
                raise CampaignError(
                    f"{x.item} was never queried; import labels only for queried items "
                    "(see tools/campaign.py status)"
                )
            if status[x.item] == "labeled" and not overwrite:
                raise CampaignError(
                    f"{x.item} is already labeled ({old[-1].source}); pass --overwrite to "
                    "replace its label (the old one is kept in the history)"
                )
            todo.append(x)
        return todo

    def record_labels(
        self, labels: Sequence[NewLabel], source: str, overwrite: bool = False
    ) -> list[str]:
        """Record imported labels in one transaction; returns the items recorded.

        Raises:
            CampaignError: see :meth:`plan_import`; nothing is recorded then.
        """
        todo = self.plan_import(labels, overwrite)
        if todo:
            last = {q.item: q.round for q in self.queries()}
            with self.transaction():
                self._insert_labels(todo, last, source)
        return [x.item for x in todo]

    def _insert_labels(
        self, labels: Sequence[NewLabel], rounds: Mapping[str, int] | None, source: str
    ) -> None:
        ids = self._item_ids([x.item for x in labels])
        now = _now()
        self.db.executemany(
            "INSERT INTO labels (item_id, round, kind, whole, value, digest, source, "
            "imported_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    ids[x.item],
                    None if rounds is None else rounds.get(x.item),
                    x.kind,
                    int(x.whole),
                    x.value,
                    digest(x.value),
                    source,
                    now,
                )
                for x in labels
            ],
        )
        self.db.executemany(
            "UPDATE items SET status = ? WHERE id = ? AND status != 'labeled'",
            [("labeled" if x.whole else "partial", ids[x.item]) for x in labels],
        )


def _finite(x: float) -> float | None:
    """Scores as stored: strategies without scores (random, core-set) give NaN, kept NULL."""
    return None if math.isnan(x) else float(x)


def _box(box: Sequence[float] | None) -> str | None:
    return None if box is None else json.dumps([float(v) for v in box])


__all__ = [
    "DB_NAME",
    "WHOLE",
    "Campaign",
    "CampaignError",
    "LabelRow",
    "NewLabel",
    "QueryRow",
    "RoundRow",
    "campaign_lock",
]
