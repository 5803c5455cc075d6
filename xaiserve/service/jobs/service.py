"""JobService: what the gRPC layer calls for SubmitJob / WatchJob / GetJob / CancelJob.

It validates requests with the job method at submit time (so nothing known then fails later), keeps
the store calls off the event loop, runs the embedded workers (threads: torch and ONNX Runtime release
the GIL, and a method that raises never takes the server down) and a housekeeping task (recover jobs
of dead workers, expire, purge, refresh gauges).

Tenancy: every call names the calling principal (service.security.Principals; "anonymous" without
tokens or client certificates). A job records the principal that submitted it; GetJob, WatchJob and
CancelJob of another principal's job answer NOT_FOUND with the message an unknown id gets (never
confirming the job exists), idempotency keys are scoped per principal, and principals in `admins`
see every job.

Lifecycle:  svc = JobService(backend, methods, registry, options); await svc.start(); ...; await svc.stop()
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from datetime import datetime, timezone
from typing import AsyncIterator, Awaitable, Callable, Mapping, TypeVar

from xaiserve.methods import METHODS
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.dicom_out import prepare_job_request
from xaiserve.service.errors import InvalidArgument, NotFound, Unavailable, quote
from xaiserve.service.jobs import metrics
from xaiserve.service.jobs.backend import (
    ANONYMOUS,
    TERMINAL_EVENT,
    TERMINAL_EVENT_TYPES,
    TERMINAL_STATES,
    JobBackend,
    job_id_time,
    new_job_id,
    worker_identity,
)
from xaiserve.service.jobs.contract import JobMethod
from xaiserve.service.jobs.options import JobOptions
from xaiserve.service.jobs.runner import Housekeeper, JobWorker, count

log = logging.getLogger("xaiserve.jobs")

T = TypeVar("T")
MAX_IDEMPOTENCY_KEY = 256
WATCH_POLL_S = 5.0  # a watcher re-reads the job at least this often (covers trimmed events)


class JobService:
    """Durable, cancellable jobs over a JobBackend (SQLite embedded or Redis distributed)."""

    def __init__(
        self,
        backend: JobBackend,
        methods: Mapping[str, JobMethod],
        registry,
        options: JobOptions | None = None,
        *,
        role: str = "gateway",
        admins: frozenset[str] | set[str] | tuple[str, ...] = (),
    ):
        self.backend = backend
        self.methods: dict[str, JobMethod] = dict(methods)
        for name, m in self.methods.items():
            if getattr(m, "name", name) != name:
                raise ValueError(f"job method registered as {name!r} calls itself {m.name!r}")
        self.registry = registry
        self.options = options or JobOptions()
        self.admins = frozenset(admins)
        self.identity = worker_identity(role)
        self.backend.observer = count
        self._stop = threading.Event()
        self._hand_back = threading.Event()
        self._workers: list[tuple[JobWorker, threading.Thread]] = []
        self._housekeeper = Housekeeper(backend, self.options, self.identity)
        self._house_task: asyncio.Task | None = None
        self._started = False
        self._stopped = False

    # -- plumbing ------------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args, **kw) -> T:
        """Run a (short, blocking) store call in a thread; an unreachable store becomes UNAVAILABLE."""
        try:
            return await asyncio.to_thread(fn, *args, **kw)
        except self.backend.transient_errors as e:
            log.warning("job store unreachable", extra={"backend": self.backend.kind, "error": repr(e)})
            raise Unavailable(f"the job store ({self.backend.kind}) is unreachable; retry shortly") from None

    @staticmethod
    def _job_id(ref: pb.JobRef | str) -> str:
        job_id = ref if isinstance(ref, str) else ref.id
        job_id = job_id.strip()
        if not job_id:
            raise InvalidArgument("job id is empty: pass the id SubmitJob returned")
        if len(job_id) > 128:
            raise InvalidArgument(f"job id {quote(job_id)} is longer than 128 characters; it is not one of ours")
        return job_id

    def _not_found(self, job_id: str) -> NotFound:
        """What GetJob/WatchJob/CancelJob say for an id this principal cannot see: the same for an id
        that never existed, one that was purged or lost, and another principal's job. It says what
        the id itself tells (when it was created), never whether the job exists."""
        created = job_id_time(job_id)
        if created is None:
            return NotFound(
                f"job {quote(job_id)} not found: it is not an id this queue issued (use the id SubmitJob returned)"
            )
        now = time.time()
        when = datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="seconds")
        head = f"job {job_id} (submitted {when}, {now - created:.0f} s ago) not found"
        ttl = self.options.result_ttl_s
        if now - created > ttl:
            return NotFound(f"{head}: finished jobs are purged {ttl:g} s after they end, so it has likely been purged")
        lost = self.backend.lost_at
        if lost and created < lost:
            return NotFound(
                f"{head}: the job store lost its data at "
                f"{datetime.fromtimestamp(lost, timezone.utc).isoformat(timespec='seconds')} "
                "(a restart without persistence?); submit the job again"
            )
        return NotFound(
            f"{head}: this queue has no job with this id visible to this caller (it may belong to "
            "another caller or another queue, or the store lost it)"
        )

    def _visible(self, job: pb.Job | None, principal: str) -> bool:
        return job is not None and (job.owner == principal or principal in self.admins)

    # -- API -----------------------------------------------------------------------------------
    async def submit(self, request: pb.JobRequest, *, principal: str = ANONYMOUS) -> pb.Job:
        method = self.methods.get(request.method)
        if method is None:
            avail = ", ".join(sorted(self.methods)) or "(none configured)"
            raise InvalidArgument(f"unknown job method {quote(request.method)}; this server runs: {avail}")
        d = request.deadline_seconds
        if not math.isfinite(d) or d < 0:
            raise InvalidArgument(f"deadline_seconds must be >= 0 (0 = none), got {d}")
        if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument(
                f"idempotency_key {quote(request.idempotency_key)} is longer than {MAX_IDEMPOTENCY_KEY} characters"
            )
        # The methods table decides whether the method applies to the model (what ListModels
        # advertises); then the method checks parameters and image: a job never fails later for these.
        await asyncio.to_thread(self._validate, method, request)
        # DICOM: the result format is checked now, and the store gets the image without patient data
        request = await asyncio.to_thread(prepare_job_request, request)
        now = time.time()
        job, created = await self._call(self.backend.submit, request, job_id=new_job_id(now), now=now, owner=principal)
        if created:
            metrics.JOBS.labels(request.method, "queued").inc()
        return job

    def _validate(self, method: JobMethod, request: pb.JobRequest) -> None:
        # methods registered in the table (relax, ablation_path) are checked against it; a custom
        # JobMethod given as module:Class (not in the table) validates its requests alone
        if request.method in METHODS and self.registry is not None and hasattr(self.registry, "check_method"):
            self.registry.check_method(self.registry.resolve(request.model), request.method, self.methods)
        method.validate(request, self.registry)

    async def get(
        self, ref: pb.JobRef | str, *, include_result: bool | None = None, principal: str = ANONYMOUS
    ) -> pb.Job:
        job_id = self._job_id(ref)
        inc = (
            include_result
            if include_result is not None
            else (ref.include_result if isinstance(ref, pb.JobRef) else True)
        )
        job = await self._call(self.backend.get, job_id, include_result=inc)
        if not self._visible(job, principal):
            raise self._not_found(job_id)
        return job

    async def cancel(self, ref: pb.JobRef | str, *, principal: str = ANONYMOUS) -> pb.Job:
        job_id = self._job_id(ref)
        before = await self._call(self.backend.get, job_id)
        if not self._visible(before, principal):
            raise self._not_found(job_id)
        job = await self._call(self.backend.cancel, job_id, now=time.time())
        if job is None:
            raise self._not_found(job_id)
        if before.state not in TERMINAL_STATES and job.state == pb.CANCELLED:
            metrics.JOBS.labels(job.method, "cancelled").inc()
        if isinstance(ref, pb.JobRef) and ref.include_result and job.state == pb.SUCCEEDED:
            job = await self.get(job_id, include_result=True, principal=principal)
        return job

    async def watch(self, ref: pb.JobRef | str, *, principal: str = ANONYMOUS) -> AsyncIterator[pb.JobEvent]:
        """The job's current state first (with the latest partial heatmap), then live events to the end."""
        job_id = self._job_id(ref)
        snap = await self._call(self.backend.snapshot, job_id)
        if snap is None or not self._visible(snap[0], principal):
            raise self._not_found(job_id)
        job, cursor = snap
        if job.state in TERMINAL_STATES:
            yield await self._terminal_event(job, cursor)
            return
        yield await self._replay_event(job, cursor)
        failures = 0
        while True:
            try:
                events = await self.backend.wait_events(job_id, cursor, WATCH_POLL_S)
                failures = 0
            except self.backend.transient_errors as e:
                failures += 1
                if failures > 10:
                    raise Unavailable(
                        f"the job store ({self.backend.kind}) is unreachable; watch again later"
                    ) from None
                log.warning("watch: job store unreachable; retrying", extra={"error": repr(e)})
                await asyncio.sleep(min(5.0, 0.2 * 2**failures))
                continue
            if not events:
                snap = await self._call(self.backend.snapshot, job_id)
                if snap is None:  # purged while we watched
                    return
                job, seq = snap
                if seq > cursor:
                    # Events we have not seen and the store no longer has (trimmed): resume from the state.
                    if job.state in TERMINAL_STATES:
                        yield await self._terminal_event(job, seq)
                        return
                    missed = await self._call(self.backend.events_after, job_id, cursor)
                    if not missed:
                        cursor = seq
                continue
            for ev in events:
                if ev.sequence <= cursor:
                    continue
                cursor = ev.sequence
                if ev.type in TERMINAL_EVENT_TYPES:
                    full = await self._call(self.backend.get, job_id, include_result=True)
                    if full is not None:
                        ev.job.CopyFrom(full)
                    yield ev
                    return
                yield ev

    async def _terminal_event(self, job: pb.Job, seq: int) -> pb.JobEvent:
        full = await self._call(self.backend.get, job.id, include_result=True)
        job = full if full is not None else job
        ev = pb.JobEvent(
            job_id=job.id,
            type=TERMINAL_EVENT[job.state],
            progress=job.progress,
            message=job.error,
            unix_time=job.finished_unix,
            sequence=seq,
        )
        ev.job.CopyFrom(job)
        return ev

    async def _replay_event(self, job: pb.Job, seq: int) -> pb.JobEvent:
        ev = pb.JobEvent(
            job_id=job.id,
            type=pb.EVENT_QUEUED if job.state == pb.QUEUED else pb.EVENT_STARTED,
            progress=job.progress,
            unix_time=time.time(),
            sequence=seq,
            message="current state",
        )
        ev.job.CopyFrom(job)
        if job.state == pb.RUNNING:
            recent = await self._call(
                self.backend.events_after,
                job.id,
                max(0, seq - self.options.events_per_job),
                limit=self.options.events_per_job,
            )
            progress = [e for e in recent if e.type == pb.EVENT_PROGRESS and e.sequence <= seq]
            heat = next((e for e in reversed(progress) if e.HasField("partial_heatmap")), None)
            if heat is not None:  # the newest heatmap, which may be older than the newest numbers
                ev.partial_heatmap.CopyFrom(heat.partial_heatmap)
            last = progress[-1] if progress else None
            if last is not None:
                if last.HasField("score"):
                    ev.score = last.score
                for k, v in last.metrics.items():
                    ev.metrics[k] = v
        return ev

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Recover jobs of dead workers (a restart), start the embedded workers and housekeeping."""
        if self._started:
            return
        self._started = True
        try:
            await asyncio.to_thread(self._housekeeper.tick)
        except self.backend.transient_errors as e:
            log.warning("job store unreachable at start; housekeeping will retry", extra={"error": repr(e)})
        for i in range(self.options.embedded_workers):
            w = JobWorker(
                self.backend,
                self.methods,
                self.registry,
                self.options,
                f"{self.identity}#{i}",
                stop=self._stop,
                hand_back=self._hand_back,
            )
            t = threading.Thread(target=w.run, name=f"job-worker-{i}", daemon=True)
            t.start()
            self._workers.append((w, t))
        self._house_task = asyncio.create_task(self._housekeeping(), name="jobs-housekeeping")
        log.info(
            "job service started",
            extra={
                "backend": self.backend.kind,
                "workers": self.options.embedded_workers,
                "methods": sorted(self.methods),
            },
        )

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self._housekeeper.interval_s)
            try:
                await asyncio.to_thread(self._housekeeper.tick)
            except Exception as e:  # noqa: BLE001 - keep the loop alive through store outages
                log.warning("job housekeeping failed", extra={"error": repr(e)})

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking jobs; running jobs may finish within the grace period, then go back to the queue."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.options.stop_grace_s if grace_s is None else grace_s
        if self._house_task is not None:
            self._house_task.cancel()
            try:
                await self._house_task
            except asyncio.CancelledError:
                pass
        self._stop.set()
        if self._workers:
            try:
                await self._call(self.backend.wake_workers, sorted(self.methods), len(self._workers))
            except Unavailable:
                pass  # they notice within their wait timeout anyway
        await asyncio.to_thread(_join, [t for _, t in self._workers], grace)
        if any(t.is_alive() for _, t in self._workers):
            self._hand_back.set()  # running jobs go back to the queue at their next check_cancelled
            await asyncio.to_thread(_join, [t for _, t in self._workers], max(5.0, grace))
        alive = [w.worker_id for w, t in self._workers if t.is_alive()]
        if alive:
            log.warning("job workers still busy at stop; their jobs will be recovered", extra={"workers": alive})
        aclose: Callable[[], Awaitable[None]] | None = getattr(self.backend, "aclose", None)
        if aclose is not None:
            await aclose()
        if not alive:
            self.backend.close()
        log.info("job service stopped")

    def stats(self):
        return self.backend.stats(now=time.time())


def _join(threads: list[threading.Thread], timeout: float) -> None:
    end = time.monotonic() + timeout
    for t in threads:
        t.join(timeout=max(0.0, end - time.monotonic()))
