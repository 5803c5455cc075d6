"""Configuration of the job queue (both backends read the same options)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class JobOptions:
    """Job-queue settings; the defaults are meant for production as they are.

    max_queued:              QUEUED jobs allowed at once; SubmitJob answers RESOURCE_EXHAUSTED beyond.
    embedded_workers:        worker threads inside the serving process (0 = a gateway that only queues).
    result_ttl_s:            finished jobs (and their results and events) are purged this long after they end.
    purge_interval_s:        how often the housekeeping loop purges finished jobs.
    claim_idle_s:            a running job whose worker has not heart-beaten for this long is handed to another
                             (three heartbeats: a killed worker's job runs again within claim_idle_s plus half of
                             it, the housekeeping interval, i.e. <= 4.5 s with the defaults).
    heartbeat_s:             how often a running job's worker proves it is alive (must be < claim_idle_s).
    progress_min_interval_s: partial heatmaps are published at most this often per job; progress numbers
                             at most every progress_min_interval_s / 5 (they are small).
    max_attempts:            runs of one job (worker deaths and unexpected errors) before it ends FAILED.
    stop_grace_s:            on stop/SIGTERM, a running job may finish within this time; after it the job is
                             handed back to the queue (at its next check_cancelled) without counting an attempt.
    cancel_check_interval_s: JobContext.check_cancelled reads the store at most this often (the flag is shared,
                             so a cancel from any gateway reaches the worker within one method iteration plus this).
    events_per_job:          progress events kept per job for WatchJob replay (older ones are trimmed; states
                             are never lost because a watcher always re-reads the job itself).
    """

    max_queued: int = 1000
    embedded_workers: int = 1
    result_ttl_s: float = 86400.0
    purge_interval_s: float = 60.0
    claim_idle_s: float = 3.0
    heartbeat_s: float = 1.0
    progress_min_interval_s: float = 0.5
    max_attempts: int = 3
    stop_grace_s: float = 10.0
    cancel_check_interval_s: float = 0.02
    events_per_job: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"JobOptions.{f.name} must be a finite number, got {v!r}")
        checks = [
            (self.max_queued >= 1, "max_queued must be >= 1"),
            (self.embedded_workers >= 0, "embedded_workers must be >= 0"),
            (self.result_ttl_s > 0, "result_ttl_s must be > 0"),
            (self.purge_interval_s > 0, "purge_interval_s must be > 0"),
            (self.claim_idle_s > 0, "claim_idle_s must be > 0"),
            (0 < self.heartbeat_s < self.claim_idle_s, "heartbeat_s must be > 0 and smaller than claim_idle_s"),
            (self.progress_min_interval_s >= 0, "progress_min_interval_s must be >= 0"),
            (self.max_attempts >= 1, "max_attempts must be >= 1"),
            (self.stop_grace_s >= 0, "stop_grace_s must be >= 0"),
            (self.cancel_check_interval_s >= 0, "cancel_check_interval_s must be >= 0"),
            (self.events_per_job >= 8, "events_per_job must be >= 8"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"JobOptions: {msg}")
