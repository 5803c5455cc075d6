"""One suite, two backends: the embedded SQLite queue and the Redis queue must behave the same.

Real SQLite files and a real redis-server (Debian package) on a free port; small test JobMethods
(tests/jobs_support.py), so nothing here depends on RELAX.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from contextlib import asynccontextmanager

import pytest
from prometheus_client import REGISTRY

from tests.jobs_support import count_request, markers, run, support_methods, wait_until
from xaiserve.errors import InvalidArgument, NotFound, ResourceExhausted
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.jobs.factory import open_backend
from xaiserve.service.jobs.options import JobOptions
from xaiserve.service.jobs.service import JobService

_prefix = itertools.count()


@pytest.fixture(params=["sqlite", "redis"])
def queue(request, tmp_path, redis_srv) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/jobs.sqlite"
    return f"{redis_srv.url}?prefix=t{next(_prefix)}"  # a fresh keyspace per test


FAST = dict(claim_idle_s=1.0, heartbeat_s=0.2, progress_min_interval_s=0.05, purge_interval_s=0.2, stop_grace_s=2.0)


@asynccontextmanager
async def service(queue: str, *, start: bool = True, **kw):
    opts = JobOptions(**{**FAST, **kw})
    svc = JobService(open_backend(queue, opts), support_methods(), None, opts)
    if start:
        await svc.start()
    try:
        yield svc
    finally:
        await svc.stop(grace_s=kw.get("stop_grace_s", 2.0))


async def collect(svc: JobService, job_id: str) -> list[pb.JobEvent]:
    return [ev async for ev in svc.watch(job_id)]


def test_submit_watch_get(queue, marks):
    async def go():
        async with service(queue) as svc:
            job = await svc.submit(count_request("a", steps=8, step_ms=15))
            assert job.id and job.method == "count" and job.model == "a"
            assert job.state in (pb.QUEUED, pb.RUNNING)
            events = await collect(svc, job.id)
            types = [e.type for e in events]
            assert types[-1] == pb.EVENT_SUCCEEDED
            assert pb.EVENT_STARTED in types and pb.EVENT_PROGRESS in types
            seqs = [e.sequence for e in events]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            progress = [e.progress for e in events if e.type == pb.EVENT_PROGRESS]
            assert progress == sorted(progress) and progress[-1] == 1.0
            assert any(list(e.partial_heatmap.shape) == [4, 4] for e in events if e.type == pb.EVENT_PROGRESS)
            final = events[-1].job
            assert final.state == pb.SUCCEEDED and final.attempts == 1 and final.progress == 1.0
            assert final.result.relax.num_masks == 8 and "run" in final.result.timings
            assert final.finished_unix >= final.started_unix >= final.created_unix > 0
            # GetJob leaves the (large) result out unless asked
            assert not (await svc.get(pb.JobRef(id=job.id))).HasField("result")
            got = await svc.get(pb.JobRef(id=job.id, include_result=True))
            assert got.result == final.result
            # watching a finished job replays its end, with the result
            again = await collect(svc, job.id)
            assert [e.type for e in again] == [pb.EVENT_SUCCEEDED] and again[0].job.result == final.result
        assert len(markers(marks, "a", "start")) == 1 and len(markers(marks, "a", "done")) == 1

    run(go())


def test_bad_requests_rejected_at_submit(queue, marks):
    async def go():
        async with service(queue, embedded_workers=0) as svc:
            with pytest.raises(InvalidArgument, match=r"unknown job method 'relaxx'.*count, fail"):
                await svc.submit(pb.JobRequest(method="relaxx", model="a"))
            with pytest.raises(NotFound, match="missing"):
                await svc.submit(count_request("missing"))
            with pytest.raises(InvalidArgument, match="num_masks"):
                await svc.submit(count_request("a", steps=0))
            with pytest.raises(InvalidArgument, match="deadline_seconds"):
                await svc.submit(count_request("a", deadline_seconds=-1))
            for call in (svc.get, svc.cancel):
                with pytest.raises(NotFound, match="nope"):
                    await call(pb.JobRef(id="nope"))
                with pytest.raises(InvalidArgument, match="empty"):
                    await call(pb.JobRef(id=" "))
            with pytest.raises(NotFound):
                await collect(svc, "nope")
            assert sum(svc.stats().queued.values()) == 0

    run(go())


def test_idempotency_key_returns_the_existing_job(queue, marks):
    async def go():
        async with service(queue) as svc:
            req = count_request("idem", steps=3, step_ms=5, idempotency_key="k-1")
            first = await svc.submit(req)
            second = await svc.submit(req)
            assert second.id == first.id
            await collect(svc, first.id)
            third = await svc.submit(req)  # after it finished: still the same job
            assert third.id == first.id and third.state == pb.SUCCEEDED
            other = count_request("idem", steps=4, step_ms=5, idempotency_key="k-1")
            with pytest.raises(InvalidArgument, match="different request"):
                await svc.submit(other)
            fresh = await svc.submit(count_request("idem", steps=3, step_ms=5, idempotency_key="k-2"))
            assert fresh.id != first.id
            await collect(svc, fresh.id)
        assert len(markers(marks, "idem", "start")) == 2

    run(go())


def test_priority_then_fifo(queue, marks):
    async def go():
        async with service(queue, start=False) as svc:
            ids = {}
            for tag, prio in (("low1", 0), ("high", 5), ("mid", 2), ("low2", 0), ("neg", -3)):
                ids[tag] = (await svc.submit(count_request(tag, steps=1, step_ms=1, priority=prio))).id
            assert (await svc.get(ids["low2"])).queue_position == 3  # behind high, mid, low1
            await svc.start()
            jobs = [await collect(svc, i) for i in ids.values()]
            started = {tag: (await svc.get(i)).started_unix for tag, i in ids.items()}
            assert all(evs[-1].type == pb.EVENT_SUCCEEDED for evs in jobs)
            assert sorted(started, key=started.get) == ["high", "mid", "low1", "low2", "neg"]

    run(go())


def test_full_queue_is_resource_exhausted(queue, marks):
    async def go():
        async with service(queue, embedded_workers=0, max_queued=3) as svc:
            jobs = [await svc.submit(count_request(f"q{i}")) for i in range(3)]
            with pytest.raises(ResourceExhausted, match="full"):
                await svc.submit(count_request("q3"))
            # a retry of a queued job's key is not a new job, so it is not refused
            await svc.cancel(jobs[0].id)
            assert (await svc.submit(count_request("q3"))).state == pb.QUEUED

    run(go())


def test_cancel_queued_and_running(queue, marks):
    async def go():
        async with service(queue) as svc:
            running = await svc.submit(count_request("long", steps=400, step_ms=10))
            queued = await svc.submit(count_request("never", steps=1))
            await wait_until(lambda: markers(marks, "long", "start"))
            c = await svc.cancel(queued.id)
            assert c.state == pb.CANCELLED
            c = await svc.cancel(pb.JobRef(id=running.id))
            assert c.state == pb.CANCELLED
            events = await collect(svc, running.id)
            assert events[-1].type == pb.EVENT_CANCELLED
            # the worker saw it within an iteration and is free again
            await wait_until(lambda: markers(marks, "long", "cancelled"))
            after = await svc.submit(count_request("after", steps=2, step_ms=1))
            assert (await collect(svc, after.id))[-1].type == pb.EVENT_SUCCEEDED
            assert (await svc.cancel(after.id)).state == pb.SUCCEEDED  # finished jobs stay finished
        assert not markers(marks, "never", "start")
        assert not markers(marks, "long", "done")

    run(go())


@pytest.mark.slow
def test_deadlines_expire_queued_and_running_jobs(queue, marks):
    async def go():
        async with service(queue, embedded_workers=0) as svc:
            q = await svc.submit(count_request("late", deadline_seconds=0.2))
            events = await collect(svc, q.id)
            assert events[-1].type == pb.EVENT_EXPIRED
            assert "before a worker started it" in events[-1].job.error
        async with service(queue) as svc:
            r = await svc.submit(count_request("slow", steps=400, step_ms=10, deadline_seconds=1.0))
            events = await collect(svc, r.id)
            assert events[-1].type == pb.EVENT_EXPIRED and "while running" in events[-1].job.error
        assert markers(marks, "slow", "start") and not markers(marks, "slow", "done")
        assert not markers(marks, "late", "start")

    run(go())


def test_failures_retry_then_fail_with_reason(queue, marks):
    async def go():
        async with service(queue) as svc:
            crash = await svc.submit(pb.JobRequest(method="fail", model="crash"))
            known = await svc.submit(pb.JobRequest(method="fail", model="known", relax=pb.RelaxParams(masking="known")))
            ce = await collect(svc, crash.id)
            ke = await collect(svc, known.id)
            assert ce[-1].job.state == pb.FAILED and ce[-1].job.attempts == 3
            assert "failed after 3 attempts" in ce[-1].job.error and "RuntimeError: boom" in ce[-1].job.error
            log = svc.backend.events_after(crash.id, 0)  # the whole event log: submit + two retries
            assert [e.type for e in log].count(pb.EVENT_QUEUED) == 3
            assert [e.type for e in log].count(pb.EVENT_STARTED) == 3
            assert ke[-1].job.state == pb.FAILED and ke[-1].job.attempts == 1
            assert ke[-1].job.error == "the image shows nothing to explain"
            # the service survived: it still runs jobs
            ok = await svc.submit(count_request("ok", steps=1, step_ms=1))
            assert (await collect(svc, ok.id))[-1].type == pb.EVENT_SUCCEEDED
        assert len(markers(marks, "crash", "attempt")) == 3
        assert len(markers(marks, "known", "attempt")) == 1

    run(go())


def test_finished_jobs_are_purged_after_the_ttl(queue, marks):
    async def go():
        async with service(queue, result_ttl_s=0.5) as svc:
            job = await svc.submit(count_request("ttl", steps=1, step_ms=1, idempotency_key="ttl-key"))
            await collect(svc, job.id)
            assert (await svc.get(job.id)).state == pb.SUCCEEDED

            async def gone():
                try:
                    await svc.get(job.id)
                    return False
                except NotFound:
                    return True

            await wait_until(gone, timeout=10)
            # the idempotency key went with it: the same key now makes a new job
            again = await svc.submit(count_request("ttl", steps=1, step_ms=1, idempotency_key="ttl-key"))
            assert again.id != job.id

    run(go())


@pytest.mark.slow
def test_stop_hands_the_running_job_back(queue, marks):
    async def go():
        async with service(queue, stop_grace_s=0.1) as svc:
            job = await svc.submit(count_request("handback", steps=80, step_ms=10))
            await wait_until(lambda: markers(marks, "handback", "start"))
        # stopped mid-job: back in the queue, the interrupted run not counted as an attempt
        async with service(queue, embedded_workers=0) as gw:
            back = await gw.get(job.id)
            assert back.state == pb.QUEUED and back.attempts == 0
        async with service(queue) as svc:
            job2 = await svc.get(job.id)
            events = await collect(svc, job2.id)
            assert events[-1].job.state == pb.SUCCEEDED and events[-1].job.attempts == 1
        assert len(markers(marks, "handback", "start")) == 2 and len(markers(marks, "handback", "done")) == 1

    run(go())


def test_metrics_count_jobs_with_low_cardinality_labels(queue, marks):
    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    async def go():
        before = (
            value("xaiserve_jobs_total", method="count", state="succeeded"),
            value("xaiserve_job_queue_wait_seconds_count", method="count"),
            value("xaiserve_job_run_seconds_count", method="count", state="succeeded"),
        )
        async with service(queue) as svc:
            for i in range(2):
                job = await svc.submit(count_request(f"m{i}", steps=1, step_ms=1))
                await collect(svc, job.id)
            await asyncio.to_thread(svc._housekeeper.tick)
        after = (
            value("xaiserve_jobs_total", method="count", state="succeeded"),
            value("xaiserve_job_queue_wait_seconds_count", method="count"),
            value("xaiserve_job_run_seconds_count", method="count", state="succeeded"),
        )
        assert [a - b for a, b in zip(after, before)] == [2, 2, 2]
        assert REGISTRY.get_sample_value("xaiserve_job_queue_depth", {"method": "count"}) == 0
        labels = {
            k
            for m in REGISTRY.collect()
            if m.name.startswith(("xaiserve_job", "xaiserve_worker"))
            for s in m.samples
            for k in s.labels
        }
        assert labels <= {"method", "state", "reason", "le"}

    run(go())


class Clock:
    """The `now=` given to the backends. The SQLite backend judges leases only by it, so its clock
    is advanced without waiting; Redis measures a lease's idle time with its own clock
    (XAUTOCLAIM's min-idle-time), so for Redis the test waits as well."""

    def __init__(self, queue: str):
        self.t, self.wait = time.time(), queue.startswith("redis")

    def advance(self, seconds: float) -> None:
        if self.wait:
            time.sleep(seconds)
        self.t += seconds


def test_dead_workers_job_is_rerun_then_failed_and_stale_claims_are_fenced(queue):
    """At-least-once with exactly one stored outcome: a claim that lost its job can write nothing."""
    import socket

    opts = JobOptions(claim_idle_s=0.2, heartbeat_s=0.05, max_attempts=3)
    backend = open_backend(queue, opts)
    clock = Clock(queue)
    try:
        job, created = backend.submit(count_request("ghost"), job_id="g" * 32, now=clock.t)
        assert created
        ghost = f"worker@{socket.gethostname()}:1"  # pid 1 is alive: only the missed heartbeats count
        claims = []
        for attempt in (1, 2, 3):
            c = backend.claim(f"{ghost}#{attempt}", ["count"], now=clock.t)
            assert c is not None and c.attempt == attempt and c.job_id == job.id
            claims.append(c)
            assert backend.claim("other", ["count"], now=clock.t) is None  # nobody else gets it
            clock.advance(0.3)  # no heartbeat for longer than claim_idle_s
            done = backend.recover(now=clock.t, reclaimer="reclaimer")
            assert [(r.job_id, r.outcome) for r in done] == [(job.id, "requeued" if attempt < 3 else "failed")]
        final = backend.get(job.id)
        assert final.state == pb.FAILED and final.attempts == 3
        assert "failed after 3 attempts" in final.error and "#3" in final.error
        stale = claims[0]
        assert not backend.is_current(stale)
        assert not backend.heartbeat(stale, now=clock.t)
        assert not backend.progress(stale, pb.JobEvent(type=pb.EVENT_PROGRESS, progress=0.5, unix_time=clock.t))
        assert not backend.finish(stale, pb.SUCCEEDED, now=clock.t, result=pb.JobResult(parameters_json="{}"))
        assert not backend.requeue(stale, now=clock.t, reason="x", count_attempt=True)
        assert backend.get(job.id, include_result=True).state == pb.FAILED
        ends = [e for e in backend.events_after(job.id, 0) if e.type in (pb.EVENT_SUCCEEDED, pb.EVENT_FAILED)]
        assert len(ends) == 1
    finally:
        backend.close()


def test_heartbeats_keep_a_long_job_with_its_worker(queue):
    opts = JobOptions(claim_idle_s=0.3, heartbeat_s=0.05)
    backend = open_backend(queue, opts)
    clock = Clock(queue)
    try:
        backend.submit(count_request("alive"), job_id="h" * 32, now=clock.t)
        c = backend.claim("worker@elsewhere:1", ["count"], now=clock.t)
        for _ in range(8):  # 0.8 s, well past claim_idle_s, heart-beating all along
            clock.advance(0.1)
            assert backend.heartbeat(c, now=clock.t)
            assert backend.recover(now=clock.t, reclaimer="reclaimer") == []
        assert backend.finish(c, pb.SUCCEEDED, now=clock.t, result=pb.JobResult(parameters_json="{}"))
        assert backend.get(c.job_id, include_result=True).result.parameters_json == "{}"
    finally:
        backend.close()
