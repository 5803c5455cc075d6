"""The Open Inference Protocol v2 over HTTP (/v2 on the HTTP port), spoken by the real tritonclient.http.

The REST routes call the gRPC OIP servicer's own methods, so every answer is compared with the gRPC
protocol's (tritonclient.grpc) or explain.v1's for the same input; bad input gets the HTTP status of
the gRPC code (service.errors.http_status_of) and the same message, in the protocol's {"error"}.
"""

from __future__ import annotations

import base64
import http.client
import json
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from tests.conftest import DEFAULT_STORE
from tests.serverutil import running_server
from tests.test_oip import MODELS, png
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.tensors import from_tensor, to_tensor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zoo():
    with running_server(DEFAULT_STORE, job_workers=0, max_delay_ms=1.0) as srv:
        yield srv


def host(srv) -> str:
    return srv.metrics_url.split("//", 1)[1].split("/", 1)[0]


@pytest.fixture(scope="module")
def client(zoo):
    c = th.InferenceServerClient(host(zoo))
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc_client(zoo):
    c = tg.InferenceServerClient(zoo.address)
    yield c
    c.close()


def bytes_input(*images: bytes) -> th.InferInput:
    i = th.InferInput("image", [len(images)], "BYTES")
    i.set_data_from_numpy(np.array(images, dtype=object))
    return i


def tensor_input(name: str, a: np.ndarray, datatype: str = "FP32", binary: bool = True) -> th.InferInput:
    i = th.InferInput(name, list(a.shape), datatype)
    i.set_data_from_numpy(a, binary_data=binary)
    return i


def outputs(r) -> dict[str, np.ndarray]:
    return {o["name"]: r.as_numpy(o["name"]) for o in r.get_response()["outputs"]}


def refused(fn) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as ei:
        fn()
    return ei.value.status(), ei.value.message()


def post(srv, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(f"http://{host(srv)}{path}", data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


# ------------------------------------------------------------------------------- every model
def test_health_metadata_config_and_repository(client):
    assert client.is_server_live() and client.is_server_ready()
    md = client.get_server_metadata()
    assert md["name"] == "xaiserve" and "model_configuration" in md["extensions"]
    index = {m["name"]: m["state"] for m in client.get_model_repository_index()}
    assert set(MODELS) <= set(index) and set(index.values()) == {"READY"}
    cfg = client.get_model_config("scenes-nemu")
    assert cfg["name"] == "scenes-nemu" and cfg["input"][0]["dims"] == [3, 64, 64]  # numbers, as Triton's JSON
    assert cfg["parameters"]["kind"]["string_value"] == "nem_u"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tritonclient_http_calls_every_default_model(client, grpc_client, name):
    e = MODELS[name]
    s = e.input
    assert client.is_model_ready(name)
    md = client.get_model_metadata(name)
    gmd = grpc_client.get_model_metadata(name, as_json=True)
    assert md["name"] == name and md["versions"] == gmd["versions"] and md["platform"] == gmd["platform"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in md["inputs"]] == [
        (t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in gmd["inputs"]
    ]
    rng = np.random.default_rng(1)
    if e.kind == "denoiser":
        x = rng.standard_normal((2, 1, s.height, s.width)).astype(np.float32)
        got = outputs(client.infer(name, [tensor_input("particles", x)]))
        ref = grpc_client.infer(name, [_grpc_tensor("particles", x)]).as_numpy("denoised")
        np.testing.assert_array_equal(got["denoised"], ref)
        return
    data, _ = png(50, 38, channels=s.channels)
    method = {} if e.kind in ("nem_u", "nemt") else {"method": "saliency"}
    got = outputs(client.infer(name, [bytes_input(data, data)], parameters=method))
    g = grpc_client.infer(name, [_grpc_bytes(data, data)], parameters=method)
    assert got["mask"].shape == (2, 1, 50, 38) and got["mask"].dtype == np.float32
    np.testing.assert_array_equal(got["mask"], g.as_numpy("mask"))
    np.testing.assert_array_equal(got["output"], g.as_numpy("output"))
    x = rng.standard_normal((3, s.channels, s.height, s.width)).astype(np.float32)
    got = outputs(client.infer(name, [tensor_input("image", x)], parameters=method))
    assert got["mask"].shape == (3, 1, s.height, s.width)
    if e.kind in ("nemt", "classifier"):
        assert got["label"].shape == (3,) and got["label"].dtype == np.int64


def _grpc_bytes(*images: bytes) -> tg.InferInput:
    i = tg.InferInput("image", [len(images)], "BYTES")
    i.set_data_from_numpy(np.array(images, dtype=object))
    return i


def _grpc_tensor(name: str, a: np.ndarray) -> tg.InferInput:
    i = tg.InferInput(name, list(a.shape), "FP32")
    i.set_data_from_numpy(a)
    return i


# ---------------------------------------------------------------- one code path: equal answers
def test_masks_equal_explain_in_binary_and_in_json(zoo, client):
    data, arr = png(64, 64, seed=3)
    ref = zoo.stub().Explain(
        pb.ExplainRequest(
            model="scenes-nemu", image=pb.Image(encoded=data), options=pb.ExplainOptions(return_output=True)
        )
    )
    mask = from_tensor(ref.mask)
    got = outputs(client.infer("scenes-nemu", [bytes_input(data)]))
    assert np.array_equal(got["mask"][0, 0], mask)
    # JSON outputs (binary_data false) are the same numbers
    js = client.infer("scenes-nemu", [bytes_input(data)], outputs=[th.InferRequestedOutput("mask", binary_data=False)])
    assert "data" in js.get_response()["outputs"][0]
    assert np.array_equal(js.as_numpy("mask")[0, 0], mask)
    # a raw tensor in the model's layout, sent as JSON numbers, equals the binary one
    from xaiserve.service.images import to_model_input

    x = to_model_input(arr.astype(np.float32) / 255.0, MODELS["scenes-nemu"].input)[None]
    a = outputs(client.infer("scenes-nemu", [tensor_input("image", x, binary=False)]))
    b = outputs(client.infer("scenes-nemu", [tensor_input("image", x)]))
    np.testing.assert_array_equal(a["mask"], b["mask"])
    np.testing.assert_allclose(a["mask"][0, 0], mask, atol=1e-5)


def test_json_bytes_are_base64_and_a_gzip_body_is_accepted(zoo, client):
    data, _ = png(32, 32, seed=7)
    doc = {
        "id": "r1",
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(data).decode()]}],
        "parameters": {"fidelity": True},
    }
    status, answer, headers = post(zoo, "/v2/models/scenes-nemu/infer", json.dumps(doc).encode())
    assert status == 200 and answer["id"] == "r1", answer
    mask = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(answer["outputs"][0]["shape"])
    ref = outputs(client.infer("scenes-nemu", [bytes_input(data)]))["mask"]
    np.testing.assert_array_equal(mask, ref)
    gz = client.infer("scenes-nemu", [bytes_input(data)], request_compression_algorithm="gzip")
    np.testing.assert_array_equal(gz.as_numpy("mask"), ref)
    doc["inputs"][0]["data"] = ["not base64 at all!"]
    status, answer, _ = post(zoo, "/v2/models/scenes-nemu/infer", json.dumps(doc).encode())
    assert status == 400 and "is not base64" in answer["error"] and answer["code"] == "INVALID_ARGUMENT"


def test_classifier_targets_and_the_denoiser_equal_the_grpc_protocol(zoo, client, grpc_client):
    data, _ = png(64, 64, seed=4)
    params = {"method": "gradcam", "target_label": 3}
    got = outputs(client.infer("scenes-classifier", [bytes_input(data)], parameters=params))
    ref = grpc_client.infer("scenes-classifier", [_grpc_bytes(data)], parameters=params)
    assert got["label"].tolist() == [3]
    np.testing.assert_array_equal(got["mask"], ref.as_numpy("mask"))
    two = outputs(
        client.infer(
            "lesions-nemt", [bytes_input(data, data), tensor_input("target", np.array([1, 2], np.int64), "INT64")]
        )
    )
    assert two["label"].tolist() == [1, 2]
    x = np.random.default_rng(5).standard_normal((2, 1, 64, 64)).astype(np.float32)
    den = zoo.stub().Denoise(pb.DenoiseRequest(model="cryoem-spiral", tensor=to_tensor(x[:, 0])))
    got = outputs(client.infer("cryoem-spiral", [tensor_input("particles", x, binary=False)]))
    np.testing.assert_allclose(got["denoised"][:, 0], from_tensor(den.denoised), atol=1e-6)


# ------------------------------------------------------------------------------------ bad input
def test_unknown_model_version_route_and_method(zoo, client):
    status, msg = refused(lambda: client.infer("no-such-model", [bytes_input(b"x")]))
    assert status == "404" and "no-such-model" in msg and "scenes-nemu" in msg
    status, msg = refused(lambda: client.get_model_metadata("scenes-nemu", model_version="99"))
    assert status == "404" and "version" in msg
    assert not client.is_model_ready("no-such-model")
    status, answer, _ = post(zoo, "/v2/models/scenes-nemu/explain", b"{}")
    assert status == 404 and "/v2/models/NAME" in answer["error"]
    req = urllib.request.Request(f"http://{host(zoo)}/v2/models/scenes-nemu/infer")
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=10)
    assert ei.value.code == 405 and "use POST" in json.loads(ei.value.read())["error"]


@pytest.mark.parametrize(
    "inputs,params,needle",
    [
        (lambda: [tensor_input("image", np.zeros((1, 3, 64, 64), np.int32), "INT32")], {}, "takes FP32 [B, 3, 64, 64]"),
        (lambda: [tensor_input("image", np.zeros((1, 3, 32, 32), np.float32))], {}, "takes FP32 [B, 3, 64, 64]"),
        (lambda: [tensor_input("image", np.full((1, 3, 64, 64), np.nan, np.float32), binary=False)], {}, "NaN"),
        (lambda: [bytes_input(b"\x89PNG\r\n\x1a\n not really")], {}, "could not be decoded"),
        (lambda: [bytes_input(png(64, 64)[0], png(32, 32)[0])], {}, "images of one size"),
        (lambda: [tensor_input("target", np.zeros((1,), np.int64), "INT64")], {}, "needs input 'image'"),
        (lambda: [bytes_input(png(8, 8)[0]), tensor_input("extra", np.zeros((1,), np.float32))], {}, "has no input"),
        (lambda: [bytes_input(png(8, 8)[0])], {"colour": "red"}, "parameter 'colour' is unknown; known: method"),
        (lambda: [bytes_input(png(8, 8)[0])], {"method": "astrology"}, "is unknown; known:"),
        (lambda: [bytes_input(png(8, 8)[0])], {"fidelity": "yes"}, "fidelity must be a bool"),
        (lambda: [bytes_input(png(8, 8)[0])], {"target_label": 3}, "classifiers and NEMt"),
        (lambda: [tensor_input("image", np.zeros((17, 3, 64, 64), np.float32))], {}, "at most 16 per request"),
    ],
)
def test_bad_input_gets_400_with_the_grpc_protocols_message(client, grpc_client, inputs, params, needle):
    status, msg = refused(lambda: client.infer("scenes-nemu", inputs(), parameters=params))
    assert status == "400", msg
    assert needle in msg, msg
    assert len(msg) < 1200
    assert outputs(client.infer("scenes-nemu", [bytes_input(png(8, 8)[0])]))["mask"].shape == (1, 1, 8, 8)


@pytest.mark.parametrize(
    "doc,needle",
    [
        ("not json", "is not JSON"),
        ('["a list"]', "not an object"),
        ('{"inputs": [], "colour": 1}', "field 'colour'"),
        ('{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]}', "has no data"),
        (
            '{"inputs": [{"name": "image", "shape": [1, 3, 64, 64], "datatype": "FP32", "data": [1, 2]}]}',
            "has 2 values",
        ),
        ('{"inputs": [{"name": "image", "shape": [2], "datatype": "FP32", "data": [[1], [2, 3]]}]}', "ragged"),
        ('{"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": ["a"]}]}', "must be numbers"),
        ('{"inputs": [{"name": "t", "shape": [1], "datatype": "INT8", "data": [300]}]}', "outside INT8's range"),
        (
            '{"inputs": [{"name": "image", "shape": [1], "datatype": "FP8", "data": [1]}]}',
            "is not one of the protocol's",
        ),
        ('{"inputs": [{"name": "image", "shape": [-1], "datatype": "FP32", "data": [1]}]}', "none negative"),
        ('{"inputs": [], "parameters": {"method": [1]}}', "is a JSON list"),
    ],
)
def test_malformed_json_bodies_get_400(zoo, doc, needle):
    status, answer, _ = post(zoo, "/v2/models/scenes-nemu/infer", doc.encode())
    assert status == 400 and needle in answer["error"], answer


def test_binary_sizes_that_do_not_add_up_get_400(zoo):
    head = json.dumps(
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 100}}]}
    ).encode()
    status, answer, _ = post(
        zoo, "/v2/models/scenes-nemu/infer", head + b"\0" * 10, {"Inference-Header-Content-Length": str(len(head))}
    )
    assert status == 400 and "runs past" in answer["error"]
    status, answer, _ = post(
        zoo, "/v2/models/scenes-nemu/infer", head + b"\0" * 120, {"Inference-Header-Content-Length": str(len(head))}
    )
    assert status == 400 and "20 bytes after" in answer["error"]


# -------------------------------------------------------------- metrics, connections, auth, admission
def test_requests_are_counted_under_the_grpc_rpc_and_the_connection_is_kept(zoo, client):
    client.infer("scenes-nemu", [bytes_input(png(8, 8)[0])])
    text = urllib.request.urlopen(zoo.metrics_url, timeout=10).read().decode()
    assert 'xaiserve_requests_total{code="OK",model="scenes-nemu:1",rpc="ModelInfer"}' in text
    conn = http.client.HTTPConnection(host(zoo), timeout=10)
    try:
        conn.request("GET", "/v2/health/ready")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read()) == {"ready": True}
        sock = conn.sock
        conn.request("POST", "/v2/models/nope/infer", body=b'{"inputs": []}')
        r = conn.getresponse()
        assert r.status == 404 and r.read()
        conn.request("GET", "/v2/models/scenes-nemu/ready")
        r = conn.getresponse()
        assert r.status == 200 and r.read() and conn.sock is sock  # one connection for the three
    finally:
        conn.close()


def test_tokens_guard_the_rest_routes_as_the_grpc_methods(tiny_store, tmp_path):
    token = "oip-rest-token-0123456789abcdef"
    other = "explain-only-token-0123456789abc"
    tokens = tmp_path / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "tc": {"token": token, "methods": ["inference.GRPCInferenceService/*"]},
                "ex": {"token": other, "methods": ["explain.v1.Explainer/*"]},
            }
        )
    )
    with running_server(tiny_store, tokens_file=str(tokens), job_workers=0) as srv:
        c = th.InferenceServerClient(host(srv))
        try:
            status, msg = refused(lambda: c.get_server_metadata())
            assert status == "401" and "bearer token" in msg
            assert not c.is_server_live()
            assert c.is_server_live(headers={"Authorization": f"Bearer {token}"})
            status, _ = refused(lambda: c.get_server_metadata(headers={"Authorization": f"Bearer {other}"}))
            assert status == "403"
        finally:
            c.close()


def test_rest_disabled_by_oip_rest_false(tiny_store):
    with running_server(tiny_store, job_workers=0, oip_rest=False) as srv:
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(f"http://{host(srv)}/v2/health/live", timeout=10)
        assert ei.value.code == 404


def test_admission_refuses_infer_with_429_when_the_server_is_full(zoo, client):
    fast = zoo.running.fast

    async def fill():
        held = [fast.admission.slot("") for _ in range(fast.admission.limit - fast.admission.inflight)]
        for cm in held:
            cm.__enter__()
        return held

    async def release(held):
        for cm in held:
            cm.__exit__(None, None, None)

    held = zoo.call_in_loop(fill())
    try:
        status, msg = refused(lambda: client.infer("scenes-nemu", [bytes_input(png(8, 8)[0])]))
    finally:
        zoo.call_in_loop(release(held))
    assert status == "429" and "max_inflight" in msg
    assert outputs(client.infer("scenes-nemu", [bytes_input(png(8, 8)[0])]))["mask"].shape == (1, 1, 8, 8)
