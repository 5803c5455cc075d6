"""StreamExplain per frame: a bad frame fails only itself, a run of bad frames ends the stream,
the per-frame metrics count frames, the stream's duration has its own histogram."""

from __future__ import annotations

import io
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image as PILImage
from prometheus_client.parser import text_string_to_metric_families

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.client import ExplainerClient, decode_mask


def jpeg(i: int, h: int = 48, w: int = 64) -> bytes:
    a = (np.random.default_rng(i).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]  # the header survives, the scan does not: decodes fail, probes pass


@pytest.fixture()
def client(server):
    with ExplainerClient(server.address) as c:
        yield c


@pytest.mark.parametrize("policy", [pb.LATEST, pb.ALL], ids=["LATEST", "ALL"])
def test_a_corrupt_frame_mid_stream_gets_its_own_error_and_later_frames_are_answered(client, policy):
    frames = [jpeg(i) for i in range(8)]
    frames[3] = truncated(frames[3])
    # window=1: one frame at a time, so LATEST drops nothing and every frame gets an answer
    out = list(client.stream(frames, "tiny-nemu", policy=policy, window=1, timeout=60))
    assert [a.frame_id for a in out] == list(range(8))
    bad = out[3]
    assert not bad.HasField("result")
    assert bad.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad.status.message.startswith("frame 3: ") and "could not be decoded" in bad.status.message
    for a in out[:3] + out[4:]:
        assert a.status.code == 0 and a.HasField("result")
        assert decode_mask(a.result).shape == (48, 64)
    assert all(a.dropped_total == 0 for a in out)


def test_max_consecutive_errors_failed_frames_in_a_row_end_the_stream(client):
    good = [jpeg(i) for i in range(8)]
    frames = [good[0], truncated(good[1]), b"junk", good[3], truncated(good[4]), b"", truncated(good[6]), good[7]]
    got: list[pb.ExplainFrameResult] = []
    with pytest.raises(grpc.RpcError) as e:
        for a in client.stream(frames, "tiny-nemu", policy=pb.ALL, window=1, max_consecutive_errors=3, timeout=60):
            got.append(a)
    # two failures, a good frame resets the run, then the third failure in a row ends the stream
    assert [(a.frame_id, a.status.code) for a in got] == [(0, 0), (1, 3), (2, 3), (3, 0), (4, 3), (5, 3)]
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("frame 6: ") and "3 frames in a row failed" in e.value.details()


def test_by_default_ten_failed_frames_in_a_row_end_the_stream(client):
    frames = [b"junk"] * 12
    got = []
    with pytest.raises(grpc.RpcError) as e:
        for a in client.stream(frames, "tiny-nemu", policy=pb.ALL, timeout=60):
            got.append(a)
    assert len(got) == 9 and all(a.status.code == 3 for a in got)
    assert e.value.details().startswith("frame 9: ") and "max_consecutive_errors = 10" in e.value.details()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_per_frame_metrics_count_frames_and_the_stream_duration_is_not_a_request_latency(server, client):
    model = "tiny-nemu:1"
    before = scrape(server.metrics_url)
    n = 12
    frames = [jpeg(i) for i in range(n)]
    frames[5] = b"junk"
    out = list(client.stream(frames, "tiny-nemu", policy=pb.ALL, timeout=60))
    assert len(out) == n
    after = scrape(server.metrics_url)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("xaiserve_frame_latency_seconds_count", model=model) == n - 1  # answered frames
    assert delta("xaiserve_frame_queue_wait_seconds_count", model=model) == n  # every frame that ran
    assert delta("xaiserve_stream_frames_total", model=model, event="received") == n
    assert delta("xaiserve_stream_frames_total", model=model, event="answered") == n - 1
    assert delta("xaiserve_stream_frames_total", model=model, event="failed") == 1
    assert delta("xaiserve_stream_duration_seconds_count", rpc="StreamExplain", model=model) == 1
    assert ("xaiserve_request_latency_seconds_count", (("model", model), ("rpc", "StreamExplain"))) not in after
    # the duration histogram's buckets reach hours: a long stream is not "+Inf"
    assert (
        "xaiserve_stream_duration_seconds_bucket",
        (("le", "3600.0"), ("model", model), ("rpc", "StreamExplain")),
    ) in after


def test_stream_series_exist_from_the_start_for_every_masking_network(server):
    # tiny-nemt is never streamed in this session: its series exist anyway, at 0
    m = scrape(server.metrics_url)
    for model in ("tiny-nemt:1", "slow-nemu:1", "tiny-nemu:1"):
        assert ("xaiserve_frame_latency_seconds_count", (("model", model),)) in m
        for ev in ("received", "answered", "failed", "dropped"):
            assert ("xaiserve_stream_frames_total", (("event", ev), ("model", model))) in m
    assert m[("xaiserve_frame_latency_seconds_count", (("model", "tiny-nemt:1"),))] == 0


def test_answers_carry_the_servers_answer_rate_and_timing_has_the_requests_share(client):
    out = list(client.stream([jpeg(i) for i in range(10)], "tiny-nemu", policy=pb.ALL, timeout=60))
    assert out[0].answer_fps == 0.0  # one answer is no rate yet
    assert all(a.answer_fps > 0 for a in out[1:])
    t = out[-1].result.timing
    assert 0 < t.inference_share_ms <= t.inference_ms + 1e-9
    assert t.inference_share_ms == pytest.approx(t.inference_ms / t.batch_size)
