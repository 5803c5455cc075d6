"""Jobs belong to whoever submitted them, and nothing is lost silently.

Against the real server over gRPC, on both queue backends (a SQLite file and a real redis-server):
tokens are principals, another principal's job is NOT_FOUND for GetJob / WatchJob / CancelJob
(with the message an unknown id gets), idempotency keys are per principal, an admin allow-list sees
all; mutual-TLS identities are principals too. Redis: gateways and workers refuse a Redis that does
not persist unless --allow-volatile-queue; a data loss is logged and GetJob says so; a killed
worker's job is reclaimed within 5 s with the default timings; /readyz follows the queue."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from tests.jobs_support import RedisServer, WorkerProcess, count_request, markers, redis_server, run, support_methods
from tests.serverutil import ROOT, running_server
from tests.test_hardening_server import png
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.proto.explain.v1 import explainer_pb2_grpc as pb_grpc
from xaiserve.service.jobs.backend import new_job_id
from xaiserve.service.jobs.factory import VolatileQueue, build_job_service, open_backend
from xaiserve.service.jobs.options import JobOptions
from xaiserve.service.jobs.service import JobService
from xaiserve.service.security import bearer_metadata

ALICE, BOB, OPS = "alice-token-0123456789abcdef", "bob-token-0123456789abcdefgh", "ops-token-0123456789abcdefgh"
NF = grpc.StatusCode.NOT_FOUND
_prefix = itertools.count()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("tokens") / "tokens.yaml"
    p.write_text(
        "tokens:\n"
        + "".join(f"  - {{name: {n}, token: {t}}}\n" for n, t in (("alice", ALICE), ("bob", BOB), ("ops", OPS)))
    )
    return p


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def gateway(request, tiny_store, tokens, tmp_path_factory, redis_srv):
    queue = "" if request.param == "sqlite" else f"{redis_srv.url}?prefix=ten{next(_prefix)}"
    with running_server(
        tiny_store,
        job_workers=0,
        tokens_file=str(tokens),
        queue=queue,
        job_admins="token:ops",
        state_dir=str(tmp_path_factory.mktemp("state")),
    ) as srv:
        yield srv


def job_request(key: str = "", seed: int = 0) -> pb.JobRequest:
    return pb.JobRequest(
        method="relax",
        model="tiny-encoder",
        image=pb.Image(encoded=png(32, 32)),
        relax=pb.RelaxParams(num_masks=64, seed=seed),
        idempotency_key=key,
    )


def call(stub, name: str, req, token: str):
    return getattr(stub, name)(req, metadata=bearer_metadata(token), timeout=30)


def first_event(stub, job_id: str, token: str) -> pb.JobEvent:
    stream = stub.WatchJob(pb.JobRef(id=job_id), metadata=bearer_metadata(token), timeout=30)
    try:
        return next(iter(stream))
    finally:
        stream.cancel()


def test_another_principals_job_is_not_found_and_untouched(gateway):
    st = gateway.stub()
    job = call(st, "SubmitJob", job_request(), ALICE)
    assert job.owner == "token:alice" and job.state == pb.QUEUED
    unknown = new_job_id(time.time())
    for name, req in (("GetJob", pb.JobRef(id=job.id, include_result=True)), ("CancelJob", pb.JobRef(id=job.id))):
        with pytest.raises(grpc.RpcError) as e:
            call(st, name, req, BOB)
        assert e.value.code() == NF
        with pytest.raises(grpc.RpcError) as e2:  # the same words as for an id that never existed
            call(st, name, pb.JobRef(id=unknown), BOB)
        assert (
            e.value.details().replace(job.id, "ID").split(" ago)")[1]
            == e2.value.details().replace(unknown, "ID").split(" ago)")[1]
        )
        assert "relax" not in e.value.details() and "queued" not in e.value.details().lower()
    with pytest.raises(grpc.RpcError) as e:
        first_event(st, job.id, BOB)
    assert e.value.code() == NF
    # bob's cancel did nothing; alice and the admin see the job
    assert call(st, "GetJob", pb.JobRef(id=job.id), ALICE).state == pb.QUEUED
    assert first_event(st, job.id, ALICE).job.id == job.id
    seen = call(st, "GetJob", pb.JobRef(id=job.id), OPS)
    assert seen.owner == "token:alice"
    assert call(st, "CancelJob", pb.JobRef(id=job.id), OPS).state == pb.CANCELLED


def test_idempotency_keys_are_scoped_per_principal(gateway):
    st = gateway.stub()
    key = f"order-{time.time_ns()}"
    a = call(st, "SubmitJob", job_request(key), ALICE)
    b = call(st, "SubmitJob", job_request(key), BOB)
    assert a.id != b.id and b.owner == "token:bob"
    assert call(st, "SubmitJob", job_request(key), ALICE).id == a.id
    assert call(st, "SubmitJob", job_request(key), BOB).id == b.id
    # a different request under bob's key is bob's conflict; it names bob's job, never alice's
    with pytest.raises(grpc.RpcError) as e:
        call(st, "SubmitJob", job_request(key, seed=7), BOB)
    assert (
        e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and b.id in e.value.details()
        and a.id not in e.value.details()
    )
    for j, t in ((a, ALICE), (b, BOB)):
        call(st, "CancelJob", pb.JobRef(id=j.id), t)


def test_unknown_ids_get_an_honest_message(gateway):
    st = gateway.stub()
    with pytest.raises(grpc.RpcError) as e:
        call(st, "GetJob", pb.JobRef(id="0123456789abcdef0123456789abcdef"), ALICE)  # an old uuid4-style id
    assert e.value.code() == NF and "not an id this queue issued" in e.value.details()
    old = new_job_id(time.time() - 2 * 86400)
    with pytest.raises(grpc.RpcError) as e:
        call(st, "GetJob", pb.JobRef(id=old), ALICE)
    assert "purged" in e.value.details()
    recent = new_job_id(time.time() - 5)
    with pytest.raises(grpc.RpcError) as e:
        call(st, "GetJob", pb.JobRef(id=recent), ALICE)
    assert "purged" not in e.value.details() and "submitted" in e.value.details()


def test_mutual_tls_identities_are_principals(tiny_store, tmp_path):
    from tests.test_security import _cert, _key, _write
    from xaiserve.service.security import channel_credentials

    ca_key = _key()
    ca = _cert("tenancy CA", ca_key, "tenancy CA", ca_key, ca=True)
    files = {"ca": _write(tmp_path / "ca.pem", ca)}
    srv_key = _key()
    files["srv"] = _write(
        tmp_path / "srv.pem", _cert("localhost", srv_key, "tenancy CA", ca_key, ca=False, server=True)
    )
    files["srv_key"] = _write(tmp_path / "srv.key", key=srv_key)
    for who in ("lab-a", "lab-b"):
        k = _key()
        files[who] = (
            _write(tmp_path / f"{who}.pem", _cert(who, k, "tenancy CA", ca_key, ca=False)),
            _write(tmp_path / f"{who}.key", key=k),
        )
    with running_server(
        tiny_store,
        job_workers=0,
        tls_cert=str(files["srv"]),
        tls_key=str(files["srv_key"]),
        tls_client_ca=str(files["ca"]),
    ) as srv:
        addr = srv.address.replace("127.0.0.1", "localhost")

        def stub(who):
            ch = grpc.secure_channel(
                addr, channel_credentials(str(files["ca"]), str(files[who][0]), str(files[who][1]))
            )
            srv._channels.append(ch)
            return pb_grpc.ExplainerStub(ch)

        a, b = stub("lab-a"), stub("lab-b")
        job = a.SubmitJob(job_request(), timeout=30)
        assert job.owner == "cert:lab-a"
        assert a.GetJob(pb.JobRef(id=job.id), timeout=30).id == job.id
        with pytest.raises(grpc.RpcError) as e:
            b.GetJob(pb.JobRef(id=job.id), timeout=30)
        assert e.value.code() == NF


# ------------------------------------------------------------------------------------------- Redis
@pytest.mark.slow
def test_a_redis_that_does_not_persist_is_refused_unless_allowed(tmp_path, tiny_store):
    with redis_server(tmp_path / "volatile", volatile=True) as r:
        with pytest.raises(VolatileQueue) as e:
            build_job_service(r.url, None, JobOptions(embedded_workers=0), methods=support_methods())
        assert "appendonly" in str(e.value) and "--allow-volatile-queue" in str(e.value)
        svc = build_job_service(
            r.url, None, JobOptions(embedded_workers=0), methods=support_methods(), allow_volatile=True
        )
        svc.backend.close()
        # `xaiserve worker` refuses with exit 2; with the flag it starts
        cmd = [
            sys.executable,
            "-m",
            "xaiserve.service.worker",
            "--queue",
            r.url,
            "--methods",
            "tests.jobs_support:CountingMethod",
            "--metrics-port",
            "-1",
        ]
        p = subprocess.run(
            cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        assert p.returncode == 2 and "does not persist" in p.stderr
        w = WorkerProcess(r.url, markers_dir=tmp_path, extra=["--allow-volatile-queue"])
        try:
            assert w.ready["event"] == "worker ready"
        finally:
            w.close()
        # `xaiserve serve` refuses too
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "xaiserve.service.cli",
                "serve",
                "--port",
                "0",
                "--metrics-port",
                "-1",
                "--model-store",
                str(tiny_store),
                "--queue",
                r.url,
                "--job-workers",
                "0",
                "--state-dir",
                str(tmp_path / "st"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        assert p.returncode == 2 and "does not persist" in p.stderr


def test_a_redis_data_loss_is_logged_and_named_by_getjob(redis_srv, caplog):
    import redis as redis_py

    queue = f"{redis_srv.url}?prefix=loss{next(_prefix)}"
    opts = JobOptions(embedded_workers=0)

    async def go():
        svc = JobService(open_backend(queue, opts), support_methods(), None, opts)
        await svc.start()
        try:
            job = await svc.submit(count_request("lost"))
            r = redis_py.Redis.from_url(redis_srv.url)
            for k in r.scan_iter(f"{queue.split('prefix=')[1]}:*"):  # what a restart without persistence does
                r.delete(k)
            r.close()
            with caplog.at_level(logging.ERROR, logger="xaiserve.jobs"):
                await asyncio.to_thread(svc._housekeeper.tick)
            assert any("lost its data" in rec.getMessage() for rec in caplog.records)
            with pytest.raises(LookupError) as e:
                await svc.get(job.id)
            assert "lost its data" in str(e.value) and "purged" not in str(e.value)
        finally:
            await svc.stop()

    run(go())


@pytest.mark.slow
def test_a_killed_workers_job_is_reclaimed_within_5_s_with_default_timings(redis_srv, tmp_path):
    queue = f"{redis_srv.url}?prefix=reclaim{next(_prefix)}"
    opts = JobOptions(embedded_workers=0)  # the defaults: heartbeat 1 s, claim_idle 3 s
    marks = tmp_path / "marks"
    marks.mkdir()

    async def go():
        svc = JobService(open_backend(queue, opts), support_methods(), None, opts)
        await svc.start()
        a = WorkerProcess(queue, markers_dir=marks, claim_idle_s=None, heartbeat_s=None, log_path=tmp_path / "a.log")
        b = None
        try:
            job = await svc.submit(count_request("victim", steps=600, step_ms=50))
            while not markers(marks, "victim", "start"):
                await asyncio.sleep(0.05)
            b = WorkerProcess(
                queue, markers_dir=marks, claim_idle_s=None, heartbeat_s=None, log_path=tmp_path / "b.log"
            )
            a.signal(signal.SIGKILL)
            killed = time.time()
            a.wait(10)
            while True:
                j = await svc.get(job.id)
                if j.attempts >= 2 and j.state == pb.RUNNING:
                    break
                assert time.time() - killed < 30, "never reclaimed"
                await asyncio.sleep(0.05)
            events = await asyncio.to_thread(svc.backend.events_after, job.id, 0)
            requeued = next(e for e in events if e.type == pb.EVENT_QUEUED and "heart-beating" in e.message)
            return requeued.unix_time - killed
        finally:
            a.close()
            if b is not None:
                b.close()
            await svc.stop()

    took = run(go(), timeout=120)
    print(f"job of a kill -9 worker re-queued {took:.2f} s after the kill")
    assert took <= 5.0, f"reclaimed {took:.2f} s after kill -9"


@pytest.mark.slow
def test_readyz_follows_the_queue(tiny_store, tmp_path):
    srv_r = RedisServer(tmp_path / "r").start()
    try:
        with running_server(tiny_store, job_workers=0, queue=srv_r.url) as srv:
            url = srv.metrics_url.replace("/metrics", "/readyz")

            def ready():
                try:
                    with urllib.request.urlopen(url, timeout=10) as r:
                        return r.status, json.loads(r.read())
                except urllib.error.HTTPError as e:
                    return e.code, json.loads(e.read())

            assert ready()[0] == 200
            srv_r.stop(kill=True)
            code, doc = ready()
            assert code == 503 and doc["checks"]["queue"] != "ok" and doc["checks"]["models"].endswith("loaded")
            srv_r.start()
            end = time.monotonic() + 20
            while ready()[0] != 200:
                assert time.monotonic() < end
                time.sleep(0.2)
    finally:
        srv_r.stop(kill=True)


def test_a_job_file_from_before_owners_is_migrated(tmp_path):
    """A jobs.sqlite written before jobs had owners: its jobs belong to "anonymous", and idempotency
    keys become per owner (the store-wide unique index is replaced)."""
    import sqlite3

    from xaiserve.service.jobs.sqlite_backend import SqliteBackend

    path = tmp_path / "jobs.sqlite"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE jobs (rid INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, method TEXT NOT NULL,
            model TEXT NOT NULL, state INTEGER NOT NULL, priority INTEGER NOT NULL DEFAULT 0,
            progress REAL NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '', last_error TEXT NOT NULL DEFAULT '',
            created REAL NOT NULL, queued_at REAL NOT NULL, started REAL NOT NULL DEFAULT 0,
            finished REAL NOT NULL DEFAULT 0, deadline REAL NOT NULL DEFAULT 0, idem TEXT,
            attempts INTEGER NOT NULL DEFAULT 0, worker TEXT NOT NULL DEFAULT '', heartbeat REAL NOT NULL DEFAULT 0,
            seq INTEGER NOT NULL DEFAULT 0, request BLOB NOT NULL, result BLOB);
        CREATE UNIQUE INDEX jobs_idem ON jobs(idem) WHERE idem IS NOT NULL;
    """)
    req = count_request("old", idempotency_key="k1")
    old.execute(
        "INSERT INTO jobs(id, method, model, state, created, queued_at, idem, request) VALUES (?,?,?,?,?,?,?,?)",
        (
            "a" * 32,
            "count",
            "old",
            pb.QUEUED,
            time.time(),
            time.time(),
            "k1",
            req.SerializeToString(deterministic=True),
        ),
    )
    old.commit()
    old.close()
    b = SqliteBackend(path, JobOptions(embedded_workers=0))
    try:
        assert b.get("a" * 32).owner == "anonymous"
        again, created = b.submit(req, job_id=new_job_id(time.time()), now=time.time(), owner="anonymous")
        assert not created and again.id == "a" * 32
        other, created = b.submit(req, job_id=new_job_id(time.time()), now=time.time(), owner="token:bob")
        assert created and other.owner == "token:bob" and other.id != "a" * 32
    finally:
        b.close()
