"""End to end through the real server (tests/serverutil.py) and its default job methods: RELAX jobs on
the tiny test encoder, the embedded SQLite queue, over a real gRPC channel; and the server process
killed mid-job (SIGKILL) and restarted on the same state directory."""

from __future__ import annotations

import io
import signal
import time
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.serverutil import running_server, server_process
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.proto.explain.v1 import explainer_pb2_grpc as pb_grpc


def _png() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def relax(num_masks: int, **kw) -> pb.JobRequest:
    return pb.JobRequest(
        method="relax",
        model="tiny-encoder",
        image=pb.Image(encoded=_png()),
        relax=pb.RelaxParams(num_masks=num_masks, batch_size=32, seed=0),
        **kw,
    )


def test_job_rpcs_on_the_real_server(tiny_store, tmp_path):
    with running_server(tiny_store, job_workers=1, state_dir=str(tmp_path / "state")) as srv:
        stub = srv.stub()
        job = stub.SubmitJob(relax(128, idempotency_key="e2e-1"), timeout=30)
        events = list(stub.WatchJob(pb.JobRef(id=job.id), timeout=120))
        final = events[-1].job
        assert events[-1].type == pb.EVENT_SUCCEEDED, final.error
        assert final.result.relax.num_masks == 128 and list(final.result.relax.importance.shape) == [32, 32]
        assert stub.SubmitJob(relax(128, idempotency_key="e2e-1"), timeout=30).id == job.id
        for req, code in (
            (relax(0), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.JobRequest(method="relax", model="nope", image=pb.Image(encoded=_png())), grpc.StatusCode.NOT_FOUND),
            (pb.JobRequest(method="nope", model="tiny-encoder"), grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(grpc.RpcError) as e:
                stub.SubmitJob(req, timeout=30)
            assert e.value.code() == code
        text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
        assert 'xaiserve_jobs_total{method="relax",state="succeeded"}' in text
        assert 'xaiserve_job_queue_wait_seconds_count{method="relax"}' in text


@pytest.mark.slow
def test_killed_server_finishes_the_job_after_restart(tiny_store, tmp_path):
    state = str(tmp_path / "state")
    with server_process(tiny_store, state_dir=state, job_workers=1, load_models="lazy") as srv:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ExplainerStub(ch)
            job = stub.SubmitJob(relax(3000, idempotency_key="kill-1"), timeout=60)
            end = time.monotonic() + 120
            while stub.GetJob(pb.JobRef(id=job.id), timeout=10).progress <= 0:
                assert time.monotonic() < end, "the job never made progress"
                time.sleep(0.05)
        srv.process.send_signal(signal.SIGKILL)
        srv.process.wait(30)
    with server_process(tiny_store, state_dir=state, job_workers=1, load_models="lazy") as srv:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ExplainerStub(ch)
            events = list(stub.WatchJob(pb.JobRef(id=job.id), timeout=180))
            final = events[-1].job
            assert events[-1].type == pb.EVENT_SUCCEEDED, final.error
            assert final.attempts == 2 and final.result.relax.num_masks == 3000
            # the client's retry after the crash finds the same job
            assert stub.SubmitJob(relax(3000, idempotency_key="kill-1"), timeout=60).id == job.id
