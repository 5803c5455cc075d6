"""Embedded mode: the serving process dies mid-job (SIGKILL); after a restart the job runs again and
finishes exactly once, and nothing queued is lost. Real processes, a real SQLite file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.jobs_support import ROOT, count_request, markers, run, support_methods, wait_until
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.jobs.factory import open_backend
from xaiserve.service.jobs.options import JobOptions
from xaiserve.service.jobs.service import JobService


def _embedded_process(queue: str, marks) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), XAI_TEST_MARKERS=str(marks), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.jobs_support", "embedded", queue],
        cwd=str(ROOT),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert json.loads(proc.stdout.readline())["event"] == "ready"
    return proc


@pytest.mark.slow
def test_killed_server_reruns_its_job_after_restart(tmp_path, monkeypatch):
    queue = f"sqlite:///{tmp_path}/state/jobs.sqlite"
    marks = tmp_path / "markers"
    marks.mkdir()
    monkeypatch.setenv("XAI_TEST_MARKERS", str(marks))
    opts = JobOptions(embedded_workers=0, claim_idle_s=30.0, heartbeat_s=5.0)

    async def submit_and_kill() -> tuple[str, str]:
        gw = JobService(open_backend(queue, opts), support_methods(), None, opts)
        try:
            long = await gw.submit(count_request("crash", steps=150, step_ms=10, idempotency_key="crash-1"))
            waiting = await gw.submit(count_request("waiting", steps=2, step_ms=1))
            proc = _embedded_process(queue, marks)
            try:
                await wait_until(lambda: markers(marks, "crash", "start"))
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
            finally:
                proc.kill()
                proc.stdout.close()
            job = await gw.get(long.id)
            assert job.state == pb.RUNNING and job.attempts == 1  # the store still says so: nobody told it
            return long.id, waiting.id
        finally:
            await gw.stop()

    long_id, waiting_id = run(submit_and_kill())
    assert not markers(marks, "crash", "done")

    async def restart() -> None:
        # claim_idle_s is 30 s: the job must come back because its worker's process is gone, not by timeout.
        ropts = JobOptions(embedded_workers=1, claim_idle_s=30.0, heartbeat_s=5.0)
        svc = JobService(open_backend(queue, ropts), support_methods(), None, ropts)
        await svc.start()
        try:
            events = [ev async for ev in svc.watch(long_id)]
            assert events[-1].type == pb.EVENT_SUCCEEDED
            assert events[-1].job.attempts == 2 and events[-1].job.result.relax.num_masks == 150
            done = [ev async for ev in svc.watch(waiting_id)]
            assert done[-1].type == pb.EVENT_SUCCEEDED  # the queued job was not lost either
            log = svc.backend.events_after(long_id, 0)
            requeued = [e for e in log if e.type == pb.EVENT_QUEUED and "exited" in e.message]
            assert len(requeued) == 1
            assert sum(e.type == pb.EVENT_SUCCEEDED for e in log) == 1
            # a client retrying its submit after the crash gets the same job, not a new one
            again = await svc.submit(count_request("crash", steps=150, step_ms=10, idempotency_key="crash-1"))
            assert again.id == long_id and again.state == pb.SUCCEEDED
        finally:
            await svc.stop()

    run(restart())
    assert len(markers(marks, "crash", "start")) == 2
    assert len(markers(marks, "crash", "done")) == 1
    assert len(markers(marks, "waiting", "done")) == 1
