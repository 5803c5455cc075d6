"""Embedded job store: one SQLite file in WAL mode (the default backend).

Why SQLite: the embedded mode must survive a crash of the serving process without an extra service.
WAL lets readers (GetJob, WatchJob) proceed while a worker writes; every transition is one short
`BEGIN IMMEDIATE` transaction, so a job is never half-claimed. `synchronous=NORMAL` in WAL mode keeps
every committed transaction across a *process* crash (the crash the embedded mode must survive); on a power loss
the last few commits may be lost - set `synchronous="FULL"` for that (costs an fsync per event).

Several processes may share the file (e.g. `xaiserve worker --queue sqlite:///...` on one host):
writes are serialised by SQLite's lock (busy_timeout), workers poll for new work every
`poll_s`, and a job whose worker process is gone is recovered at once when the worker ran on this
host (its pid no longer exists) or after claim_idle_s without a heartbeat otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.errors import InvalidArgument, ResourceExhausted, quote
from xaiserve.service.jobs.backend import (
    TERMINAL_EVENT,
    TERMINAL_STATES,
    Claim,
    JobBackend,
    QueueStats,
    Recovered,
    deadline_from,
    job_message,
    process_gone,
    transition_event,
)
from xaiserve.service.jobs.options import JobOptions

log = logging.getLogger("xaiserve.jobs.sqlite")

SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    rid INTEGER PRIMARY KEY AUTOINCREMENT,   -- FIFO order within a priority (kept across re-queues)
    id TEXT NOT NULL UNIQUE,
    method TEXT NOT NULL,
    model TEXT NOT NULL,
    state INTEGER NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    progress REAL NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    last_error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    queued_at REAL NOT NULL,
    started REAL NOT NULL DEFAULT 0,
    finished REAL NOT NULL DEFAULT 0,
    deadline REAL NOT NULL DEFAULT 0,
    idem TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT NOT NULL DEFAULT '',
    heartbeat REAL NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL DEFAULT 0,
    request BLOB NOT NULL,
    result BLOB,
    owner TEXT NOT NULL DEFAULT 'anonymous'
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs(state, method, priority DESC, rid);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(state, finished);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Idempotency keys are scoped per owner. Files written before jobs had owners get the column (their
# jobs belong to "anonymous") and lose the old store-wide unique index.
_OWNER_MIGRATION = """
ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT 'anonymous';
"""
_OWNER_INDEX = """
DROP INDEX IF EXISTS jobs_idem;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_owner_idem ON jobs(owner, idem) WHERE idem IS NOT NULL;
"""
_COLUMNS = (
    "id",
    "method",
    "model",
    "state",
    "priority",
    "progress",
    "error",
    "created",
    "queued_at",
    "started",
    "finished",
    "deadline",
    "idem",
    "attempts",
    "worker",
    "rid",
    "seq",
    "last_error",
    "heartbeat",
    "owner",
)
_SELECT = "SELECT " + ", ".join(_COLUMNS) + " FROM jobs"


def parse_sqlite_url(url: str) -> Path:
    """`sqlite:///relative/path` or `sqlite:////absolute/path` (the SQLAlchemy convention)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError(f"queue URL {url!r} is not sqlite:///path/jobs.sqlite (or sqlite:////absolute/path)")
    return Path(url[len(prefix) :])


class _AsyncNotifier:
    """Wakes async watchers (any event loop) when this process appends an event to a job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def add(self, job_id: str) -> tuple[asyncio.AbstractEventLoop, asyncio.Event]:
        item = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(item)
        return item

    def remove(self, job_id: str, item: tuple[asyncio.AbstractEventLoop, asyncio.Event]) -> None:
        with self._lock:
            s = self._waiters.get(job_id)
            if s is not None:
                s.discard(item)
                if not s:
                    del self._waiters[job_id]

    def notify(self, job_ids: Sequence[str]) -> None:
        with self._lock:
            items = [it for j in job_ids for it in self._waiters.get(j, ())]
        for loop, ev in items:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # that loop is closed; its watcher is gone
                pass


class SqliteBackend(JobBackend):
    kind = "sqlite"
    transient_errors = (sqlite3.OperationalError,)  # "database is locked" beyond busy_timeout, disk I/O

    def __init__(self, path: str | Path, options: JobOptions, *, synchronous: str = "NORMAL", poll_s: float = 0.25):
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.path = Path(path)
        self.options = options
        self.poll_s = poll_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection guarded by a lock: every operation is a short transaction, and SQLite
        # serialises writers anyway. isolation_level=None: we issue BEGIN IMMEDIATE ourselves so a
        # claim reads and writes under the same write lock (no two workers take the same job).
        self._conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        with self._lock:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"{self.path}: SQLite refused WAL mode ({mode}); put the job store on a local disk")
            self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._conn.executescript(_SCHEMA)
            if "owner" not in {r[1] for r in self._conn.execute("PRAGMA table_info(jobs)")}:
                self._conn.executescript(_OWNER_MIGRATION)
            self._conn.executescript(_OWNER_INDEX)
            self._conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
        self._work = threading.Condition()
        self._wakeups = 0  # in-process submits not yet seen by a waiting worker (no lost wake-ups)
        self._notifier = _AsyncNotifier()
        self._closed = False

    # -- plumbing ------------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the job store is closed")
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the job store is closed")
            return self._conn.execute(sql, args).fetchall()

    @staticmethod
    def _row(t: tuple | None) -> dict[str, Any] | None:
        return None if t is None else dict(zip(_COLUMNS, t))

    def _append(self, c: sqlite3.Connection, job_id: str, event: pb.JobEvent) -> int:
        seq = c.execute("UPDATE jobs SET seq = seq + 1 WHERE id = ? RETURNING seq", (job_id,)).fetchone()[0]
        ev = pb.JobEvent()
        ev.CopyFrom(event)
        ev.job_id, ev.sequence = job_id, seq
        c.execute("INSERT INTO events(job_id, seq, data) VALUES (?, ?, ?)", (job_id, seq, ev.SerializeToString()))
        keep = self.options.events_per_job
        if seq > keep:
            c.execute("DELETE FROM events WHERE job_id = ? AND seq <= ?", (job_id, seq - keep))
        return seq

    def _wake_workers(self, n: int = 1) -> None:
        with self._work:
            self._wakeups += n
            self._work.notify(n)

    def _queue_position(self, c: sqlite3.Connection, row: dict[str, Any]) -> int:
        if row["state"] != pb.QUEUED:
            return 0
        return c.execute(
            "SELECT COUNT(*) FROM jobs WHERE state = ? AND method = ? AND (priority > ? OR (priority = ? AND rid < ?))",
            (pb.QUEUED, row["method"], row["priority"], row["priority"], row["rid"]),
        ).fetchone()[0]

    def _terminate(
        self,
        c: sqlite3.Connection,
        row: dict[str, Any],
        state: int,
        now: float,
        error: str,
        result: bytes | None = None,
    ) -> None:
        progress = 1.0 if state == pb.SUCCEEDED else row["progress"]
        c.execute(
            "UPDATE jobs SET state = ?, finished = ?, error = ?, result = ?, progress = ?, worker = '' WHERE id = ?",
            (state, now, error, result, progress, row["id"]),
        )
        self._append(c, row["id"], transition_event(TERMINAL_EVENT[state], now=now, progress=progress, message=error))

    # -- gateway side --------------------------------------------------------------------------
    def submit(
        self, request: pb.JobRequest, *, job_id: str, now: float, owner: str = "anonymous"
    ) -> tuple[pb.Job, bool]:
        data = request.SerializeToString(deterministic=True)
        idem = request.idempotency_key or None
        with self._tx() as c:
            if idem is not None:
                t = c.execute(_SELECT + " WHERE idem = ? AND owner = ?", (idem, owner)).fetchone()
                if t is not None:
                    row = self._row(t)
                    stored = c.execute("SELECT request FROM jobs WHERE id = ?", (row["id"],)).fetchone()[0]
                    if bytes(stored) != data:
                        raise InvalidArgument(
                            f"idempotency key {quote(idem)} already names job {row['id']} with a different request; "
                            "use a new key for a new job"
                        )
                    return job_message(row, queue_position=self._queue_position(c, row)), False
            queued = c.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (pb.QUEUED,)).fetchone()[0]
            if queued >= self.options.max_queued:
                raise ResourceExhausted(
                    f"the job queue is full ({queued} jobs queued, limit {self.options.max_queued}); retry later"
                )
            c.execute(
                "INSERT INTO jobs(id, method, model, state, priority, created, queued_at, deadline, idem, request, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    request.method,
                    request.model,
                    pb.QUEUED,
                    int(request.priority),
                    now,
                    now,
                    deadline_from(request, now),
                    idem,
                    data,
                    owner,
                ),
            )
            self._append(c, job_id, transition_event(pb.EVENT_QUEUED, now=now))
            row = self._row(c.execute(_SELECT + " WHERE id = ?", (job_id,)).fetchone())
            job = job_message(row, queue_position=self._queue_position(c, row))
        self._wake_workers()
        self._notifier.notify([job_id])
        return job, True

    def get(self, job_id: str, *, include_result: bool = False) -> pb.Job | None:
        with self._lock:
            row = self._row(self._conn.execute(_SELECT + " WHERE id = ?", (job_id,)).fetchone())
            if row is None:
                return None
            result = None
            if include_result and row["state"] == pb.SUCCEEDED:
                result = self._conn.execute("SELECT result FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            return job_message(row, result=result, queue_position=self._queue_position(self._conn, row))

    def cancel(self, job_id: str, *, now: float) -> pb.Job | None:
        with self._tx() as c:
            row = self._row(c.execute(_SELECT + " WHERE id = ?", (job_id,)).fetchone())
            if row is None:
                return None
            if row["state"] not in TERMINAL_STATES:
                self._terminate(c, row, pb.CANCELLED, now, "")
        self._notifier.notify([job_id])
        return self.get(job_id)

    def snapshot(self, job_id: str) -> tuple[pb.Job, int] | None:
        with self._lock:
            row = self._row(self._conn.execute(_SELECT + " WHERE id = ?", (job_id,)).fetchone())
            if row is None:
                return None
            return job_message(row, queue_position=self._queue_position(self._conn, row)), int(row["seq"])

    def events_after(self, job_id: str, seq: int, *, limit: int = 256) -> list[pb.JobEvent]:
        rows = self._read(
            "SELECT data FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?", (job_id, seq, limit)
        )
        out = []
        for (data,) in rows:
            ev = pb.JobEvent()
            ev.ParseFromString(data)
            out.append(ev)
        return out

    async def wait_events(self, job_id: str, seq: int, timeout: float) -> list[pb.JobEvent]:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        item = self._notifier.add(job_id)
        try:
            while True:
                item[1].clear()
                events = await asyncio.to_thread(self.events_after, job_id, seq)
                left = end - loop.time()
                if events or left <= 0:
                    return events
                # Wake on an in-process append; poll for appends by other processes sharing the file.
                try:
                    await asyncio.wait_for(item[1].wait(), timeout=min(left, self.poll_s * 2))
                except asyncio.TimeoutError:
                    pass
        finally:
            self._notifier.remove(job_id, item)

    # -- worker side ---------------------------------------------------------------------------
    def claim(self, worker_id: str, methods: Sequence[str], *, now: float) -> Claim | None:
        if not methods:
            return None
        marks = ",".join("?" * len(methods))
        expired: list[str] = []
        expired_rec: list[Recovered] = []
        claim = None
        with self._tx() as c:
            while True:
                t = c.execute(
                    _SELECT + f" WHERE state = ? AND method IN ({marks}) ORDER BY priority DESC, rid LIMIT 1",
                    (pb.QUEUED, *methods),
                ).fetchone()
                if t is None:
                    break
                row = self._row(t)
                if row["deadline"] and now > row["deadline"]:
                    self._terminate(c, row, pb.EXPIRED, now, _expired_msg(row, now, "before a worker started it"))
                    expired.append(row["id"])
                    expired_rec.append(Recovered(row["id"], row["method"], "expired"))
                    continue
                attempt = row["attempts"] + 1
                c.execute(
                    "UPDATE jobs SET state = ?, worker = ?, attempts = ?, heartbeat = ?, progress = 0, "
                    # max(now, created): the worker took `now` before this transaction, and a job
                    # submitted in between must not start before its creation
                    "started = CASE WHEN started = 0 THEN max(?, created) ELSE started END WHERE id = ?",
                    (pb.RUNNING, worker_id, attempt, now, now, row["id"]),
                )
                msg = f"attempt {attempt} of {self.options.max_attempts}" if attempt > 1 else ""
                self._append(c, row["id"], transition_event(pb.EVENT_STARTED, now=now, message=msg))
                request = pb.JobRequest()
                request.ParseFromString(c.execute("SELECT request FROM jobs WHERE id = ?", (row["id"],)).fetchone()[0])
                claim = Claim(
                    job_id=row["id"],
                    method=row["method"],
                    request=request,
                    attempt=attempt,
                    worker_id=worker_id,
                    created_unix=row["created"],
                    queued_unix=row["queued_at"],
                    deadline_unix=row["deadline"],
                )
                break
        self._notifier.notify(expired + ([claim.job_id] if claim else []))
        self._observe(expired_rec)
        return claim

    def wait_for_work(self, methods: Sequence[str], timeout: float) -> None:
        with self._work:
            if self._wakeups == 0:
                self._work.wait(timeout=min(timeout, self.poll_s))
            if self._wakeups > 0:
                self._wakeups -= 1

    def wake_workers(self, methods: Sequence[str], n: int) -> None:
        self._wake_workers(n)

    def _current(self, c: sqlite3.Connection, claim: Claim) -> bool:
        t = c.execute("SELECT state, worker, attempts FROM jobs WHERE id = ?", (claim.job_id,)).fetchone()
        return t is not None and t[0] == pb.RUNNING and t[1] == claim.worker_id and t[2] == claim.attempt

    def heartbeat(self, claim: Claim, *, now: float) -> bool:
        with self._tx() as c:
            cur = (
                c.execute(
                    "UPDATE jobs SET heartbeat = ? WHERE id = ? AND state = ? AND worker = ? AND attempts = ?",
                    (now, claim.job_id, pb.RUNNING, claim.worker_id, claim.attempt),
                ).rowcount
                == 1
            )
            c.execute("INSERT OR REPLACE INTO workers(id, last_seen) VALUES (?, ?)", (claim.worker_id, now))
        return cur

    def is_current(self, claim: Claim) -> bool:
        with self._lock:
            return self._current(self._conn, claim)

    def progress(self, claim: Claim, event: pb.JobEvent) -> bool:
        with self._tx() as c:
            if not self._current(c, claim):
                return False
            c.execute("UPDATE jobs SET progress = ? WHERE id = ?", (float(event.progress), claim.job_id))
            self._append(c, claim.job_id, event)
        self._notifier.notify([claim.job_id])
        return True

    def finish(
        self, claim: Claim, state: int, *, now: float, result: pb.JobResult | None = None, error: str = ""
    ) -> bool:
        if state not in TERMINAL_STATES:
            raise ValueError(f"finish needs a terminal state, got {state}")
        data = result.SerializeToString() if (result is not None and state == pb.SUCCEEDED) else None
        with self._tx() as c:
            if not self._current(c, claim):
                return False
            row = self._row(c.execute(_SELECT + " WHERE id = ?", (claim.job_id,)).fetchone())
            self._terminate(c, row, state, now, error, data)
        self._notifier.notify([claim.job_id])
        return True

    def requeue(self, claim: Claim, *, now: float, reason: str, count_attempt: bool) -> bool:
        with self._tx() as c:
            if not self._current(c, claim):
                return False
            self._to_queue(c, claim.job_id, now, reason, uncount=not count_attempt)
        self._wake_workers()
        self._notifier.notify([claim.job_id])
        return True

    def _to_queue(self, c: sqlite3.Connection, job_id: str, now: float, reason: str, *, uncount: bool = False) -> None:
        c.execute(
            "UPDATE jobs SET state = ?, worker = '', progress = 0, queued_at = ?, last_error = ?, "
            "attempts = attempts - ? WHERE id = ?",
            (pb.QUEUED, now, reason, 1 if uncount else 0, job_id),
        )
        self._append(c, job_id, transition_event(pb.EVENT_QUEUED, now=now, message=reason))

    # -- housekeeping --------------------------------------------------------------------------
    def recover(self, *, now: float, reclaimer: str) -> list[Recovered]:
        idle = self.options.claim_idle_s
        out: list[Recovered] = []
        with self._tx() as c:
            rows = [self._row(t) for t in c.execute(_SELECT + " WHERE state = ?", (pb.RUNNING,)).fetchall()]
            for row in rows:
                gone = process_gone(row["worker"])
                hb = row["heartbeat"]
                if not gone and now - hb < idle:
                    continue
                why = (
                    f"worker {row['worker']} exited"
                    if gone
                    else f"worker {row['worker']} stopped heart-beating for {now - hb:.0f} s"
                )
                out.append(self._recover_one(c, row, now, why))
        if out:
            self._wake_workers(len(out))
            self._notifier.notify([r.job_id for r in out])
        return out

    def _recover_one(self, c: sqlite3.Connection, row: dict[str, Any], now: float, why: str) -> Recovered:
        if row["deadline"] and now > row["deadline"]:
            self._terminate(c, row, pb.EXPIRED, now, _expired_msg(row, now, f"while running ({why})"))
            return Recovered(row["id"], row["method"], "expired")
        if row["attempts"] >= self.options.max_attempts:
            err = f"failed after {row['attempts']} attempts: {why}"
            self._terminate(c, row, pb.FAILED, now, err)
            return Recovered(row["id"], row["method"], "failed")
        self._to_queue(
            c, row["id"], now, f"{why}; re-queued (attempt {row['attempts']} of {self.options.max_attempts} lost)"
        )
        return Recovered(row["id"], row["method"], "requeued")

    def expire_due(self, *, now: float) -> list[Recovered]:
        out = []
        with self._tx() as c:
            rows = [
                self._row(t)
                for t in c.execute(
                    _SELECT + " WHERE state = ? AND deadline > 0 AND deadline < ?", (pb.QUEUED, now)
                ).fetchall()
            ]
            for row in rows:
                self._terminate(c, row, pb.EXPIRED, now, _expired_msg(row, now, "before a worker started it"))
                out.append(Recovered(row["id"], row["method"], "expired"))
        if out:
            self._notifier.notify([r.job_id for r in out])
        return out

    def purge(self, *, now: float) -> int:
        cutoff = now - self.options.result_ttl_s
        terminal = tuple(TERMINAL_STATES)
        marks = ",".join("?" * len(terminal))
        with self._tx() as c:
            c.execute(
                f"DELETE FROM events WHERE job_id IN (SELECT id FROM jobs WHERE state IN ({marks}) AND finished < ?)",
                (*terminal, cutoff),
            )
            n = c.execute(f"DELETE FROM jobs WHERE state IN ({marks}) AND finished < ?", (*terminal, cutoff)).rowcount
            c.execute("DELETE FROM workers WHERE last_seen < ?", (now - max(self.options.result_ttl_s, 3600.0),))
        return n

    def stats(self, *, now: float) -> QueueStats:
        with self._lock:
            rows = self._conn.execute(
                "SELECT method, state, COUNT(*) FROM jobs WHERE state IN (?, ?) GROUP BY method, state",
                (pb.QUEUED, pb.RUNNING),
            ).fetchall()
            oldest = self._conn.execute("SELECT MIN(queued_at) FROM jobs WHERE state = ?", (pb.QUEUED,)).fetchone()[0]
            alive = self._conn.execute(
                "SELECT COUNT(*) FROM workers WHERE last_seen >= ?", (now - self.options.claim_idle_s,)
            ).fetchone()[0]
        st = QueueStats(oldest_queued_age_s=max(0.0, now - oldest) if oldest else 0.0, workers_alive=int(alive))
        for method, state, n in rows:
            (st.queued if state == pb.QUEUED else st.running)[method] = int(n)
        return st

    def durability(self) -> tuple[bool, str]:
        return True, f"SQLite file {self.path} (WAL)"

    def ping(self) -> None:
        self._read("SELECT 1")

    def touch_worker(self, worker_id: str, *, now: float) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO workers(id, last_seen) VALUES (?, ?)", (worker_id, now))

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()
        with self._work:
            self._work.notify_all()


def _expired_msg(row: dict[str, Any], now: float, when: str) -> str:
    d = row["deadline"] - row["created"]
    return f"deadline of {d:.3g} s passed {when} ({now - row['created']:.3g} s after submission)"
