"""Hardening of the gRPC front: malformed protobuf, unbounded user values, work refused before it is
done, the event loop free while decodes run, and an HTTP port with exactly its documented routes.

Each test reproduces a finding of the hostile-client review against the real server (thread mode,
real gRPC channel) and checks the fixed behaviour."""

from __future__ import annotations

import io
import json
import statistics
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from tests.serverutil import running_server
from xaiserve.proto.explain.v1 import explainer_pb2 as pb

IA, NF, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED
UNARY = ["Explain", "Denoise", "ListModels", "SubmitJob", "GetJob", "CancelJob"]
MESSAGE_OF = {
    "Explain": "ExplainRequest",
    "Denoise": "DenoiseRequest",
    "ListModels": "ListModelsRequest",
    "SubmitJob": "JobRequest",
    "GetJob": "JobRef",
    "CancelJob": "JobRef",
    "WatchJob": "JobRef",
    "StreamExplain": "ExplainFrame",
}
# Bytes that no message parses: a truncated varint, a length past the end, a bad wire type (7),
# an end-group tag with no group, and invalid UTF-8 in string field 1 (model / method / id / kind).
GARBAGE = [b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0a\x64abc", b"\x0f\x00", b"\x0c", b"\x0a\x02\xc3\x28"]


def png(h: int, w: int, noise: bool = False) -> bytes:
    arr = (
        np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8) if noise else np.zeros((h, w, 3), np.uint8)
    )
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def srv(tiny_store):
    with running_server(tiny_store, job_workers=0, max_delay_ms=1.0) as s:
        yield s


def big_stub(s):
    from xaiserve.proto.explain.v1 import explainer_pb2_grpc as pb_grpc

    return pb_grpc.ExplainerStub(s.channel(**{"grpc.max_receive_message_length": 64 << 20}))


def raw(ch, kind: str, name: str):
    f = getattr(ch, kind)
    return f(f"/explain.v1.Explainer/{name}", request_serializer=lambda b: b, response_deserializer=lambda b: b)


@pytest.mark.parametrize("name", UNARY)
@pytest.mark.parametrize("garbage", GARBAGE, ids=["varint", "overrun", "wiretype7", "endgroup", "utf8"])
def test_malformed_protobuf_is_invalid_argument_on_every_unary_rpc(srv, name, garbage):
    with pytest.raises(grpc.RpcError) as e:
        raw(srv.channel(), "unary_unary", name)(garbage, timeout=10)
    assert e.value.code() == IA, (name, e.value.code(), e.value.details())
    assert f"not a valid explain.v1.{MESSAGE_OF[name]}" in e.value.details()


def test_malformed_protobuf_on_watchjob(srv):
    with pytest.raises(grpc.RpcError) as e:
        list(raw(srv.channel(), "unary_stream", "WatchJob")(GARBAGE[0], timeout=10))
    assert e.value.code() == IA and "not a valid explain.v1.JobRef" in e.value.details()


def test_stream_of_garbage_frames_ends_invalid_argument_naming_the_position(srv):
    frames = [
        pb.ExplainFrame(
            frame_id=i, model="tiny-nemu" if i == 0 else "", image=pb.Image(encoded=png(32, 32))
        ).SerializeToString()
        for i in range(2)
    ]
    call = raw(srv.channel(), "stream_stream", "StreamExplain")
    answered = []
    with pytest.raises(grpc.RpcError) as e:
        for r in call(iter([*frames, b"\x0a\xff\xff", frames[1]]), timeout=30):
            answered.append(r)
    assert e.value.code() == IA
    assert "stream message 2 (counting from 0) is not a valid explain.v1.ExplainFrame" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # only garbage: no longer an OK stream with 0 results
        list(call(iter([GARBAGE[0]] * 3), timeout=30))
    assert e.value.code() == IA and "stream message 0" in e.value.details()


def test_a_corrupt_image_in_a_valid_frame_is_a_frame_error_not_a_decode_error(srv):
    frames = [
        pb.ExplainFrame(frame_id=0, model="tiny-nemu", policy=pb.ALL, image=pb.Image(encoded=b"not an image")),
        pb.ExplainFrame(frame_id=1, image=pb.Image(encoded=png(32, 32))),
    ]
    results = list(srv.stub().StreamExplain(iter(frames), timeout=30))  # the stream itself ends OK
    bad = next(r for r in results if r.frame_id == 0)
    assert bad.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "could not be decoded" in bad.status.message and "not a valid explain.v1" not in bad.status.message
    assert any(r.frame_id == 1 and not r.status.code for r in results)


LONG = 10_000


@pytest.mark.parametrize(
    "label,call,code",
    [
        (
            "1 MB model name",
            lambda st: st.Explain(
                pb.ExplainRequest(model="m" * 1_000_000, image=pb.Image(encoded=png(8, 8))), timeout=20
            ),
            NF,
        ),
        (
            "10 kB model name",
            lambda st: st.Explain(pb.ExplainRequest(model="m" * LONG, image=pb.Image(encoded=png(8, 8))), timeout=20),
            NF,
        ),
        (
            "10 kB version",
            lambda st: st.Explain(
                pb.ExplainRequest(model="tiny-nemu:" + "9" * LONG, image=pb.Image(encoded=png(8, 8))), timeout=20
            ),
            NF,
        ),
        (
            "10 kB method",
            lambda st: st.Explain(
                pb.ExplainRequest(
                    model="tiny-nemu", image=pb.Image(encoded=png(8, 8)), options=pb.ExplainOptions(method="x" * LONG)
                ),
                timeout=20,
            ),
            IA,
        ),
        (
            "10 kB dtype",
            lambda st: st.Explain(
                pb.ExplainRequest(
                    model="tiny-nemu", image=pb.Image(tensor=pb.Tensor(dtype="f" * LONG, shape=[2, 2], data=b"\0" * 4))
                ),
                timeout=20,
            ),
            IA,
        ),
        ("10 kB denoise model", lambda st: st.Denoise(pb.DenoiseRequest(model="d" * LONG), timeout=20), NF),
        (
            "10 kB job method",
            lambda st: st.SubmitJob(pb.JobRequest(method="j" * LONG, model="tiny-encoder"), timeout=20),
            IA,
        ),
        ("10 kB job id", lambda st: st.GetJob(pb.JobRef(id="i" * LONG), timeout=20), IA),
        ("10 kB cancel id", lambda st: st.CancelJob(pb.JobRef(id="i" * LONG), timeout=20), IA),
        (
            "10 kB idempotency key",
            lambda st: st.SubmitJob(
                pb.JobRequest(method="relax", model="tiny-encoder", idempotency_key="k" * LONG), timeout=20
            ),
            IA,
        ),
        (
            "10 kB stream model",
            lambda st: list(
                st.StreamExplain(
                    iter([pb.ExplainFrame(frame_id=0, model="s" * LONG, image=pb.Image(encoded=png(8, 8)))]), timeout=20
                )
            ),
            NF,
        ),
    ],
)
def test_messages_quote_at_most_200_characters_of_user_values(srv, label, call, code):
    st = srv.stub()
    for _ in range(3):  # 10 kB values used to fail intermittently (trailers over the metadata limit)
        with pytest.raises(grpc.RpcError) as e:
            call(st)
        assert e.value.code() == code, (label, e.value.code(), e.value.details()[:300])
        details = e.value.details()
        assert len(details) < 1200, (label, len(details))
        assert "characters)" in details, details[:300]  # the quote says how long the value was


@pytest.mark.slow
def test_largest_image_that_cannot_fit_is_refused_before_any_work(srv):
    """A 49 kB PNG of 4096 x 4096 used to be decoded and resized (9.5 s on the loop) and then fail
    with "Sent message larger than max"; now its header decides, before a pixel is decoded."""
    data = png(4096, 4096)
    assert len(data) < 100_000
    fast = srv.running.fast
    before = fast.cpu.submitted
    with pytest.raises(grpc.RpcError) as e:
        srv.stub().Explain(pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=data)), timeout=60)
    assert e.value.code() == RE
    d = e.value.details()
    assert "max_message_mb = 64" in d and "67108864 bytes" in d and "4096 x 4096" in d, d
    assert fast.cpu.submitted == before, "the refused request must not reach the decode pool"
    # a raw 48 MB tensor (4096 x 4096 x 3 uint8) the same: refused on its shape
    t = pb.Tensor(dtype="uint8", shape=[4096, 4096, 3], data=bytes(4096 * 4096 * 3))
    with pytest.raises(grpc.RpcError) as e:
        srv.stub().Explain(pb.ExplainRequest(model="tiny-nemu", image=pb.Image(tensor=t)), timeout=60)
    assert e.value.code() == RE and "max_message_mb" in e.value.details()
    assert fast.cpu.submitted == before + 1, "only the protobuf parse of the 48 MB message (off the loop), no decode"
    # with return_png the renderings count too; the hint names a size that fits
    with pytest.raises(grpc.RpcError) as e:
        srv.stub().Explain(
            pb.ExplainRequest(
                model="tiny-nemu", image=pb.Image(encoded=png(3000, 3000)), options=pb.ExplainOptions(return_png=True)
            ),
            timeout=60,
        )
    assert e.value.code() == RE and "PNG renderings" in e.value.details() and "return_png off" in e.value.details()


def test_a_large_image_that_fits_is_answered_at_its_resolution(srv):
    r = big_stub(srv).Explain(
        pb.ExplainRequest(
            model="tiny-nemu", image=pb.Image(encoded=png(1500, 1200)), options=pb.ExplainOptions(return_png=True)
        ),
        timeout=120,
    )
    assert list(r.mask.shape) == [1500, 1200]
    assert Image.open(io.BytesIO(r.overlay_png)).size == (1200, 1500)


@pytest.mark.slow
def test_health_and_listmodels_answer_while_slow_decodes_saturate_the_server(tiny_store):
    """Decoding and resizing used to run on the event loop: a concurrent ListModels took 8.9 s."""
    with running_server(tiny_store, job_workers=0, decode_threads=1) as s:
        data = png(2000, 2000, noise=True)
        req = pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=data))
        stub = big_stub(s)
        futures = [stub.Explain.future(req, timeout=300) for _ in range(6)]
        health = health_pb2_grpc.HealthStub(s.channel())
        pool = s.running.fast.cpu
        deadline = time.monotonic() + 60
        while pool.pending < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        times = {"health": [], "list": []}
        busy = []
        for _ in range(10):
            busy.append(pool.pending)
            t = time.perf_counter()
            assert (
                health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                == health_pb2.HealthCheckResponse.SERVING
            )
            times["health"].append(time.perf_counter() - t)
            t = time.perf_counter()
            assert stub.ListModels(pb.ListModelsRequest(), timeout=10).models
            times["list"].append(time.perf_counter() - t)
            time.sleep(0.02)
        for f in futures:
            assert list(f.result().mask.shape) == [2000, 2000]
        assert min(busy) >= 1, f"the decode pool went idle during the probes ({busy}): the test saturated nothing"
        for k, v in times.items():
            ms = [round(x * 1e3, 1) for x in v]
            assert statistics.median(v) < 0.05, (k, ms)
            # one slow probe is the shared machine (407 ms seen once at load 4.5); a decode on the
            # loop would hold every probe behind it (a 2000 x 2000 PNG: seconds)
            assert max(v) < 1.0, (k, ms)


@pytest.mark.slow
def test_admission_refuses_at_once_when_full(tiny_store):
    with running_server(tiny_store, job_workers=0, decode_threads=1, max_inflight=2) as s:
        stub = big_stub(s)
        slow = pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=png(2000, 2000, noise=True)))
        futures = [stub.Explain.future(slow, timeout=300) for _ in range(2)]
        adm = s.running.fast.admission
        deadline = time.monotonic() + 60
        while adm.inflight < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        with pytest.raises(grpc.RpcError) as e:
            stub.Explain(pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=png(32, 32))), timeout=30)
        assert e.value.code() == RE and "max_inflight" in e.value.details()
        # the refused call never took a slot (the two slow calls hold both; counting the CPU pool's
        # submissions here would race with the slow calls' own later pool work)
        assert adm.inflight <= 2
        for f in futures:
            f.result()
        assert stub.Explain(
            pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=png(32, 32))), timeout=30
        ).mask.shape


def _get(url: str, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_http_port_answers_only_its_routes(srv):
    base = srv.metrics_url.rsplit("/", 1)[0]
    code, body = _get(base + "/metrics")
    assert code == 200 and b"xaiserve_requests" in body
    code, body = _get(base + "/healthz")
    assert code == 200 and json.loads(body)["checks"]["event_loop"] == "ok"
    code, body = _get(base + "/readyz")
    doc = json.loads(body)
    assert code == 200 and doc["status"] == "ok" and set(doc["checks"]) == {"serving", "models", "queue"}
    for path in ("/debug", "/config", "/metrics/x", "/healthz/../metrics", "/favicon.ico", "/api"):
        code, body = _get(base + path)
        assert code == 404, path
        assert b"xaiserve_requests" not in body
    assert b"xaiserve_requests" not in _get(base + "/")[1]  # "/" is the web viewer's page (config web)
    assert _get(base + "/metrics", "POST")[0] == 405


@pytest.mark.slow
def test_healthz_fails_when_the_event_loop_is_stuck(tiny_store):
    with running_server(tiny_store, job_workers=0, load_models="lazy") as s:
        base = s.metrics_url.rsplit("/", 1)[0]
        release = threading.Event()
        s.loop.call_soon_threadsafe(lambda: release.wait(5))  # blocks the loop, as a runaway call would
        try:
            code, body = _get(base + "/healthz")
        finally:
            release.set()
        assert code == 503 and "event loop" in json.loads(body)["checks"]["event_loop"]
        assert _get(base + "/healthz")[0] == 200
