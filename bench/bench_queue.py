"""Job-queue benchmarks, printed as ratios measured in one run.

1. Throughput scaling: jobs/s with 1, 2 and 4 `xaiserve worker` processes on one Redis, and the
   scaling efficiency E(n) = throughput(n) / (n * throughput(1)). Two job kinds:
   - "sleep": each job waits 50 ms (a GPU-bound or I/O-bound job: the queue is the only shared part,
     so this measures the queue's own scaling);
   - "spin":  each job does the same fixed CPU work in Python, ~50 ms on an idle core (bounded by
     this machine's cores, and by the other processes sharing them).
2. Latency added by the Redis path: submit -> terminal event seen by the gateway, for a job that
   does nothing, sequentially, p50/p90, for
   - embedded: SQLite queue, worker thread in the gateway process (the default);
   - redis, worker thread in the gateway process (Redis round trips only);
   - redis, `xaiserve worker` process (the deployed fleet path).

Needs redis-server (Debian package); starts it on a free port in a temp dir and stops everything it
started. Usage: python bench/bench_queue.py [--jobs 40] [--latency-n 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xaiserve.paths import checkout_root  # noqa: E402

ROOT = checkout_root()  # the repository: its model_store/ and tests/ helpers
sys.path.insert(0, str(ROOT))
from xaiserve.proto.explain.v1 import explainer_pb2 as pb  # noqa: E402
from xaiserve.service.jobs.factory import open_backend  # noqa: E402
from xaiserve.service.jobs.options import JobOptions  # noqa: E402
from xaiserve.service.jobs.service import JobService  # noqa: E402


class SleepMethod:
    """Waits relax.num_masks milliseconds (stands in for a GPU job: no CPU used)."""

    name = "sleep"

    def validate(self, request, registry) -> None:
        return None

    def run(self, request, registry, ctx) -> pb.JobResult:
        ctx.check_cancelled()
        time.sleep(request.relax.num_masks / 1000.0)
        ctx.report(1.0)
        return pb.JobResult(parameters_json="{}")


class SpinMethod:
    """Burns CPU: relax.num_masks thousand iterations of a Python loop (the same work in every process)."""

    name = "spin"

    def validate(self, request, registry) -> None:
        return None

    def run(self, request, registry, ctx) -> pb.JobResult:
        ctx.check_cancelled()
        spin(request.relax.num_masks * 1000)
        ctx.report(1.0)
        return pb.JobResult(parameters_json="{}")


def spin(n: int) -> int:
    x = 0
    for i in range(n):
        x += i
    return x


def spin_units_for(ms: float) -> int:
    """Thousands of loop iterations that take about `ms` on this machine now (best of 5)."""
    best = min(_timed(lambda: spin(200_000)) for _ in range(5))
    return max(1, int(ms / 1000.0 / best * 200))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _methods() -> dict:
    return {"sleep": SleepMethod(), "spin": SpinMethod()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self, d: Path):
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "/usr/bin/redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(d),
                "--save",
                "",
                "--appendonly",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        r = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.025)
        r.close()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_workers(queue: str, n: int) -> list[subprocess.Popen]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'bench'}", OMP_NUM_THREADS="1")
    procs = []
    for _ in range(n):
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xaiserve.service.worker",
                "--queue",
                queue,
                "--methods",
                "bench_queue:SleepMethod,bench_queue:SpinMethod",
                "--metrics-port",
                "-1",
                "--grace-s",
                "1",
                "--log-level",
                "WARNING",
            ],
            cwd=str(ROOT),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        json.loads(p.stdout.readline())  # ready line
        procs.append(p)
    return procs


def stop_workers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=20)
        p.stdout.close()


async def wait_all(svc: JobService, ids: list[str]) -> None:
    async def one(i: str) -> None:
        async for ev in svc.watch(i):
            if ev.HasField("job") and ev.job.state in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED, pb.EXPIRED):
                assert ev.job.state == pb.SUCCEEDED, ev.job.error

    await asyncio.gather(*(one(i) for i in ids))


async def throughput(queue: str, method: str, n_workers: int, jobs: int, ms: int) -> float:
    opts = JobOptions(embedded_workers=0)
    gw = JobService(open_backend(queue, opts), _methods(), None, opts)
    await gw.start()
    procs = start_workers(queue, n_workers)
    try:
        warm = [
            (await gw.submit(pb.JobRequest(method=method, model="m", relax=pb.RelaxParams(num_masks=1)))).id
            for _ in range(n_workers)
        ]
        await wait_all(gw, warm)
        t0 = time.perf_counter()
        ids = [
            (await gw.submit(pb.JobRequest(method=method, model="m", relax=pb.RelaxParams(num_masks=ms)))).id
            for _ in range(jobs)
        ]
        await wait_all(gw, ids)
        return jobs / (time.perf_counter() - t0)
    finally:
        stop_workers(procs)
        await gw.stop()


async def latency(queue: str, n: int, *, worker_process: bool) -> list[float]:
    opts = JobOptions(embedded_workers=0 if worker_process else 1)
    svc = JobService(open_backend(queue, opts), _methods(), None, opts)
    await svc.start()
    procs = start_workers(queue, 1) if worker_process else []
    out = []
    try:
        for i in range(n + 5):
            t0 = time.perf_counter()
            job = await svc.submit(pb.JobRequest(method="sleep", model="m", relax=pb.RelaxParams(num_masks=0)))
            async for ev in svc.watch(job.id):
                if ev.type == pb.EVENT_SUCCEEDED:
                    break
            if i >= 5:  # warm-up
                out.append((time.perf_counter() - t0) * 1000)
    finally:
        stop_workers(procs)
        await svc.stop()
    return out


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def main_async(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    redis = Redis(tmp)
    try:
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
        print("\n1. throughput with n worker processes (Redis queue)")
        print(f"{'job':>6} {'n':>3} {'jobs/s':>8} {'speed-up':>9} {'efficiency':>10}")
        units = {"sleep": 50, "spin": spin_units_for(50.0)}  # 50 ms of waiting; ~50 ms of CPU (unloaded)
        for method in ("sleep", "spin"):
            ms = units[method]
            base = None
            for k, n in enumerate((1, 2, 4)):
                q = f"{redis.url}?prefix=tp-{method}-{n}"
                tput = await throughput(q, method, n, args.jobs, ms)
                base = base or tput
                print(f"{method:>6} {n:>3} {tput:8.2f} {tput / base:8.2f}x {tput / (n * base):10.2f}")
        print(f"   ideal: 'sleep' {1000 / 50:.0f} jobs/s per worker; 'spin' is bounded by {os.cpu_count()} cores")

        print(f"\n2. latency of a no-op job, submit -> SUCCEEDED seen by the gateway (n={args.latency_n})")
        rows = {
            "embedded (SQLite, thread)": await latency(
                f"sqlite:///{tmp}/lat.sqlite", args.latency_n, worker_process=False
            ),
            "redis, worker thread": await latency(f"{redis.url}?prefix=lat-t", args.latency_n, worker_process=False),
            "redis, worker process": await latency(f"{redis.url}?prefix=lat-p", args.latency_n, worker_process=True),
        }
        base = statistics.median(rows["embedded (SQLite, thread)"])
        print(f"{'path':>28} {'p50 ms':>8} {'p90 ms':>8} {'p50 ratio':>10} {'added p50 ms':>13}")
        for name, xs in rows.items():
            m = statistics.median(xs)
            print(f"{name:>28} {m:8.2f} {pct(xs, 0.9):8.2f} {m / base:9.2f}x {m - base:13.2f}")
        print(f"load average {os.getloadavg()[0]:.2f} at end")
    finally:
        redis.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=40, help="jobs per throughput run")
    p.add_argument("--latency-n", type=int, default=60, help="jobs per latency row")
    asyncio.run(main_async(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
