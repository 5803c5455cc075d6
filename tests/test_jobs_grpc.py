"""The job RPCs over a real gRPC channel (JobServicerMixin on a grpc.aio server) and the `xaiserve jobs` CLI."""

from __future__ import annotations

import asyncio
import json
import threading

import grpc
import numpy as np
import pytest

from tests.jobs_support import count_request, markers, support_methods
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.proto.explain.v1 import explainer_pb2_grpc as pb_grpc
from xaiserve.service import cli_jobs
from xaiserve.service.jobs.factory import build_job_service
from xaiserve.service.jobs.grpc_adapter import JobServicerMixin
from xaiserve.service.jobs.options import JobOptions


class JobsOnlyServicer(JobServicerMixin, pb_grpc.ExplainerServicer):
    def __init__(self, jobs):
        self.jobs = jobs


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory):
    """A grpc.aio server with the job RPCs, on a SQLite queue with one embedded worker, in a thread."""
    d = tmp_path_factory.mktemp("jobs-grpc")
    opts = JobOptions(max_queued=20, claim_idle_s=1.0, heartbeat_s=0.2, progress_min_interval_s=0.05, stop_grace_s=1.0)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict = {}

    async def main():
        svc = build_job_service(f"sqlite:///{d}/jobs.sqlite", None, opts, methods=support_methods())
        await svc.start()
        server = grpc.aio.server()
        pb_grpc.add_ExplainerServicer_to_server(JobsOnlyServicer(svc), server)
        box["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        box.update(server=server, svc=svc, stop=asyncio.Event())
        ready.set()
        await box["stop"].wait()
        await server.stop(1.0)
        await svc.stop()

    t = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    t.start()
    assert ready.wait(30)
    yield f"127.0.0.1:{box['port']}"
    loop.call_soon_threadsafe(box["stop"].set)
    t.join(30)
    loop.close()


@pytest.fixture
def stub(jobs_server):
    with grpc.insecure_channel(jobs_server) as ch:
        yield pb_grpc.ExplainerStub(ch)


def test_rpcs_over_a_real_channel(stub, marks):
    job = stub.SubmitJob(count_request("rpc", steps=6, step_ms=10), timeout=10)
    events = list(stub.WatchJob(pb.JobRef(id=job.id), timeout=30))
    assert events[0].sequence >= 1 and events[-1].type == pb.EVENT_SUCCEEDED
    assert events[-1].job.result.relax.num_masks == 6
    got = stub.GetJob(pb.JobRef(id=job.id, include_result=True), timeout=10)
    assert got.state == pb.SUCCEEDED and got.result == events[-1].job.result
    long = stub.SubmitJob(count_request("rpc-long", steps=500, step_ms=10), timeout=10)
    assert stub.CancelJob(pb.JobRef(id=long.id), timeout=10).state == pb.CANCELLED


@pytest.mark.parametrize(
    "call, request_, code, text",
    [
        ("SubmitJob", pb.JobRequest(method="nope", model="m"), grpc.StatusCode.INVALID_ARGUMENT, "count, fail"),
        ("SubmitJob", count_request("missing"), grpc.StatusCode.NOT_FOUND, "missing"),
        ("GetJob", pb.JobRef(id="0" * 32), grpc.StatusCode.NOT_FOUND, "not found"),
        ("CancelJob", pb.JobRef(id=""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ],
)
def test_errors_map_to_status_codes(stub, call, request_, code, text):
    with pytest.raises(grpc.RpcError) as e:
        getattr(stub, call)(request_, timeout=10)
    assert e.value.code() == code and text in e.value.details()


def test_watch_unknown_job_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.WatchJob(pb.JobRef(id="f" * 32), timeout=10))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_submit_watch_get_cancel(jobs_server, marks, tmp_path, capsys):
    img = tmp_path / "img.png"
    img.write_bytes(b"not decoded by the test method")
    out = tmp_path / "result"
    rc = cli_jobs.main(
        [
            "submit",
            str(img),
            "--method",
            "count",
            "--model",
            "cli",
            "--params",
            "relax",
            "--param",
            "num_masks=4",
            "--param",
            "batch_size=5",
            "--watch",
            "--out",
            str(out),
            "--address",
            jobs_server,
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    job_id, final = lines[0], json.loads(lines[-1])
    assert final["id"] == job_id and final["state"] == "SUCCEEDED"
    expected = np.arange(16, dtype=np.float32).reshape(4, 4) / 15.0
    assert np.array_equal(np.load(out / "importance.npy"), expected)
    assert (out / "relax.png").read_bytes() == b"\x89PNG fake"
    meta = json.loads((out / "result.json").read_text())
    assert meta["relax"]["num_masks"] == 4 and meta["parameters"]["steps"] == 4

    out2 = tmp_path / "again"
    assert cli_jobs.main(["get", job_id, "--out", str(out2), "--address", jobs_server]) == 0
    assert np.array_equal(np.load(out2 / "importance.npy"), expected)
    capsys.readouterr()

    assert (
        cli_jobs.main(
            [
                "submit",
                str(img),
                "--method",
                "count",
                "--model",
                "cli-long",
                "--params",
                "relax",
                "--param",
                "num_masks=500",
                "--address",
                jobs_server,
            ]
        )
        == 0
    )
    long_id = capsys.readouterr().out.strip()
    assert cli_jobs.main(["cancel", long_id, "--address", jobs_server]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "CANCELLED"
    assert cli_jobs.main(["watch", long_id, "--address", jobs_server]) == 1  # it did not succeed
    assert len(markers(marks, "cli", "done")) == 1


def test_cli_reports_bad_input_clearly(jobs_server, tmp_path, capsys):
    img = tmp_path / "img.png"
    img.write_bytes(b"x")
    rc = cli_jobs.main(
        ["submit", str(img), "--method", "relax", "--model", "m", "--param", "num_maskz=3", "--address", jobs_server]
    )
    assert rc == 2 and "no such field" in capsys.readouterr().err
    rc = cli_jobs.main(
        ["submit", str(img), "--method", "relax", "--model", "m", "--param", "p_keep=half", "--address", jobs_server]
    )
    assert rc == 2 and "not a valid float" in capsys.readouterr().err
    rc = cli_jobs.main(["submit", str(img), "--method", "relaxx", "--model", "m", "--address", jobs_server])
    err = capsys.readouterr().err
    assert rc == 2 and "INVALID_ARGUMENT" in err and "count, fail" in err
    assert cli_jobs.main(["get", "f" * 32, "--address", jobs_server]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
