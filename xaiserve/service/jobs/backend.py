"""The job-store interface shared by the embedded (SQLite) and distributed (Redis) backends.

A backend is a durable store of jobs plus the few atomic transitions the queue needs. Both backends
keep the same semantics (tests/test_jobs_backends.py runs one parametrised suite against both):

- submit: a new QUEUED job (or the existing one for a repeated idempotency key); a bounded number of
  QUEUED jobs, beyond which submit raises ResourceExhausted.
- claim: the best QUEUED job of the worker's methods (highest priority, then oldest) becomes RUNNING,
  owned by that worker, with attempts + 1. A job past its deadline is never started: it ends EXPIRED.
- heartbeat / progress / finish / requeue are *fenced* by the Claim: they only act while the job is
  still RUNNING under that very claim (worker and attempt). A worker that lost its job (cancelled,
  expired, or handed to another worker because it stopped heart-beating) can therefore never store a
  result or an event for it: a job is run at least once and its result is stored exactly once.
- recover: RUNNING jobs whose worker stopped heart-beating for claim_idle_s go back to the queue (or
  end FAILED after max_attempts, EXPIRED after their deadline).
- cancel: QUEUED or RUNNING -> CANCELLED at once (the running worker sees it at its next check).
- every state change and progress report appends an event with a per-job increasing sequence number;
  a snapshot returns the job with the sequence it reflects, so a watcher reads the snapshot and then
  exactly the events after it, with nothing lost or repeated in between.
- finished jobs, their results and events are purged result_ttl_s after they end.

All methods are synchronous and short (milliseconds) except wait_for_work (blocks a worker thread up
to a timeout) and wait_events (async, so that any number of WatchJob calls cost no thread each).
"""

from __future__ import annotations

import abc
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from xaiserve.proto.explain.v1 import explainer_pb2 as pb

STATE_NAMES: dict[int, str] = {
    pb.QUEUED: "queued",
    pb.RUNNING: "running",
    pb.SUCCEEDED: "succeeded",
    pb.FAILED: "failed",
    pb.CANCELLED: "cancelled",
    pb.EXPIRED: "expired",
}
TERMINAL_STATES = frozenset({pb.SUCCEEDED, pb.FAILED, pb.CANCELLED, pb.EXPIRED})
TERMINAL_EVENT: dict[int, int] = {
    pb.SUCCEEDED: pb.EVENT_SUCCEEDED,
    pb.FAILED: pb.EVENT_FAILED,
    pb.CANCELLED: pb.EVENT_CANCELLED,
    pb.EXPIRED: pb.EVENT_EXPIRED,
}
TERMINAL_EVENT_TYPES = frozenset(TERMINAL_EVENT.values())


def state_name(state: int) -> str:
    return STATE_NAMES.get(int(state), "unspecified")


# Distinguishes this process from an earlier one with the same pid (a container restarted as pid 1).
PROCESS_NONCE = os.urandom(3).hex()


ANONYMOUS = "anonymous"  # the owner of jobs submitted without a token or client certificate
_ID_VERSION = "7"  # 13th hex digit of our ids (as in a UUIDv7); uuid4 hex ids of older releases have "4"


def new_job_id(now: float) -> str:
    """32 hex digits: the creation time in ms (12), a version digit, 19 random digits (76 bits).

    The time in the id lets GetJob say, for an id the queue does not know, when it was created
    (long ago: purged; recently: lost or never ours) instead of guessing."""
    return f"{int(now * 1000) & 0xFFFFFFFFFFFF:012x}{_ID_VERSION}{secrets.token_hex(10)[:19]}"


def job_id_time(job_id: str) -> float | None:
    """The creation time carried by a new_job_id id (unix seconds), None for any other string."""
    if len(job_id) != 32 or job_id[12] != _ID_VERSION:
        return None
    try:
        ms = int(job_id[:12], 16)
        int(job_id[13:], 16)
    except ValueError:
        return None
    t = ms / 1000.0
    return t if 1.5e9 < t < time.time() + 86400.0 else None


def worker_identity(role: str = "worker") -> str:
    """A worker id that says where it runs: role@host:pid.nonce (unique per process; threads add #n)."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}.{PROCESS_NONCE}"


def process_gone(worker_id: str) -> bool:
    """True when worker_id (from worker_identity) ran on this host in a process that no longer exists.

    False when unsure (another host, a foreign id, a live pid that may have been reused): the caller
    then falls back to the heartbeat timeout.
    """
    _, _, where = worker_id.partition("@")
    host, _, rest = where.rpartition(":")
    pid_s, _, nonce = rest.split("#", 1)[0].partition(".")
    if host != socket.gethostname() or not pid_s.isdigit():
        return False
    pid = int(pid_s)
    if pid == os.getpid():
        return bool(nonce) and nonce != PROCESS_NONCE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return False


@dataclass(frozen=True)
class Claim:
    """A worker's lease on one RUNNING job; every later write about the job must present it."""

    job_id: str
    method: str
    request: pb.JobRequest
    attempt: int
    worker_id: str
    created_unix: float
    queued_unix: float  # when the job (last) entered the queue: queue wait = started - queued
    deadline_unix: float  # 0 = no deadline
    token: str = ""  # backend detail (Redis: the lease's stream entry id)


@dataclass
class QueueStats:
    queued: dict[str, int] = field(default_factory=dict)  # per method
    running: dict[str, int] = field(default_factory=dict)  # per method
    oldest_queued_age_s: float = 0.0
    workers_alive: int = 0


@dataclass(frozen=True)
class Recovered:
    """What recover/expire did to one job (for metrics and logs)."""

    job_id: str
    method: str
    outcome: str  # "requeued" | "failed" | "expired"


def transition_event(event_type: int, *, now: float, progress: float = 0.0, message: str = "") -> pb.JobEvent:
    return pb.JobEvent(type=event_type, progress=progress, message=message, unix_time=now)


def deadline_from(request: pb.JobRequest, now: float) -> float:
    d = float(request.deadline_seconds)
    return now + d if d > 0 and math.isfinite(d) else 0.0


def job_message(row: dict[str, Any], *, result: bytes | None = None, queue_position: int = 0) -> pb.Job:
    """Build a pb.Job from the common field names both backends store."""
    job = pb.Job(
        id=str(row["id"]),
        method=str(row["method"]),
        model=str(row["model"]),
        state=int(row["state"]),
        progress=float(row.get("progress") or 0.0),
        error=str(row.get("error") or ""),
        created_unix=float(row.get("created") or 0.0),
        started_unix=float(row.get("started") or 0.0),
        finished_unix=float(row.get("finished") or 0.0),
        idempotency_key=str(row.get("idem") or ""),
        priority=int(row.get("priority") or 0),
        attempts=int(row.get("attempts") or 0),
        queue_position=int(queue_position),
        owner=str(row.get("owner") or ANONYMOUS),
    )
    if result:
        job.result.ParseFromString(result)
    return job


class JobBackend(abc.ABC):
    """Durable job store + queue; see the module docstring for the contract."""

    kind: str = "abstract"
    #: Exceptions that mean "the store is unreachable right now" (the service answers UNAVAILABLE).
    transient_errors: tuple[type[BaseException], ...] = ()
    #: Called with the jobs a claim found past their deadline (and ended EXPIRED), so the service can
    #: count them; recover/expire_due return theirs instead. Set by JobService.
    observer: Callable[[list[Recovered]], None] | None = None

    def _observe(self, done: list[Recovered]) -> None:
        if done and self.observer is not None:
            self.observer(done)

    # -- gateway side --------------------------------------------------------------------------
    @abc.abstractmethod
    def submit(self, request: pb.JobRequest, *, job_id: str, now: float, owner: str = ANONYMOUS) -> tuple[pb.Job, bool]:
        """Store a QUEUED job of `owner`; returns (job, created). An idempotency key `owner` used
        before returns (existing, False); keys are scoped per owner (two owners never share a job).

        Raises ResourceExhausted when max_queued jobs are queued, InvalidArgument when the key names a
        job with a different request.
        """

    def durability(self) -> tuple[bool, str]:
        """(survives a restart of the store, how): the gateway and workers refuse a volatile store
        at start unless allowed."""
        return True, f"{self.kind} file"

    def check_integrity(self, *, now: float) -> str | None:
        """Called by housekeeping: a message when the store lost its data since the last call
        (a Redis restarted without persistence), else None. Such a loss is logged, never silent."""
        return None

    #: When this process last saw the store lose its data (unix seconds; 0 = never).
    lost_at: float = 0.0

    def ping(self) -> None:
        """Raise one of transient_errors when the store is unreachable (readiness probe)."""

    @abc.abstractmethod
    def get(self, job_id: str, *, include_result: bool = False) -> pb.Job | None: ...

    @abc.abstractmethod
    def cancel(self, job_id: str, *, now: float) -> pb.Job | None:
        """QUEUED/RUNNING -> CANCELLED; a finished job is returned unchanged; None when unknown."""

    @abc.abstractmethod
    def snapshot(self, job_id: str) -> tuple[pb.Job, int] | None:
        """The job (without result) and the sequence number of the last event it reflects."""

    @abc.abstractmethod
    def events_after(self, job_id: str, seq: int, *, limit: int = 256) -> list[pb.JobEvent]:
        """Stored events with sequence > seq, oldest first (job_id and sequence filled in)."""

    @abc.abstractmethod
    async def wait_events(self, job_id: str, seq: int, timeout: float) -> list[pb.JobEvent]:
        """Like events_after, but waits up to `timeout` seconds for one to arrive."""

    # -- worker side ---------------------------------------------------------------------------
    @abc.abstractmethod
    def claim(self, worker_id: str, methods: Sequence[str], *, now: float) -> Claim | None: ...

    @abc.abstractmethod
    def wait_for_work(self, methods: Sequence[str], timeout: float) -> None:
        """Block until a job of these methods may be claimable, or the timeout passes."""

    def wake_workers(self, methods: Sequence[str], n: int) -> None:
        """Cut short up to n wait_for_work calls (used at shutdown so workers notice at once)."""

    @abc.abstractmethod
    def heartbeat(self, claim: Claim, *, now: float) -> bool:
        """Prove the worker is alive; False when the claim is no longer current."""

    @abc.abstractmethod
    def is_current(self, claim: Claim) -> bool:
        """True while the job is RUNNING under this claim (not cancelled, expired or handed over)."""

    @abc.abstractmethod
    def progress(self, claim: Claim, event: pb.JobEvent) -> bool:
        """Record event.progress on the job and append the event; False when the claim is stale."""

    @abc.abstractmethod
    def finish(
        self, claim: Claim, state: int, *, now: float, result: pb.JobResult | None = None, error: str = ""
    ) -> bool:
        """RUNNING -> terminal state, storing the result exactly once; False when the claim is stale."""

    @abc.abstractmethod
    def requeue(self, claim: Claim, *, now: float, reason: str, count_attempt: bool) -> bool:
        """RUNNING -> QUEUED (retry after an error, or handed back on shutdown when not count_attempt)."""

    # -- housekeeping (any process may run these; they are idempotent) -------------------------
    @abc.abstractmethod
    def recover(self, *, now: float, reclaimer: str) -> list[Recovered]:
        """Re-queue (or fail/expire) RUNNING jobs whose worker stopped heart-beating."""

    @abc.abstractmethod
    def expire_due(self, *, now: float) -> list[Recovered]:
        """QUEUED jobs past their deadline -> EXPIRED."""

    @abc.abstractmethod
    def purge(self, *, now: float) -> int:
        """Delete jobs that finished more than result_ttl_s ago; returns how many."""

    @abc.abstractmethod
    def stats(self, *, now: float) -> QueueStats: ...

    @abc.abstractmethod
    def touch_worker(self, worker_id: str, *, now: float) -> None:
        """Record that a worker process is alive (for the workers-alive gauge)."""

    @abc.abstractmethod
    def close(self) -> None: ...
