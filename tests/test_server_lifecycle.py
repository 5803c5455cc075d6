"""The real `xaiserve serve` process: SIGTERM drains in-flight calls, reports NOT_SERVING, exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serverutil import ROOT, free_port, server_process
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.proto.explain.v1 import explainer_pb2_grpc as pb_grpc
from xaiserve.service.tensors import to_tensor


def _wait_until_all_accepted(metrics_url: str, futs: list) -> None:
    """Until every call has reached its handler (in flight or done): the drain lets accepted calls
    finish, while calls still queued in the transport when it starts are refused, as gRPC does."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.time() + 30
    while time.time() < deadline:
        done = sum(f.done() for f in futs)  # read before the gauge, so that no call is counted twice
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
        inflight = sum(
            s.value
            for fam in text_string_to_metric_families(text)
            if fam.name == "xaiserve_inflight_requests"
            for s in fam.samples
            if s.labels.get("rpc") == "Explain"
        )
        if done + inflight >= len(futs):
            return
        time.sleep(0.01)
    raise AssertionError("the server did not accept the calls in 30 s")


@pytest.mark.slow
def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(tiny_store, tmp_path):
    # The main port stops taking calls (health checks too) as soon as the drain starts; the plain
    # health port, the probes' endpoint, stays up until the in-flight calls are done.
    health_port = free_port()
    with server_process(
        tiny_store, state_dir=tmp_path / "state", grace_s=20, max_batch=1, health_port=health_port
    ) as srv:
        ch = grpc.insecure_channel(srv.address)
        stub = pb_grpc.ExplainerStub(ch)
        img = pb.Image(tensor=to_tensor(np.zeros((64, 64, 3), np.uint8)))
        # a queue of slow calls (about 60 ms each, one at a time): most are still waiting when SIGTERM arrives
        futs = [stub.Explain.future(pb.ExplainRequest(model="slow-nemu", image=img), timeout=60) for _ in range(40)]
        _wait_until_all_accepted(srv.metrics_url, futs)
        srv.process.send_signal(signal.SIGTERM)
        hch = grpc.insecure_channel(f"127.0.0.1:{health_port}")
        health = health_pb2_grpc.HealthStub(hch)
        statuses = []
        t_end = time.time() + 10
        while time.time() < t_end and health_pb2.HealthCheckResponse.NOT_SERVING not in statuses:
            try:
                statuses.append(health.Check(health_pb2.HealthCheckRequest(), timeout=1).status)
            except grpc.RpcError as e:
                raise AssertionError(f"the health port closed before reporting NOT_SERVING: {e.code()}") from None
            time.sleep(0.02)
        assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING, "a draining server must report NOT_SERVING"
        assert not all(f.done() for f in futs), "NOT_SERVING must be reported while calls are still in flight"
        hch.close()
        results = [f.result() for f in futs]  # all in-flight calls finish with OK
        assert all(r.mask.shape == [64, 64] for r in results)
        with grpc.insecure_channel(srv.address) as ch2:
            try:
                pb_grpc.ExplainerStub(ch2).Explain(pb.ExplainRequest(model="tiny-nemu", image=img), timeout=3)
                refused = False
            except grpc.RpcError as e:
                refused = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert refused, "a draining server must not take new calls"
        assert srv.process.wait(30) == 0
        log = srv.log_path.read_text()
        assert '"draining"' in log or "draining" in log
        ch.close()


@pytest.mark.slow
def test_cli_explain_and_models_through_a_real_server(tiny_store, tmp_path):
    from PIL import Image

    img_path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img_path)
    with server_process(tiny_store, state_dir=tmp_path / "state") as srv:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "xaiserve.service.cli",
                "explain",
                str(img_path),
                "--model",
                "tiny-nemu",
                "--out",
                str(tmp_path / "m.png"),
                "--fidelity",
                "--address",
                srv.address,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert summary["model"] == "tiny-nemu:1" and summary["shape"] == [40, 50]
        assert -1.0 <= summary["fidelity"] <= 1.0
        assert Image.open(tmp_path / "m.png").size == (50, 40)
        assert Image.open(summary["overlay"]).size == (50, 40)
        models = subprocess.run(
            [sys.executable, "-m", "xaiserve.service.cli", "models", "--address", srv.address],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert models.returncode == 0 and "tiny-nemu:1" in models.stdout and "nem_u" in models.stdout
        bad = subprocess.run(
            [
                sys.executable,
                "-m",
                "xaiserve.service.cli",
                "explain",
                str(img_path),
                "--model",
                "ghost",
                "--address",
                srv.address,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr and "available" in bad.stderr
        logs = srv.log_path.read_text()
    # structured logs, one JSON object per line, no image data
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(rec.get("message") == "serving" for rec in lines)
    assert all(len(line) < 4000 for line in logs.splitlines())


@pytest.mark.slow
def test_bad_configuration_is_refused_with_a_message(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("max_batch: 0\n")
    r = subprocess.run(
        [sys.executable, "-m", "xaiserve.service.cli", "serve", "--config", str(bad), "--print-config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 2 and "max_batch must be >= 1" in r.stderr
    bad.write_text("max_bach: 3\n")
    r = subprocess.run(
        [sys.executable, "-m", "xaiserve.service.cli", "serve", "--config", str(bad), "--print-config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 2 and "unknown setting 'max_bach'" in r.stderr
    good = tmp_path / "g.yaml"
    good.write_text("max_batch: 8\nport: 6000\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "xaiserve.service.cli",
            "serve",
            "--config",
            str(good),
            "--port",
            "7000",
            "--print-config",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={"XAISERVE_MAX_BATCH": "4", "PATH": "/usr/bin:/bin"},
    )
    cfg = json.loads(r.stdout)
    assert cfg["max_batch"] == 4 and cfg["port"] == 7000
