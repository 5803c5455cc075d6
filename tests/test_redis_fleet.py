"""The distributed queue as deployed: a real redis-server, two gateways (JobService instances with no
workers of their own) and real `python -m xaiserve.service.worker` processes running the test methods."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import urllib.request
from contextlib import asynccontextmanager, contextmanager

import pytest

from tests.jobs_support import (
    RedisServer,
    WorkerProcess,
    count_request,
    markers,
    run,
    support_methods,
    wait_until,
)
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.jobs.factory import open_backend
from xaiserve.service.jobs.options import JobOptions
from xaiserve.service.jobs.service import JobService

_prefix = itertools.count()
GATEWAY = JobOptions(embedded_workers=0, claim_idle_s=1.0, heartbeat_s=0.2, progress_min_interval_s=0.05)


@pytest.fixture
def queue(redis_srv) -> str:
    return f"{redis_srv.url}?prefix=fleet{next(_prefix)}"


@asynccontextmanager
async def gateways(queue: str, n: int = 2):
    svcs = [JobService(open_backend(queue, GATEWAY), support_methods(), None, GATEWAY) for _ in range(n)]
    for s in svcs:
        await s.start()
    try:
        yield svcs
    finally:
        for s in svcs:
            await s.stop()


@contextmanager
def workers(queue: str, marks, tmp_path, n: int = 2, **kw):
    procs = []
    try:
        for i in range(n):
            procs.append(WorkerProcess(queue, markers_dir=marks, log_path=tmp_path / f"worker{i}.log", **kw))
        yield procs
    finally:
        for p in procs:
            p.close()


async def watch(svc: JobService, job_id: str) -> list[pb.JobEvent]:
    return [ev async for ev in svc.watch(job_id)]


def result_pid(job: pb.Job) -> int:
    return json.loads(job.result.parameters_json)["pid"]


@pytest.mark.slow
def test_two_gateways_two_workers_each_job_once(queue, marks, tmp_path):
    async def go():
        async with gateways(queue) as (a, b):
            with workers(queue, marks, tmp_path) as procs:
                jobs = [await (a if i % 2 else b).submit(count_request(f"j{i}", steps=5, step_ms=20)) for i in range(8)]
                # each job is watched through the *other* gateway
                results = await asyncio.gather(*(watch(b if i % 2 else a, j.id) for i, j in enumerate(jobs)))
                for evs in results:
                    assert evs[-1].type == pb.EVENT_SUCCEEDED and evs[-1].job.attempts == 1
                pids = {result_pid(evs[-1].job) for evs in results}
                assert pids <= {p.proc.pid for p in procs}
                for i in range(8):
                    assert len(markers(marks, f"j{i}", "start")) == 1 and len(markers(marks, f"j{i}", "done")) == 1
                # progress written by a worker reaches a gateway that never touched the job
                assert any(e.type == pb.EVENT_PROGRESS for evs in results for e in evs)

                # per-worker /metrics: jobs run by each worker (they add up), and the shared queue gauges
                def scrape() -> str:
                    return "".join(
                        urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=5).read().decode()
                        for p in procs
                    )

                def ran(text: str) -> float:
                    return sum(
                        float(line.rsplit(" ", 1)[1])
                        for line in text.splitlines()
                        if line.startswith('xaiserve_worker_jobs_total{method="count",state="succeeded"}')
                    )

                # a worker counts a job just after storing its result, so the gateway may see the end first
                def all_counted() -> str | None:
                    t = scrape()
                    return t if ran(t) >= 8 else None

                text = await wait_until(all_counted, timeout=10)
                assert ran(text) == 8
                assert "xaiserve_job_oldest_queued_age_seconds" in text

    run(go(), timeout=90)


@pytest.mark.slow
def test_sigkill_worker_mid_job_another_finishes_it_once(queue, marks, tmp_path):
    async def go():
        async with gateways(queue) as (a, b):
            with workers(queue, marks, tmp_path, n=1) as (first,):
                job = await a.submit(count_request("kill", steps=60, step_ms=20))
                await wait_until(lambda: markers(marks, "kill", "start"))
                first.signal(signal.SIGKILL)
                first.wait()
                with workers(queue, marks, tmp_path, n=1) as (second,):
                    events = await watch(b, job.id)
                    final = events[-1].job
                    assert final.state == pb.SUCCEEDED and final.attempts == 2
                    assert result_pid(final) == second.proc.pid
                    log = a.backend.events_after(job.id, 0)
                    assert [e.type for e in log].count(pb.EVENT_SUCCEEDED) == 1
                    assert any("stopped heart-beating" in e.message for e in log if e.type == pb.EVENT_QUEUED)
        assert len(markers(marks, "kill", "start")) == 2 and len(markers(marks, "kill", "done")) == 1

    run(go(), timeout=90)


@pytest.mark.slow
def test_cancel_reaches_the_worker(queue, marks, tmp_path):
    async def go():
        async with gateways(queue) as (a, b):
            with workers(queue, marks, tmp_path, n=1):
                job = await a.submit(count_request("cancel", steps=500, step_ms=10))
                await wait_until(lambda: markers(marks, "cancel", "start"))
                assert (await b.cancel(job.id)).state == pb.CANCELLED
                await wait_until(lambda: markers(marks, "cancel", "cancelled"))  # the worker process saw it
                nxt = await b.submit(count_request("next", steps=2, step_ms=1))
                assert (await watch(a, nxt.id))[-1].type == pb.EVENT_SUCCEEDED
        assert not markers(marks, "cancel", "done")

    run(go(), timeout=60)


@pytest.mark.slow
def test_sigterm_hands_the_job_back(queue, marks, tmp_path):
    async def go():
        async with gateways(queue, n=1) as (a,):
            with workers(queue, marks, tmp_path, n=1, extra=["--grace-s", "0.2"]) as (w,):
                job = await a.submit(count_request("term", steps=60, step_ms=20))
                await wait_until(lambda: markers(marks, "term", "start"))
                w.signal(signal.SIGTERM)  # grace 0.2 s < the job's ~1.2 s of work: handed back
                assert w.wait() == 0
                back = await a.get(job.id)
                assert back.state == pb.QUEUED and back.attempts == 0
            with workers(queue, marks, tmp_path, n=1):
                assert (await watch(a, job.id))[-1].job.state == pb.SUCCEEDED

    run(go(), timeout=60)


@pytest.mark.slow
def test_queued_jobs_survive_a_redis_restart(tmp_path, marks):
    srv = RedisServer(tmp_path / "aof", appendonly=True).start()
    queue = srv.url
    try:

        async def go():
            async with gateways(queue, n=1) as (a,):
                ids = [(await a.submit(count_request(f"keep{i}", steps=2, step_ms=1, priority=i))).id for i in range(3)]
                srv.stop(kill=True)  # appendfsync always: every acknowledged write is on disk
                srv.start()
                with workers(queue, marks, tmp_path, n=1):
                    # the same gateway reconnects by itself
                    for job_id in ids:
                        assert (await watch(a, job_id))[-1].job.state == pb.SUCCEEDED
            for i in range(3):
                assert len(markers(marks, f"keep{i}", "done")) == 1

        run(go(), timeout=60)
    finally:
        srv.stop(kill=True)
