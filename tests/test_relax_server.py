"""RELAX as a real job through the real server (tiny store, SQLite queue, one embedded worker):
submit, watch progress with partial heatmaps, fetch the result; bad requests fail at submit time;
cancel mid-run."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest
from PIL import Image as PILImage

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.tensors import from_tensor


def _png(size: int = 32) -> bytes:
    a = np.full((size, size, 3), 30, np.uint8)
    a[6:20, 8:24] = [220, 180, 40]
    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _request(model: str = "tiny-encoder", **params) -> pb.JobRequest:
    return pb.JobRequest(method="relax", model=model, image=pb.Image(encoded=_png()), relax=pb.RelaxParams(**params))


def test_relax_job_submit_watch_result(stub):
    # enough batches that the watcher sees the job run, on a fast machine too
    job = stub.SubmitJob(_request(num_masks=2000, batch_size=16, seed=3), timeout=30)
    events = list(stub.WatchJob(pb.JobRef(id=job.id), timeout=120))
    assert events[-1].type == pb.EVENT_SUCCEEDED, events[-1].job.error
    progress = [e for e in events if e.type == pb.EVENT_PROGRESS]
    assert progress and all(0 < e.progress <= 1 for e in progress)
    running = [e for e in events if e.type in (pb.EVENT_STARTED, pb.EVENT_PROGRESS)]
    assert any(e.HasField("partial_heatmap") for e in running)
    assert max(e.metrics["masks"] for e in progress) <= 2000
    r = events[-1].job.result.relax
    assert r.num_masks == 2000
    imp = from_tensor(r.importance)
    assert imp.shape == (32, 32) and np.isfinite(imp).all()
    assert PILImage.open(io.BytesIO(r.png)).format == "PNG"
    params = json.loads(events[-1].job.result.parameters_json)
    assert params["seed"] == 3 and params["encoder"] == "tiny-encoder:1"
    got = stub.GetJob(pb.JobRef(id=job.id, include_result=True), timeout=30)
    assert got.state == pb.SUCCEEDED and got.result.relax.num_masks == 2000


@pytest.mark.parametrize(
    "request_, code, text",
    [
        (_request("tiny-classifier"), grpc.StatusCode.INVALID_ARGUMENT, "tiny-encoder:1"),
        (_request("no-such-model"), grpc.StatusCode.NOT_FOUND, "no-such-model"),
        (_request(num_masks=0), grpc.StatusCode.INVALID_ARGUMENT, "num_masks"),
        (_request(p_keep=1.5), grpc.StatusCode.INVALID_ARGUMENT, "p_keep"),
        (_request(cells=64), grpc.StatusCode.INVALID_ARGUMENT, "cells"),
        (
            pb.JobRequest(method="relax", model="tiny-encoder", image=pb.Image(encoded=b"junk")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "decoded",
        ),
    ],
)
def test_bad_relax_jobs_fail_at_submit(stub, request_, code, text):
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitJob(request_, timeout=30)
    assert e.value.code() == code and text in e.value.details()


def test_relax_job_cancel_mid_run(stub):
    job = stub.SubmitJob(_request(num_masks=100_000, batch_size=16), timeout=30)
    for ev in stub.WatchJob(pb.JobRef(id=job.id), timeout=120):
        if ev.type == pb.EVENT_PROGRESS:
            assert stub.CancelJob(pb.JobRef(id=job.id), timeout=30).state == pb.CANCELLED
            break
    events = list(stub.WatchJob(pb.JobRef(id=job.id), timeout=60))
    assert events[-1].type == pb.EVENT_CANCELLED
    assert stub.GetJob(pb.JobRef(id=job.id), timeout=30).state == pb.CANCELLED
