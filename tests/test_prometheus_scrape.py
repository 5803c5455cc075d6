"""A real Prometheus (Debian package) scrapes a gateway and a worker; PromQL sees the exact counts."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.jobs_support import redis_server
from tests.serverutil import ROOT, free_port, server_process
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.tensors import to_tensor


def start_worker(queue: str, store: Path, log: Path) -> tuple[subprocess.Popen, int]:
    """`xaiserve worker` running RELAX from the store; returns the process and its metrics port."""
    import os
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xaiserve.service.cli",
            "worker",
            "--queue",
            queue,
            "--store",
            str(store),
            "--methods",
            "relax",
            "--metrics-port",
            "0",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=open(log, "ab"),
    )
    ready = json.loads(proc.stdout.readline().decode() or "{}")
    assert "metrics_port" in ready, f"worker did not start: {log.read_text()[-2000:]}"
    return proc, int(ready["metrics_port"])


def promql(base: str, query: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    data = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert data["status"] == "success", data
    return data["data"]["result"]


def wait_ready(base: str, timeout: float = 60) -> None:
    """Until Prometheus's /-/ready answers 200: before its storage is open, queries get 503."""
    end, last = time.time() + timeout, None
    while time.time() < end:
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError as e:  # connection refused while starting, HTTPError 503 while not ready
            last = e
        time.sleep(0.2)
    raise AssertionError(f"prometheus at {base} not ready after {timeout} s: {last}")


def wait_value(base: str, query: str, expected: float, timeout: float = 60) -> float:
    end, got = time.time() + timeout, None
    while time.time() < end:
        res = promql(base, query)
        if res:
            got = float(res[0]["value"][1])
            if got == expected:
                return got
        time.sleep(0.5)
    raise AssertionError(f"{query} = {got}, expected {expected}")


@pytest.mark.slow
def test_prometheus_scrapes_gateway_and_worker(tiny_store, tmp_path):
    exe = shutil.which("prometheus") or "/usr/bin/prometheus"
    with (
        redis_server(tmp_path / "redis") as redis,
        server_process(tiny_store, state_dir=tmp_path / "state", queue=redis.url, job_workers=0) as gw,
    ):
        worker, worker_port = start_worker(redis.url, tiny_store, tmp_path / "worker.log")
        try:
            gw_metrics = urllib.parse.urlparse(gw.metrics_url).netloc
            cfg = {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "gateway", "static_configs": [{"targets": [gw_metrics]}]},
                    {"job_name": "worker", "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]},
                ],
            }
            (tmp_path / "prometheus.yml").write_text(json.dumps(cfg))  # JSON is YAML
            port = free_port()
            prom = subprocess.Popen(
                [
                    exe,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            base = f"http://127.0.0.1:{port}"
            try:
                wait_ready(base)
                from xaiserve.service.client import ExplainerClient

                with ExplainerClient(gw.address) as c:
                    img = np.zeros((32, 32, 3), np.uint8)
                    for _ in range(7):
                        c.explain(img, "tiny-nemu")
                    req = lambda i: pb.JobRequest(
                        method="relax",
                        model="tiny-encoder",
                        image=pb.Image(tensor=to_tensor(img)),  # noqa: E731
                        relax=pb.RelaxParams(num_masks=50, batch_size=25, seed=i),
                    )
                    ids = [c.submit_job(req(i)).id for i in range(3)]
                    for jid in ids:
                        events = list(c.watch_job(jid))
                        assert events[-1].type == pb.EVENT_SUCCEEDED
                wait_value(
                    base,
                    'sum(xaiserve_request_latency_seconds_count{job="gateway",rpc="Explain",model="tiny-nemu:1"})',
                    7,
                )
                wait_value(base, 'sum(xaiserve_requests_total{job="gateway",rpc="SubmitJob",code="OK"})', 3)
                wait_value(base, 'sum(xaiserve_job_run_seconds_count{job="worker",method="relax"})', 3)
                # a latency quantile is computable from the scraped histogram
                q = promql(
                    base,
                    'histogram_quantile(0.99, sum by (le) (xaiserve_request_latency_seconds_bucket{job="gateway",rpc="Explain"}))',
                )
                assert q and 0 < float(q[0]["value"][1]) < 30
                up = {r["metric"]["job"]: r["value"][1] for r in promql(base, "up")}
                assert up == {"gateway": "1", "worker": "1"}
            finally:
                prom.terminate()
                prom.wait(20)
        finally:
            worker.kill()
            worker.wait(10)
            worker.stdout.close()
