"""/metrics is scraped over HTTP and parsed; counts match the calls made."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.tensors import to_tensor


def scrape(url: str) -> dict[tuple, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[tuple, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m, name, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counts_and_histograms_match_calls(server):
    stub = server.stub()
    before = scrape(server.metrics_url)
    img = pb.Image(tensor=to_tensor(np.zeros((32, 32, 3), np.uint8)))
    for _ in range(5):
        stub.Explain(pb.ExplainRequest(model="tiny-nemu", image=img), timeout=30)
    for _ in range(2):
        try:
            stub.Explain(pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=b"x")), timeout=30)
        except grpc.RpcError:
            pass
    try:
        stub.Explain(pb.ExplainRequest(model="ghost", image=img), timeout=30)
    except grpc.RpcError:
        pass
    list(
        stub.StreamExplain(
            iter(
                [
                    pb.ExplainFrame(frame_id=i, model="tiny-nemu" if i == 0 else "", image=img, policy=pb.ALL)
                    for i in range(3)
                ]
            ),
            timeout=30,
        )
    )
    after = scrape(server.metrics_url)
    d = lambda name, **l: value(after, name, **l) - value(before, name, **l)  # noqa: E731
    assert d("xaiserve_requests_total", rpc="Explain", model="tiny-nemu:1", code="OK") == 5
    assert d("xaiserve_requests_total", rpc="Explain", model="tiny-nemu:1", code="INVALID_ARGUMENT") == 2
    assert d("xaiserve_requests_total", rpc="Explain", model="unknown", code="NOT_FOUND") == 1
    assert d("xaiserve_request_latency_seconds_count", rpc="Explain", model="tiny-nemu:1") == 7
    # 5 unary + 3 stream frames ran through the model's batcher
    assert d("xaiserve_queue_wait_seconds_count", model="tiny-nemu:1") == 8
    assert d("xaiserve_batch_size_sum", model="tiny-nemu:1") == 8
    assert d("xaiserve_stream_frames_total", model="tiny-nemu:1", event="received") == 3
    assert d("xaiserve_stream_frames_total", model="tiny-nemu:1", event="answered") == 3
    assert d("xaiserve_requests_total", rpc="StreamExplain", model="tiny-nemu:1", code="OK") == 1
    # millisecond buckets exist
    assert (
        "xaiserve_request_latency_seconds_bucket",
        tuple(sorted({"rpc": "Explain", "model": "tiny-nemu:1", "le": "0.001"}.items())),
    ) in after
    assert value(after, "xaiserve_model_load_seconds", model="tiny-nemu:1") > 0
    assert value(after, "xaiserve_inflight_requests", rpc="Explain") == 0
    assert value(after, "xaiserve_serving") == 1
    assert any(k[0] == "xaiserve_build_info" for k in after)
