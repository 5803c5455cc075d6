"""Prometheus metrics of the job queue and its workers (prometheus_client default REGISTRY).

Labels stay low-cardinality: `method` (only configured methods reach a label: unknown ones are
rejected at submit), `state` (the six job states plus worker outcomes) and `reason` (three values).
Never a job id, model, user or token.

Counters are per process (a gateway counts submissions, a worker counts what it ran; Prometheus sums
over instances). Gauges marked "from the store" read the shared queue, so with Redis every gateway
and worker reports the same value: aggregate them with max(), not sum() (what the multiprocess mode
of `xaiserve serve --processes N` does: livemax; the per-process worker gauges: livesum).
"""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

from xaiserve.service.jobs.backend import QueueStats

# Jobs wait from milliseconds (idle workers) to hours (a backlog) and run for seconds to tens of minutes.
JOB_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
)

JOBS = Counter(
    "xaiserve_jobs",
    "Jobs entering a state (queued at submit, running at claim, terminal at the end)",
    ["method", "state"],
)
QUEUE_DEPTH = Gauge(
    "xaiserve_job_queue_depth", "Jobs waiting in the queue (from the store)", ["method"], multiprocess_mode="livemax"
)
RUNNING = Gauge(
    "xaiserve_jobs_running", "Jobs running on some worker (from the store)", ["method"], multiprocess_mode="livemax"
)
OLDEST_QUEUED = Gauge(
    "xaiserve_job_oldest_queued_age_seconds",
    "Age of the oldest queued job (from the store)",
    multiprocess_mode="livemax",
)
WORKERS_ALIVE = Gauge(
    "xaiserve_job_workers_alive",
    "Workers that reported within claim_idle_s (from the store)",
    multiprocess_mode="livemax",
)
QUEUE_WAIT = Histogram(
    "xaiserve_job_queue_wait_seconds",
    "Time from (re-)queueing to a worker starting the job",
    ["method"],
    buckets=JOB_BUCKETS,
)
RUN_TIME = Histogram(
    "xaiserve_job_run_seconds",
    "Time a worker spent running a job, by outcome",
    ["method", "state"],
    buckets=JOB_BUCKETS,
)
ATTEMPTS = Histogram(
    "xaiserve_job_attempts", "Runs a job took, observed when it ends", ["method"], buckets=(1, 2, 3, 4, 5, 8, 13)
)
RETRIES = Counter(
    "xaiserve_job_retries",
    "Jobs put back in the queue (error: the method raised; worker_lost: "
    "its worker stopped heart-beating; handed_back: its worker shut down)",
    ["method", "reason"],
)
WORKER_JOBS = Counter("xaiserve_worker_jobs", "Jobs this worker process ran, by outcome", ["method", "state"])
WORKER_BUSY = Gauge("xaiserve_worker_busy", "Worker threads of this process running a job", multiprocess_mode="livesum")
WORKER_THREADS = Gauge("xaiserve_worker_threads", "Worker threads of this process", multiprocess_mode="livesum")
STORE_DATA_LOST = Counter(
    "xaiserve_job_store_data_lost",
    "Times this process found the job store had lost its "
    "data (Redis restarted without persistence, flushed or evicting)",
)

_seen_lock = threading.Lock()
_seen_methods: set[str] = set()


def publish_stats(st: QueueStats) -> None:
    """Set the store-derived gauges; methods that disappeared from the store read 0, not a stale value."""
    with _seen_lock:
        _seen_methods.update(st.queued, st.running)
        methods = sorted(_seen_methods)
    for m in methods:
        QUEUE_DEPTH.labels(m).set(st.queued.get(m, 0))
        RUNNING.labels(m).set(st.running.get(m, 0))
    OLDEST_QUEUED.set(st.oldest_queued_age_s)
    WORKERS_ALIVE.set(st.workers_alive)
