"""`xaiserve serve --processes N` (service/supervisor.py): real processes, real gRPC, one port.

The group shares the gRPC and HTTP ports (SO_REUSEPORT); the kernel spreads connections, so the
tests open many channels (each its own connection: grpc.use_local_subchannel_pool). Which child
answered is read from the children's own metric files (prometheus_client multiprocess mode writes
one file per process: counter_<pid>.db), and /metrics must equal their sum.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client.mmap_dict import MmapedDict

from tests.serverutil import ROOT, free_port, server_process
from tests.tiny_models import build_store
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.proto.explain.v1 import explainer_pb2_grpc as pb_grpc
from xaiserve.service.config import ConfigError, load_config
from xaiserve.service.supervisor import MIGRATE_REQ, connection_handover


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


IMAGE = pb.Image(encoded=_png())


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return build_store(tmp_path_factory.mktemp("store"))


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return sorted(int(x) for x in text.split())


def dead(pid: int) -> bool:
    try:
        return "\tZ" in next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("State"))
    except FileNotFoundError:
        return True


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition text (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        m = re.match(r"([^{ ]+)(\{[^}]*\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def wait_for(pred, timeout: float = 90.0, what: str = "") -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            if pred():
                return
        except (OSError, grpc.RpcError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def calls_by_pid(mdir: Path, rpc: str, code: str | None = "OK") -> dict[int, float]:
    """Calls of `rpc` answered (with `code`; None: any), per process, from each process's own
    counter file."""
    out: dict[int, float] = {}
    for f in mdir.glob("counter_*.db"):
        pid = int(f.stem.split("_")[-1])
        for key, value, _ts, _pos in MmapedDict.read_all_values_from_file(str(f)):
            _metric, sample_name, labels, _help = json.loads(key)
            if (
                sample_name == "xaiserve_requests_total"
                and labels.get("rpc") == rpc
                and (code is None or labels["code"] == code)
            ):
                out[pid] = out.get(pid, 0.0) + value
    return out


def explains_by_pid(mdir: Path) -> dict[int, float]:
    return calls_by_pid(mdir, "Explain")


def explain_on_new_connections(address: str, connections: int, calls: int = 2, retries: int = 0) -> int:
    """Explain calls over `connections` new connections; `retries`: new connections tried after an
    UNAVAILABLE (a connection reset while a killed child's socket goes away)."""
    ok = 0
    for _ in range(connections):
        for attempt in range(retries + 1):
            try:
                with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                    stub = pb_grpc.ExplainerStub(ch)
                    for _ in range(calls):
                        r = stub.Explain(pb.ExplainRequest(model="tiny-nemu", image=IMAGE), timeout=30)
                        assert r.model.startswith("tiny-nemu")
                        ok += 1
                break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == retries:
                    raise
                time.sleep(0.2)
    return ok


def test_processes_setting_is_parsed_and_checked():
    assert load_config(None, env={}).process_count == 1
    assert load_config(None, env={}, processes="3").process_count == 3
    assert load_config(None, env={"XAISERVE_PROCESSES": "auto"}).process_count >= 1
    for bad in ("0", "two", "-1"):
        with pytest.raises(ConfigError, match="processes must be an integer >= 1 or auto"):
            load_config(None, env={}, processes=bad)
    assert load_config(None, env={}).process_watchdog_s == 30.0
    assert load_config(None, env={}, process_watchdog_s=0).process_watchdog_s == 0
    with pytest.raises(ConfigError, match="process_watchdog_s must be 0 .off. or >= 3"):
        load_config(None, env={}, process_watchdog_s=1)


def test_group_of_two_shares_the_port_restarts_a_killed_child_and_drains(store, tmp_path):
    mdir = tmp_path / "metrics"
    mdir.mkdir()
    (mdir / "counter_1.db").write_bytes(b"stale")  # an earlier run's file: deleted at start
    with server_process(
        store,
        state_dir=tmp_path / "state",
        processes=2,
        job_workers=1,
        log_json="true",
        env={"PROMETHEUS_MULTIPROC_DIR": str(mdir)},
    ) as srv:
        parent = srv.process.pid
        assert not (mdir / "counter_1.db").exists()
        wait_for(lambda: sample(scrape(srv.metrics_url), "xaiserve_server_processes") == 2, what="2 serving")
        first = children(parent)
        assert len(first) == 2

        # many connections: both children answer, and /metrics sums them
        n = explain_on_new_connections(srv.address, 24)
        by_pid = explains_by_pid(mdir)
        assert set(by_pid) == set(first), by_pid
        assert all(v > 0 for v in by_pid.values()), by_pid
        text = scrape(srv.metrics_url)
        assert sample(text, "xaiserve_requests_total", rpc="Explain", code="OK") == n == sum(by_pid.values())
        assert sample(text, "xaiserve_serving") == 1
        assert "xaiserve_build_info{" in text  # Info metrics are exported beside the multiprocess files
        for path in ("/healthz", "/readyz"):  # whichever child the connection reaches answers
            assert scrape(srv.metrics_url.replace("/metrics", path)).startswith('{"status": "ok"')

        # SIGKILL one child: the port keeps answering (the other child), the supervisor restarts it
        victim = first[0]
        os.kill(victim, signal.SIGKILL)
        # (seen on this machine: right after the kill a new connection can be reset, UNAVAILABLE,
        # which a client retries; the next reaches the live child)
        wait_for(lambda: dead(victim), 10, "the killed child to exit")
        assert explain_on_new_connections(srv.address, 6, 1, retries=3) == 6
        wait_for(lambda: len(children(parent)) == 2 and victim not in children(parent), what="a new child")
        wait_for(lambda: sample(scrape(srv.metrics_url), "xaiserve_server_processes") == 2, what="2 serving again")
        text = scrape(srv.metrics_url)
        assert sample(text, "xaiserve_server_process_restarts_total") == 1
        # counters of the dead child are kept in the sum
        assert sample(text, "xaiserve_requests_total", rpc="Explain", code="OK") >= n + 6
        assert explain_on_new_connections(srv.address, 8, 1) == 8
        log = srv.log_path.read_text()
        assert "server process exited; restarting it" in log and f'"pid": {victim}' in log
        # the kernel setting that decides whether queued connections of a dying child are reset
        assert ("set sysctl net.ipv4.tcp_migrate_req=1" in log) == (connection_handover() != "1")

        # SIGTERM: forwarded, every child drains and exits, the supervisor exits 0
        kids = children(parent)
        srv.process.send_signal(signal.SIGTERM)
        assert srv.process.wait(60) == 0
        for pid in kids:
            wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 10, f"child {pid} gone")
    log = srv.log_path.read_text()
    assert log.count('"message": "stopped"') >= 2  # each child's own drain ran to its end


def test_one_process_is_unchanged_and_a_group_refuses_its_port(store, tmp_path):
    with server_process(store, state_dir=tmp_path / "state", job_workers=0) as srv:
        assert children(srv.process.pid) == []  # no supervisor
        text = scrape(srv.metrics_url)
        assert sample(text, "xaiserve_server_processes") == 1
        assert "process_resident_memory_bytes" in text  # the ordinary registry, not multiprocess mode
        # the single server binds without SO_REUSEPORT: a group cannot join its port
        port = srv.address.rsplit(":", 1)[1]
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError):
                probe.bind(("127.0.0.1", int(port)))
        r = subprocess.run(
            [sys.executable, "-m", "xaiserve.service.cli", "serve", "--processes", "2", "--port", port]
            + ["--metrics-port", str(free_port()), "--model-store", str(store), "--state-dir", str(tmp_path / "s2")],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2
        assert f"the gRPC port 127.0.0.1:{port} is in use" in r.stderr


def test_a_child_that_cannot_start_stops_the_group(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "xaiserve.service.cli", "serve", "--processes", "2", "--port", "0"]
        + ["--metrics-port", "0", "--model-store", str(tmp_path / "nowhere"), "--state-dir", str(tmp_path / "s")]
        + ["--queue", "redis://127.0.0.1:1/0"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "server process failed at start" in r.stderr


def test_watchdog_dumps_the_stacks_of_a_stuck_child_kills_and_restarts_it(store, tmp_path):
    """A child that is alive but whose event loop does not run (here: SIGSTOP, as a frozen process)
    takes the connections the kernel hashes to it and answers none; the supervisor notices the
    missing heartbeats, has it write its thread stacks, kills it and starts a new one."""
    mdir = tmp_path / "metrics"
    with server_process(
        store,
        state_dir=tmp_path / "state",
        processes=2,
        job_workers=0,
        process_watchdog_s=3,
        env={"PROMETHEUS_MULTIPROC_DIR": str(mdir)},
    ) as srv:
        parent = srv.process.pid
        wait_for(lambda: sample(scrape(srv.metrics_url), "xaiserve_server_processes") == 2, what="2 serving")
        first = children(parent)
        assert explain_on_new_connections(srv.address, 4, 1) == 4
        # heartbeats keep a healthy child alive well past the watchdog time
        time.sleep(4.5)
        assert children(parent) == first
        victim, other = first
        os.kill(victim, signal.SIGSTOP)
        wait_for(lambda: dead(victim), 30, "the stuck child to be killed")
        wait_for(lambda: len(children(parent)) == 2 and victim not in children(parent), what="a new child")
        assert other in children(parent)  # the healthy one was left alone
        wait_for(lambda: sample(scrape(srv.metrics_url), "xaiserve_server_processes") == 2, what="2 serving again")
        assert sample(scrape(srv.metrics_url), "xaiserve_server_process_restarts_total") == 1
        assert explain_on_new_connections(srv.address, 8, 1, retries=3) == 8
        log = srv.log_path.read_text()
        stuck = log.index("server process stuck")
        assert f'"pid": {victim}' in log[stuck : stuck + 400]
        # faulthandler's dump of the stuck child (SIGUSR1), written before it was killed
        assert "most recent call first" in log[stuck:], log[stuck : stuck + 2000]
        restarted = log.index("server process exited; restarting it", stuck)
        assert '"reason": "stuck"' in log[restarted : restarted + 400]


def _tls_channel(port: int, ca: Path) -> grpc.Channel:
    from xaiserve.service.security import channel_credentials

    creds = channel_credentials(ca, None, None)
    return grpc.secure_channel(f"localhost:{port}", creds, options=[("grpc.use_local_subchannel_pool", 1)])


ALICE, BOB = "alice-group-token-0123456789abcdef", "bob-group-token-0123456789abcdefgh"


def test_group_over_tls_with_tokens_enforces_auth_in_every_child_and_shares_jobs(store, tmp_path):
    """TLS and tokens in group mode: every child loads the same certificate and token file; a job
    submitted through one child is watched, read and found by its idempotency key through another
    (the shared SQLite store), and stays invisible to another principal there."""
    from tests.test_security import make_pki
    from xaiserve.service.security import bearer_metadata

    pki = make_pki(tmp_path / "pki", "group")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"tokens:\n  - {{name: alice, token: {ALICE}}}\n  - {{name: bob, token: {BOB}}}\n")
    alice, bob = bearer_metadata(ALICE), bearer_metadata(BOB)
    mdir = tmp_path / "metrics"
    health = free_port()
    with server_process(
        store,
        ready_port=health,
        state_dir=tmp_path / "state",
        processes=2,
        job_workers=1,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tokens_file=tokens,
        health_port=health,
        env={"PROMETHEUS_MULTIPROC_DIR": str(mdir)},
    ) as srv:
        port = int(srv.address.rsplit(":", 1)[1])
        wait_for(lambda: len(children(srv.process.pid)) == 2, what="2 children")
        # both listening (a child still loading its models gets no connection: seen under load)
        wait_for(lambda: srv.log_path.read_text().count("server process serving") >= 2, 60, "2 serving")

        # one channel (one connection) per child, found by which child's counter moved
        by_child: dict[int, grpc.Channel] = {}
        for _ in range(40):
            before = calls_by_pid(mdir, "ListModels")
            ch = _tls_channel(port, pki.ca)
            pb_grpc.ExplainerStub(ch).ListModels(pb.ListModelsRequest(), metadata=alice, timeout=30)
            after = calls_by_pid(mdir, "ListModels")
            (pid,) = [p for p in after if after[p] != before.get(p, 0.0)]
            if pid in by_child:
                ch.close()
            else:
                by_child[pid] = ch
            if len(by_child) == 2:
                break
        assert len(by_child) == 2, "40 connections all reached one child"
        (pid_a, ch_a), (pid_b, ch_b) = by_child.items()
        a, b = pb_grpc.ExplainerStub(ch_a), pb_grpc.ExplainerStub(ch_b)

        # every child enforces the tokens: none, or an unknown one, is refused by both
        for stub in (a, b):
            for md in ((), (("authorization", "Bearer not-a-known-token-0123456789"),)):
                with pytest.raises(grpc.RpcError) as e:
                    stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=30)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

        req = pb.JobRequest(
            method="relax",
            model="tiny-encoder",
            image=IMAGE,
            relax=pb.RelaxParams(num_masks=64, seed=3),
            idempotency_key="group-key-1",
        )
        job = a.SubmitJob(req, metadata=alice, timeout=30)
        assert job.owner == "token:alice"
        assert calls_by_pid(mdir, "SubmitJob").get(pid_a) == 1
        # the same key through the other child: the same job; bob's key space is his own
        assert b.SubmitJob(req, metadata=alice, timeout=30).id == job.id
        assert calls_by_pid(mdir, "SubmitJob").get(pid_b) == 1
        # another principal, through either child: NOT_FOUND
        for stub in (a, b):
            for name in ("GetJob", "CancelJob"):
                with pytest.raises(grpc.RpcError) as e:
                    getattr(stub, name)(pb.JobRef(id=job.id), metadata=bob, timeout=30)
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
        # the owner watches it through the other child to the end and reads the result there
        final = None
        for ev in b.WatchJob(pb.JobRef(id=job.id), metadata=alice, timeout=120):
            if ev.job.state in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED):
                final = ev.job
                break
        assert final is not None and final.state == pb.SUCCEEDED, final
        got = b.GetJob(pb.JobRef(id=job.id, include_result=True), metadata=alice, timeout=30)
        imp = got.result.relax.importance
        assert list(imp.shape) == [32, 32] and len(imp.data) == 32 * 32 * 4
        assert calls_by_pid(mdir, "GetJob").get(pid_b, 0) >= 1 and calls_by_pid(mdir, "WatchJob").get(pid_b, 0) >= 1
        for ch in by_child.values():
            ch.close()


@pytest.mark.slow
def test_with_tcp_migrate_req_no_new_connection_is_reset_when_a_child_dies(store, tmp_path):
    """Four threads open a new connection per call while a child is SIGKILLed, twice: with
    net.ipv4.tcp_migrate_req = 1 the kernel hands the connections queued to the dying child to the
    other one, so no call fails at connect ("Connection reset by peer"); only calls already running
    in the killed child may fail (UNAVAILABLE, its connection closed). Without the setting this
    machine showed 6-12 connect-time resets per 4 kills (docs/ARCHITECTURE.md, process model)."""
    import threading

    before = connection_handover()
    if before != "1":  # already on: nothing to set (and nothing to restore)
        try:
            MIGRATE_REQ.write_text("1")
        except OSError as e:  # only where the setting is off and cannot be written (not root, Linux < 5.14)
            pytest.skip(f"net.ipv4.tcp_migrate_req is {before} and cannot be set here: {e}")
    try:
        with server_process(store, state_dir=tmp_path / "state", processes=2, job_workers=0, log_json="true") as srv:
            parent = srv.process.pid
            wait_for(lambda: sample(scrape(srv.metrics_url), "xaiserve_server_processes") == 2, what="2 serving")
            assert "set sysctl net.ipv4.tcp_migrate_req=1" not in srv.log_path.read_text()
            stop = threading.Event()
            ok, failed = [0], []

            def caller() -> None:
                while not stop.is_set():
                    try:
                        with grpc.insecure_channel(srv.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                            pb_grpc.ExplainerStub(ch).Explain(
                                pb.ExplainRequest(model="tiny-nemu", image=IMAGE), timeout=30
                            )
                        ok[0] += 1
                    except grpc.RpcError as e:
                        failed.append((e.code(), e.details() or ""))

            threads = [threading.Thread(target=caller) for _ in range(4)]
            for t in threads:
                t.start()
            try:
                for _ in range(2):
                    time.sleep(1.0)
                    victim = children(parent)[0]
                    os.kill(victim, signal.SIGKILL)
                    wait_for(lambda v=victim: dead(v), 10, "the killed child to exit")
                    wait_for(
                        lambda v=victim: len(children(parent)) == 2 and v not in children(parent), what="a new child"
                    )
                    wait_for(lambda: sample(scrape(srv.metrics_url), "xaiserve_server_processes") == 2, what="2 again")
                time.sleep(1.0)
            finally:
                stop.set()
                for t in threads:
                    t.join(60)
        assert ok[0] > 100
        assert all(code == grpc.StatusCode.UNAVAILABLE for code, _ in failed), failed[:5]
        at_connect = [d for _, d in failed if "failed to connect" in d]
        assert not at_connect, at_connect[:5]
    finally:
        if before not in (None, "1"):
            MIGRATE_REQ.write_text(before)
