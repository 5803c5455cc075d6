"""Helpers for the job-queue tests (no tests here): small JobMethods and a real redis-server.

The methods are importable by worker subprocesses as `tests.jobs_support:CountingMethod`, so the
queue tests never depend on RELAX. Each run leaves marker files in $XAI_TEST_MARKERS named
`<tag>.<event>.<pid>.<n>` (tag = request.model), so a test can count runs across processes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from xaiserve.errors import InvalidArgument, NotFound
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.jobs.contract import JobCancelled
from xaiserve.service.tensors import to_tensor

ROOT = Path(__file__).resolve().parent.parent
_counter = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marker(request: pb.JobRequest, event: str) -> None:
    d = os.environ.get("XAI_TEST_MARKERS")
    if d:
        Path(d, f"{request.model}.{event}.{os.getpid()}.{next(_counter)}").touch()


def markers(directory: Path, tag: str, event: str) -> list[Path]:
    return sorted(directory.glob(f"{tag}.{event}.*"))


def count_request(tag: str, steps: int = 10, step_ms: int = 10, **kw) -> pb.JobRequest:
    """A job for CountingMethod: `steps` iterations of `step_ms` (carried in RelaxParams fields)."""
    return pb.JobRequest(
        method="count",
        model=tag,
        image=pb.Image(encoded=b"x"),
        relax=pb.RelaxParams(num_masks=steps, batch_size=step_ms),
        **kw,
    )


class CountingMethod:
    """Counts to num_masks, sleeping batch_size ms per step, reporting progress and checking cancellation."""

    name = "count"

    def validate(self, request: pb.JobRequest, registry) -> None:
        if not request.model:
            raise InvalidArgument("model is empty")
        if request.model == "missing":
            raise NotFound("model 'missing' is not in the store")
        if request.relax.HasField("num_masks") and request.relax.num_masks < 1:
            raise InvalidArgument(f"num_masks must be >= 1, got {request.relax.num_masks}")

    def run(self, request: pb.JobRequest, registry, ctx) -> pb.JobResult:
        n = request.relax.num_masks or 10
        step_s = (request.relax.batch_size if request.relax.HasField("batch_size") else 10) / 1000.0
        marker(request, "start")
        try:
            for i in range(n):
                ctx.check_cancelled()
                time.sleep(step_s)
                ctx.report(
                    (i + 1) / n,
                    heatmap=np.full((4, 4), (i + 1) / n, np.float32),
                    score=float(i),
                    metrics={"done": float(i + 1)},
                )
        except JobCancelled:
            marker(request, "cancelled")
            raise
        marker(request, "done")
        importance = np.arange(16, dtype=np.float32).reshape(4, 4) / 15.0
        return pb.JobResult(
            relax=pb.RelaxResult(importance=to_tensor(importance), num_masks=n, png=b"\x89PNG fake"),
            parameters_json=json.dumps({"steps": n, "pid": os.getpid()}),
        )


class FailingMethod:
    """Raises: an XaiError when relax.masking == "known" (no retry), else a RuntimeError (retried)."""

    name = "fail"

    def validate(self, request: pb.JobRequest, registry) -> None:
        return None

    def run(self, request: pb.JobRequest, registry, ctx) -> pb.JobResult:
        marker(request, "attempt")
        if request.relax.masking == "known":
            raise InvalidArgument("the image shows nothing to explain")
        raise RuntimeError("boom")


def support_methods() -> dict:
    return {"count": CountingMethod(), "fail": FailingMethod()}


class RedisServer:
    """A real redis-server (Debian package) on a free localhost port, data in `directory`.

    It persists as gateways and workers require (an append-only file, fsync once a second);
    `appendonly=True` fsyncs every write (restart tests), `volatile=True` persists nothing (the
    durability check's refusal)."""

    def __init__(self, directory: Path, *, appendonly: bool = False, volatile: bool = False, port: int | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.volatile = volatile
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        args = [
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--protected-mode",
            "no",
            "--maxmemory-policy",
            "noeviction",
            "--loglevel",
            "warning",
        ]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        elif not self.volatile:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        r = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        for _ in range(200):
            try:
                if r.ping():
                    r.close()
                    return self
            except redis.ConnectionError:
                time.sleep(0.025)
        raise RuntimeError("redis-server did not start")

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None


@contextmanager
def redis_server(directory: Path, **kw) -> Iterator[RedisServer]:
    srv = RedisServer(directory, **kw).start()
    try:
        yield srv
    finally:
        srv.stop(kill=True)


class WorkerProcess:
    """`python -m xaiserve.service.worker` with the test methods, as the fleet runs it."""

    def __init__(
        self,
        queue: str,
        *,
        markers_dir: Path,
        claim_idle_s: float | None = 1.0,
        heartbeat_s: float | None = 0.2,
        extra: list[str] | None = None,
        log_path: Path | None = None,
    ):
        """claim_idle_s / heartbeat_s None: the worker's defaults."""
        env = dict(os.environ, PYTHONPATH=str(ROOT), XAI_TEST_MARKERS=str(markers_dir), OMP_NUM_THREADS="1")
        timing = [
            *(["--claim-idle-s", str(claim_idle_s)] if claim_idle_s is not None else []),
            *(["--heartbeat-s", str(heartbeat_s)] if heartbeat_s is not None else []),
        ]
        args = [
            sys.executable,
            "-m",
            "xaiserve.service.worker",
            "--queue",
            queue,
            "--methods",
            "tests.jobs_support:CountingMethod,tests.jobs_support:FailingMethod",
            "--metrics-port",
            "0",
            *timing,
            "--grace-s",
            "2",
            "--no-log-json",
            *(extra or []),
        ]
        self.log_path = log_path
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=self._log)
        line = self.proc.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"worker exited before it was ready (see {log_path})")
        self.ready = json.loads(line)

    @property
    def metrics_port(self) -> int:
        return int(self.ready["metrics_port"])

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc.stdout.close()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


def run(coro, timeout: float = 60.0):
    """Run a coroutine to completion with a hard timeout (tests never hang)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_until(pred, timeout: float = 20.0, interval: float = 0.02):
    """Await an (async or sync) predicate becoming truthy; returns its value or raises TimeoutError."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(interval)


async def _serve_embedded(queue: str, claim_idle_s: float) -> None:
    """An embedded-mode 'server' process: a JobService with one worker thread, until killed."""
    from xaiserve.service.jobs.factory import build_job_service
    from xaiserve.service.jobs.options import JobOptions

    opts = JobOptions(embedded_workers=1, claim_idle_s=claim_idle_s, heartbeat_s=claim_idle_s / 4)
    svc = build_job_service(queue, None, opts, methods=support_methods())
    await svc.start()
    print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
    await asyncio.Event().wait()


class RecordingContext:
    """A JobContext that records progress and cancels itself after `cancel_after` reports."""

    def __init__(self, cancel_after: int | None = None):
        self.reports: list[dict] = []
        self.cancel_after = cancel_after
        self._cancelled = False
        self.checks = 0

    def report(self, fraction, *, heatmap=None, score=None, metrics=None, message=""):
        self.reports.append(
            {
                "fraction": fraction,
                "heatmap": heatmap,
                "score": score,
                "metrics": dict(metrics or {}),
                "message": message,
            }
        )
        if self.cancel_after is not None and len(self.reports) >= self.cancel_after:
            self._cancelled = True

    def check_cancelled(self) -> None:
        self.checks += 1
        if self._cancelled:
            raise JobCancelled("cancelled by the test")

    @property
    def cancelled(self) -> bool:
        return self._cancelled


if __name__ == "__main__":
    # python -m tests.jobs_support embedded sqlite:////tmp/x/jobs.sqlite
    if len(sys.argv) >= 3 and sys.argv[1] == "embedded":
        asyncio.run(_serve_embedded(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 30.0))
    else:
        sys.exit("usage: python -m tests.jobs_support embedded QUEUE_URL [CLAIM_IDLE_S]")
