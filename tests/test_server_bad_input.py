"""Every bad input gets a precise status and an actionable message, and the server keeps serving."""

from __future__ import annotations

import io
import struct
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.tensors import to_tensor

OK_IMG = np.zeros((32, 32, 3), np.uint8)
IA, NF, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED


def png(arr, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def raw(dtype: str, shape: list[int], data: bytes) -> pb.Image:
    return pb.Image(tensor=pb.Tensor(dtype=dtype, shape=shape, data=data))


nan_img = np.full((8, 8, 3), np.nan, np.float32)
CASES = [
    ("garbage bytes", "tiny-nemu", pb.Image(encoded=b"\x00garbage\xff" * 10), None, IA, "could not be decoded"),
    ("truncated png", "tiny-nemu", pb.Image(encoded=png(OK_IMG)[:40]), None, IA, "could not be decoded"),
    ("empty image", "tiny-nemu", pb.Image(), None, IA, "image is empty"),
    ("empty bytes", "tiny-nemu", pb.Image(encoded=b""), None, IA, "empty"),
    ("bad dtype", "tiny-nemu", raw("complex64", [2, 2], b"\0" * 32), None, IA, "dtype"),
    ("length mismatch", "tiny-nemu", raw("uint8", [4, 4, 3], b"\0" * 47), None, IA, "needs 48"),
    ("zero dimension", "tiny-nemu", raw("uint8", [0, 4, 3], b""), None, IA, "zero"),
    ("wrong rank", "tiny-nemu", raw("uint8", [2, 4, 4, 3], b"\0" * 96), None, IA, "[H, W] or [H, W, C]"),
    ("wrong channels", "tiny-nemu", raw("uint8", [4, 4, 5], b"\0" * 80), None, IA, "5 channels"),
    ("nan", "tiny-nemu", pb.Image(tensor=to_tensor(nan_img)), None, IA, "NaN"),
    ("inf", "tiny-nemu", pb.Image(tensor=to_tensor(np.full((8, 8), np.inf, np.float32))), None, IA, "NaN or Inf"),
    (
        "float out of range",
        "tiny-nemu",
        pb.Image(tensor=to_tensor(np.full((8, 8), 255.0, np.float32))),
        None,
        IA,
        "[0, 1]",
    ),
    ("giant dimensions", "tiny-nemu", raw("uint8", [5000, 1], b"\0" * 5000), None, RE, "4096"),
    ("unknown model", "no-such-model", pb.Image(encoded=png(OK_IMG)), None, NF, "available"),
    ("unknown version", "tiny-nemu:7", pb.Image(encoded=png(OK_IMG)), None, NF, "versions: 1"),
    ("empty model", "", pb.Image(encoded=png(OK_IMG)), None, IA, "model is empty"),
    ("unknown method", "tiny-nemu", pb.Image(encoded=png(OK_IMG)), pb.ExplainOptions(method="lime"), IA, "saliency"),
    (
        "target on nem-u",
        "tiny-nemu",
        pb.Image(encoded=png(OK_IMG)),
        pb.ExplainOptions(target_label=1),
        IA,
        "target_label",
    ),
    ("target out of range", "tiny-nemt", pb.Image(encoded=png(OK_IMG)), pb.ExplainOptions(target_label=3), IA, "0..2"),
    (
        "negative target",
        "tiny-nemt",
        pb.Image(encoded=png(OK_IMG)),
        pb.ExplainOptions(target_label=-2),
        IA,
        "out of range",
    ),
    ("encoder without method", "tiny-encoder", pb.Image(encoded=png(OK_IMG)), None, IA, "not a masking network"),
]


@pytest.mark.parametrize("name,model,image,options,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_explain_input(stub, name, model, image, options, code, fragment):
    req = pb.ExplainRequest(model=model, image=image)
    if options is not None:
        req.options.CopyFrom(options)
    with pytest.raises(grpc.RpcError) as e:
        stub.Explain(req, timeout=30)
    assert e.value.code() == code, (e.value.code(), e.value.details())
    assert fragment in e.value.details(), e.value.details()


def test_png_bomb_header_is_rejected_before_decoding(stub):
    # A valid PNG header claiming 30000 x 30000 pixels: rejected from the header, never decoded.
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    import zlib

    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    with pytest.raises(grpc.RpcError) as e:
        stub.Explain(pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=data)), timeout=30)
    assert e.value.code() == RE


def test_oversize_message_is_resource_exhausted(stub):
    big = pb.Image(encoded=b"\0" * (5 * 1024 * 1024))  # the test server allows 4 MB messages
    with pytest.raises(grpc.RpcError) as e:
        stub.Explain(pb.ExplainRequest(model="tiny-nemu", image=big), timeout=30)
    assert e.value.code() == RE


def test_expired_deadline_is_deadline_exceeded(stub):
    img = pb.Image(encoded=png(np.zeros((64, 64, 3), np.uint8)))
    with pytest.raises(grpc.RpcError) as e:
        stub.Explain(pb.ExplainRequest(model="slow-nemu", image=img), timeout=0.001)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.slow
def test_client_cancellation_is_counted_and_server_keeps_serving(server, stub):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def cancelled_count() -> float:
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        for fam in text_string_to_metric_families(text):
            if fam.name == "xaiserve_requests":
                return sum(
                    s.value
                    for s in fam.samples
                    if s.name == "xaiserve_requests_total"
                    and s.labels["rpc"] == "Explain"
                    and s.labels["code"] == "CANCELLED"
                )
        return 0.0

    before = cancelled_count()
    img = pb.Image(encoded=png(np.zeros((64, 64, 3), np.uint8)))
    # more calls than two micro-batches (max_batch 16), so some are still queued on the server when
    # cancelled: those are dropped before the model runs and counted as CANCELLED
    futs = [stub.Explain.future(pb.ExplainRequest(model="slow-nemu", image=img), timeout=30) for _ in range(48)]
    time.sleep(0.1)
    cancelled = [f for f in futs if f.cancel()]
    assert cancelled, "48 queued calls of a 50 ms model cannot all be finished after 0.1 s"
    for f in cancelled:
        with pytest.raises(grpc.FutureCancelledError):
            f.result()
    deadline = time.time() + 10
    while cancelled_count() < before + 1 and time.time() < deadline:
        time.sleep(0.1)
    assert cancelled_count() >= before + 1
    ok = stub.Explain(pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=png(OK_IMG))), timeout=30)
    assert ok.model == "tiny-nemu:1"


def test_server_still_serves_after_all_bad_inputs(stub):
    r = stub.Explain(pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=png(OK_IMG))), timeout=30)
    assert r.mask.shape == [32, 32]
