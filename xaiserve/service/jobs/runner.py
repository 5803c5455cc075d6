"""The worker loop shared by embedded worker threads (JobService) and `xaiserve worker` processes.

A JobWorker takes jobs of its methods from a backend, runs each in its own thread with a JobContext
(progress, cancellation), heart-beats while it runs, and ends the job:

- the method returns a pb.JobResult          -> SUCCEEDED (result stored once, fenced by the claim)
- it raises JobCancelled (cancel / deadline)  -> CANCELLED / EXPIRED
- it raises an XaiError (a reason it knows)   -> FAILED with that message (no retry: it would fail again)
- it raises anything else (a crash, OOM ...)  -> re-queued, up to max_attempts, then FAILED with the reason
- the worker is stopping (SIGTERM) and the job does not finish within the grace period
                                              -> handed back to the queue without counting an attempt
Nothing a method raises escapes the loop, so a bad job never takes the server or the worker down.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Mapping, Sequence

import numpy as np

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.errors import XaiError
from xaiserve.service.jobs import metrics
from xaiserve.service.jobs.backend import Claim, JobBackend, Recovered, state_name
from xaiserve.service.jobs.contract import JobCancelled, JobMethod
from xaiserve.service.jobs.options import JobOptions
from xaiserve.service.tensors import to_tensor

log = logging.getLogger("xaiserve.jobs.worker")


class RunContext:
    """The JobContext a method sees (service/jobs/contract.py)."""

    def __init__(self, backend: JobBackend, claim: Claim, options: JobOptions, hand_back: threading.Event):
        self.backend, self.claim, self.options = backend, claim, options
        self._hand_back = hand_back
        self._last_heat = -math.inf
        self._last_number = -math.inf
        self._last_fraction = -1.0
        self._last_check = -math.inf
        self.lost = False  # the store no longer says this claim runs the job (cancelled, expired, reclaimed)
        self.expired = False
        self.handed_back = False

    # -- progress ------------------------------------------------------------------------------
    def report(
        self,
        fraction: float,
        *,
        heatmap: np.ndarray | None = None,
        score: float | None = None,
        metrics: dict[str, float] | None = None,
        message: str = "",
    ) -> None:
        f = float(fraction)
        f = 0.0 if not math.isfinite(f) else min(1.0, max(0.0, f))
        now = time.monotonic()
        heat_due = heatmap is not None and now - self._last_heat >= self.options.progress_min_interval_s
        number_due = now - self._last_number >= self.options.progress_min_interval_s / 5.0
        final = f >= 1.0 and self._last_fraction < 1.0
        if not (heat_due or number_due or final):
            return
        ev = pb.JobEvent(type=pb.EVENT_PROGRESS, progress=f, message=message, unix_time=time.time())
        if score is not None and math.isfinite(float(score)):
            ev.score = float(score)
        for k, v in (metrics or {}).items():
            ev.metrics[str(k)] = float(v)
        if heat_due:
            ev.partial_heatmap.CopyFrom(to_tensor(np.asarray(heatmap, dtype=np.float32)))
            self._last_heat = now
        self._last_number, self._last_fraction = now, f
        try:
            if not self.backend.progress(self.claim, ev):
                self.lost = True
        except Exception as e:  # noqa: BLE001 - progress is best effort; the job goes on
            log.warning("progress not recorded", extra={"job": self.claim.job_id, "error": repr(e)})

    # -- cancellation --------------------------------------------------------------------------
    def _stop_reason(self) -> str | None:
        if self._hand_back.is_set():
            self.handed_back = True
            return "the worker is shutting down; the job goes back to the queue"
        if self.claim.deadline_unix and time.time() > self.claim.deadline_unix:
            self.expired = True
            return "the job's deadline passed"
        if self.lost:
            return "the job was cancelled or handed to another worker"
        now = time.monotonic()
        if now - self._last_check >= self.options.cancel_check_interval_s:
            self._last_check = now
            try:
                if not self.backend.is_current(self.claim):
                    self.lost = True
                    return "the job was cancelled or handed to another worker"
            except Exception as e:  # noqa: BLE001 - a store hiccup is not a cancellation
                log.warning("could not read the cancel flag", extra={"job": self.claim.job_id, "error": repr(e)})
        return None

    def check_cancelled(self) -> None:
        why = self._stop_reason()
        if why is not None:
            raise JobCancelled(why)

    @property
    def cancelled(self) -> bool:
        return self._stop_reason() is not None


class JobWorker:
    """Takes and runs jobs until `stop` is set; `hand_back` makes the running job go back to the queue."""

    def __init__(
        self,
        backend: JobBackend,
        methods: Mapping[str, JobMethod],
        registry,
        options: JobOptions,
        worker_id: str,
        *,
        stop: threading.Event | None = None,
        hand_back: threading.Event | None = None,
    ):
        self.backend, self.methods, self.registry, self.options = backend, dict(methods), registry, options
        self.worker_id = worker_id
        self.stop = stop or threading.Event()
        self.hand_back = hand_back or threading.Event()
        self.current: Claim | None = None

    @property
    def method_names(self) -> Sequence[str]:
        return sorted(self.methods)

    def run(self) -> None:
        """The loop of one worker thread."""
        metrics.WORKER_THREADS.inc()
        backoff = 0.1
        last_touch = -math.inf
        try:
            while not self.stop.is_set():
                try:
                    if time.monotonic() - last_touch >= self.options.heartbeat_s:
                        self.backend.touch_worker(self.worker_id, now=time.time())
                        last_touch = time.monotonic()
                    claim = self.backend.claim(self.worker_id, self.method_names, now=time.time())
                    if claim is None:
                        self.backend.wait_for_work(self.method_names, timeout=1.0)
                        backoff = 0.1
                        continue
                except Exception as e:  # noqa: BLE001 - the store is unreachable: wait and retry
                    if self.stop.is_set():
                        break
                    log.warning("job store error; retrying", extra={"worker": self.worker_id, "error": repr(e)})
                    self.stop.wait(backoff)
                    backoff = min(5.0, backoff * 2)
                    continue
                backoff = 0.1
                self.execute(claim)
        finally:
            metrics.WORKER_THREADS.dec()

    def _heartbeat(self, claim: Claim, ctx: RunContext, done: threading.Event) -> None:
        while not done.wait(self.options.heartbeat_s):
            try:
                if not self.backend.heartbeat(claim, now=time.time()):
                    ctx.lost = True
                    return
            except Exception as e:  # noqa: BLE001 - keep trying: a missed beat is only fatal after claim_idle_s
                log.warning("heartbeat failed", extra={"job": claim.job_id, "error": repr(e)})

    def execute(self, claim: Claim) -> None:
        """Run one claimed job to its end. Whatever the method raises is handled here (only
        KeyboardInterrupt/SystemExit are re-raised, after the job was handed back)."""
        method_name = claim.method
        metrics.QUEUE_WAIT.labels(method_name).observe(max(0.0, time.time() - claim.queued_unix))
        metrics.JOBS.labels(method_name, "running").inc()
        metrics.WORKER_BUSY.inc()
        ctx = RunContext(self.backend, claim, self.options, self.hand_back)
        done = threading.Event()
        hb = threading.Thread(
            target=self._heartbeat, args=(claim, ctx, done), daemon=True, name=f"heartbeat-{claim.job_id[:8]}"
        )
        hb.start()
        self.current = claim
        t0 = time.perf_counter()
        result: object = None
        error: BaseException | None = None
        try:
            method = self.methods[method_name]
            ctx.check_cancelled()
            result = method.run(claim.request, self.registry, ctx)
            if claim.request.output_format and isinstance(result, pb.JobResult):  # DICOM results
                from xaiserve.service.dicom_out import add_job_dicom

                add_job_dicom(claim.request, result, self.registry)
        except BaseException as e:  # noqa: BLE001 - every outcome of a method is handled below
            error = e
            if not isinstance(e, Exception):  # KeyboardInterrupt / SystemExit: hand back, re-raise below
                ctx.handed_back = True
        finally:
            done.set()
            hb.join(timeout=5.0)
            self.current = None
            metrics.WORKER_BUSY.dec()
        seconds = time.perf_counter() - t0
        try:
            outcome, ended_here = self._conclude(claim, ctx, result, error, seconds)
        except Exception as e:  # noqa: BLE001 - the store failed at the end: the lease lapses, another worker reruns it
            outcome, ended_here = "lost", False
            log.error(
                "could not record the job's end; it will be recovered", extra={"job": claim.job_id, "error": repr(e)}
            )
        metrics.WORKER_JOBS.labels(method_name, outcome).inc()
        metrics.RUN_TIME.labels(method_name, outcome).observe(seconds)
        if ended_here:
            metrics.JOBS.labels(method_name, outcome).inc()
            metrics.ATTEMPTS.labels(method_name).observe(claim.attempt)
        log.info(
            "job ended",
            extra={
                "job": claim.job_id,
                "method": method_name,
                "outcome": outcome,
                "attempt": claim.attempt,
                "seconds": round(seconds, 4),
                "worker": self.worker_id,
            },
        )
        if error is not None and not isinstance(error, Exception):
            raise error

    def _conclude(
        self, claim: Claim, ctx: RunContext, result: object, error: BaseException | None, seconds: float
    ) -> tuple[str, bool]:
        """End the job in the store; returns (outcome label, whether this call ended the job)."""
        now = time.time()
        b = self.backend

        def end(state: int, **kw) -> tuple[str, bool]:
            if b.finish(claim, state, now=now, **kw):
                return state_name(state), True
            return "lost", False

        if ctx.handed_back:
            ok = b.requeue(
                claim, now=now, reason=f"worker {self.worker_id} shut down; handed back", count_attempt=False
            )
            if ok:
                metrics.RETRIES.labels(claim.method, "handed_back").inc()
            return ("handed_back" if ok else "lost"), False
        if ctx.lost:
            # Someone else ended or took the job (a CancelJob, housekeeping); say which for the worker metric.
            job = b.get(claim.job_id)
            return (state_name(job.state) if job is not None and job.state == pb.CANCELLED else "lost"), False
        if isinstance(error, JobCancelled) or (error is None and ctx.expired):
            if ctx.expired or (claim.deadline_unix and now > claim.deadline_unix):
                d = claim.deadline_unix - claim.created_unix
                return end(
                    pb.EXPIRED,
                    error=f"deadline of {d:.3g} s passed while running "
                    f"({now - claim.created_unix:.3g} s after submission)",
                )
            return end(pb.CANCELLED, error=str(error or ""))
        if isinstance(error, XaiError):
            return end(pb.FAILED, error=str(error) or type(error).__name__)
        if error is not None:
            reason = f"{type(error).__name__}: {error}"
            log.error("job method raised", exc_info=error, extra={"job": claim.job_id, "attempt": claim.attempt})
            if claim.attempt < self.options.max_attempts:
                ok = b.requeue(
                    claim,
                    now=now,
                    count_attempt=True,
                    reason=f"attempt {claim.attempt} of {self.options.max_attempts} failed ({reason}); retrying",
                )
                if ok:
                    metrics.RETRIES.labels(claim.method, "error").inc()
                return ("requeued" if ok else "lost"), False
            return end(pb.FAILED, error=f"failed after {claim.attempt} attempts; last error: {reason}")
        if not isinstance(result, pb.JobResult):
            return end(
                pb.FAILED,
                error=f"job method {claim.method!r} returned {type(result).__name__}, "
                "not a JobResult (a bug in the method)",
            )
        if "run" not in result.timings:
            result.timings["run"] = seconds
        return end(pb.SUCCEEDED, result=result)


class Housekeeper:
    """Recover jobs of dead workers, expire queued jobs past their deadline, purge old ones, refresh gauges.

    Safe to run in every gateway and worker at once: each step is one atomic store operation.
    """

    def __init__(self, backend: JobBackend, options: JobOptions, reclaimer: str):
        self.backend, self.options, self.reclaimer = backend, options, reclaimer
        self._last_purge = -math.inf

    @property
    def interval_s(self) -> float:
        return max(0.05, min(self.options.claim_idle_s / 2.0, self.options.purge_interval_s, 5.0))

    def tick(self) -> list[Recovered]:
        now = time.time()
        lost = self.backend.check_integrity(now=now)
        if lost:
            metrics.STORE_DATA_LOST.inc()
            log.error(lost, extra={"backend": self.backend.kind})
        done = self.backend.recover(now=now, reclaimer=self.reclaimer) + self.backend.expire_due(now=now)
        count(done)
        if time.monotonic() - self._last_purge >= self.options.purge_interval_s:
            n = self.backend.purge(now=now)
            self._last_purge = time.monotonic()
            if n:
                log.info("purged finished jobs", extra={"count": n})
        metrics.publish_stats(self.backend.stats(now=now))
        return done


def count(done: list[Recovered]) -> None:
    """Metrics and logs for jobs recovered / expired by housekeeping or at claim time."""
    for r in done:
        if r.outcome == "requeued":
            metrics.RETRIES.labels(r.method, "worker_lost").inc()
        else:
            metrics.JOBS.labels(r.method, r.outcome).inc()
        log.info("job recovered", extra={"job": r.job_id, "method": r.method, "outcome": r.outcome})
