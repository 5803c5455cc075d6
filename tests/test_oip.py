"""The Open Inference Protocol v2 on xaiserve's gRPC port, spoken by the real tritonclient.

tritonclient (PyPI, the client Triton and KServe users have) calls every model of the default
store; answers are compared with explain.v1's Explain / Denoise for the same input (one code
path, so they are equal); bad input gets the protocol's status with a message saying what to send.
"""

from __future__ import annotations

import io
import json
import queue
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from google.protobuf import descriptor_pb2, descriptor_pool
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.conftest import DEFAULT_STORE
from tests.serverutil import running_server
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.proto.inference import grpc_predict_v2_pb2 as oip
from xaiserve.service.images import to_model_input
from xaiserve.service.registry import read_manifest
from xaiserve.service.tensors import from_tensor, to_tensor

# the default zoo's server for the module
pytestmark = pytest.mark.slow

MODELS = {e.name: e for e in read_manifest(DEFAULT_STORE)}


@pytest.fixture(scope="module")
def zoo():
    with running_server(DEFAULT_STORE, job_workers=1, max_delay_ms=1.0) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(zoo):
    c = tg.InferenceServerClient(zoo.address)
    yield c
    c.close()


def png(h: int, w: int, seed: int = 0, channels: int = 3) -> tuple[bytes, np.ndarray]:
    a = (np.random.default_rng(seed).random((h, w, channels)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0] if channels == 1 else a).save(buf, "PNG")
    return buf.getvalue(), a


def bytes_input(*images: bytes) -> tg.InferInput:
    i = tg.InferInput("image", [len(images)], "BYTES")
    i.set_data_from_numpy(np.array(images, dtype=object))
    return i


def tensor_input(name: str, a: np.ndarray, datatype: str = "FP32") -> tg.InferInput:
    i = tg.InferInput(name, list(a.shape), datatype)
    i.set_data_from_numpy(a)
    return i


def outputs(r) -> dict[str, np.ndarray]:
    return {o.name: r.as_numpy(o.name) for o in r.get_response().outputs}


def refused(fn) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as ei:
        fn()
    return ei.value.status(), ei.value.message()


# ------------------------------------------------------------------------------------- the proto
def test_every_message_matches_tritonclients_field_numbers_and_types():
    """The proto is written from the specification; tritonclient's own stubs are the reference."""
    import tritonclient.grpc.service_pb2  # noqa: F401  (registers Triton's package `inference`)

    theirs = descriptor_pool.Default()
    fp = descriptor_pb2.FileDescriptorProto()
    oip.DESCRIPTOR.CopyToProto(fp)

    def walk(msgs, prefix):
        for m in msgs:
            yield prefix + m.name, m
            yield from walk(m.nested_type, prefix + m.name + ".")

    checked = 0
    for full, m in walk(fp.message_type, "inference."):
        t = theirs.FindMessageTypeByName(full)
        for f in m.field:
            tf = t.fields_by_name[f.name]
            repeated = f.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
            assert (tf.number, tf.type, tf.is_repeated) == (f.number, f.type, repeated), (full, f.name)
            checked += 1
    assert checked > 60
    svc = theirs.FindServiceByName("inference.GRPCInferenceService")
    for m in oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        tm = svc.methods_by_name[m.name]
        assert (tm.input_type.full_name, tm.output_type.full_name) == (m.input_type.full_name, m.output_type.full_name)


# --------------------------------------------------------------------------------- every model
def test_server_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    md = client.get_server_metadata()
    assert md.name == "xaiserve" and "model_configuration" in md.extensions
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert set(MODELS) <= set(index) and set(index.values()) == {"READY"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tritonclient_calls_every_default_model(client, name):
    e = MODELS[name]
    s = e.input
    assert client.is_model_ready(name)
    md = client.get_model_metadata(name)
    assert md.name == name and e.version in md.versions
    cfg = client.get_model_config(name).config
    assert cfg.name == name and cfg.parameters["kind"].string_value == e.kind and cfg.max_batch_size >= 1
    rng = np.random.default_rng(1)
    if e.kind == "denoiser":
        x = rng.standard_normal((3, 1, s.height, s.width)).astype(np.float32)
        got = outputs(client.infer(name, [tensor_input("particles", x)]))
        assert got["denoised"].shape == x.shape and got["denoised"].dtype == np.float32
        assert np.isfinite(got["denoised"]).all()
        return
    assert [(i.name, i.datatype, list(i.shape)) for i in md.inputs][0] == (
        "image",
        "FP32",
        [-1, s.channels, s.height, s.width],
    )
    # encoded images (at another size than the model's) and raw tensors in the model's layout
    data, _ = png(50, 38, channels=s.channels)
    method = {} if e.kind in ("nem_u", "nemt") else {"method": "saliency"}
    got = outputs(client.infer(name, [bytes_input(data, data)], parameters=method))
    assert got["mask"].shape == (2, 1, 50, 38) and got["mask"].dtype == np.float32
    assert 0.0 <= got["mask"].min() and got["mask"].max() <= 1.0
    assert np.array_equal(got["mask"][0], got["mask"][1])
    dim = e.output_dim or len(e.labels)
    assert got["output"].shape[0] == 2 and (e.kind in ("nem_u",) or got["output"].shape[1] == dim)
    x = rng.standard_normal((4, s.channels, s.height, s.width)).astype(np.float32)
    got = outputs(client.infer(name, [tensor_input("image", x)], parameters=method))
    assert got["mask"].shape == (4, 1, s.height, s.width)
    if e.kind in ("nemt", "classifier"):
        assert got["label"].shape == (4,) and got["label"].dtype == np.int64
    # encoders and classifiers without a method: the model's forward pass
    if e.kind in ("encoder", "classifier"):
        plain = outputs(client.infer(name, [tensor_input("image", x)]))
        assert set(plain) == {"output"}
        np.testing.assert_allclose(plain["output"], got["output"], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- one code path: equal answers
def test_masks_equal_explain_for_bytes_and_for_raw_tensors(zoo, client):
    stub = zoo.stub()
    data, arr = png(64, 64, seed=3)
    ref = stub.Explain(
        pb.ExplainRequest(
            model="scenes-nemu",
            image=pb.Image(encoded=data),
            options=pb.ExplainOptions(return_output=True, fidelity=True),
        )
    )
    mask, out = from_tensor(ref.mask), from_tensor(ref.output)
    got = outputs(client.infer("scenes-nemu", [bytes_input(data)], parameters={"fidelity": True}))
    assert np.array_equal(got["mask"][0, 0], mask)
    assert np.array_equal(got["output"][0], out)
    assert got["fidelity"][0] == pytest.approx(ref.fidelity, abs=1e-6)
    # the same image, preprocessed by the client into the model's layout
    x = to_model_input(arr.astype(np.float32) / 255.0, MODELS["scenes-nemu"].input)[None]
    raw = outputs(client.infer("scenes-nemu", [tensor_input("image", x)], outputs=[tg.InferRequestedOutput("mask")]))
    assert set(raw) == {"mask"}
    np.testing.assert_allclose(raw["mask"][0, 0], mask, atol=1e-5)  # float rounding of the client's preprocessing


@pytest.mark.parametrize("size, rows", [(64, 1), (48, 3), (600, 1)])
def test_a_nemu_mask_costs_the_decode_pool_what_explain_costs(zoo, client, size, rows):
    """The common case (a NEM-U mask, no fidelity) runs explain.v1's path: one decode-pool task per
    image, the output tensors built on the thread that ran the model (a large image: the tasks
    Explain adds for it, no more), the same bytes. Counted by the pool itself."""
    fast = zoo.running.fast
    data, _ = png(size, size, seed=6)
    before = fast.cpu.submitted
    ref = zoo.stub().Explain(
        pb.ExplainRequest(
            model="scenes-nemu", image=pb.Image(encoded=data), options=pb.ExplainOptions(return_output=True)
        )
    )
    explain_tasks = fast.cpu.submitted - before
    if size * size <= 512 * 512:
        assert explain_tasks == 1
    # else also: parsing the 1 MB request, rendering the mask, serialising the 1.4 MB answer off the loop
    before = fast.cpu.submitted
    r = client.infer("scenes-nemu", [bytes_input(*[data] * rows)])
    assert fast.cpu.submitted - before == rows * explain_tasks
    got = outputs(r)
    assert set(got) == {"mask", "output"}
    assert got["mask"].shape == (rows, 1, size, size) and got["output"].shape[0] == rows
    for i in range(rows):
        assert np.array_equal(got["mask"][i, 0], from_tensor(ref.mask))
        assert np.array_equal(got["output"][i], from_tensor(ref.output))
    params = r.get_response().parameters
    assert params["method"].string_param == "nem_u" and params["batch_size"].int64_param >= 1
    # only the mask asked for: no output tensor, still one task per image
    before = fast.cpu.submitted
    only = outputs(client.infer("scenes-nemu", [bytes_input(data)], outputs=[tg.InferRequestedOutput("mask")]))
    assert fast.cpu.submitted - before == explain_tasks
    assert set(only) == {"mask"} and np.array_equal(only["mask"][0, 0], from_tensor(ref.mask))


def test_classifier_explanations_and_targets_equal_explain(zoo, client):
    stub = zoo.stub()
    data, _ = png(64, 64, seed=4)
    ref = stub.Explain(
        pb.ExplainRequest(
            model="scenes-classifier",
            image=pb.Image(encoded=data),
            options=pb.ExplainOptions(method="gradcam", target_label=3, return_output=True),
        )
    )
    got = outputs(
        client.infer("scenes-classifier", [bytes_input(data)], parameters={"method": "gradcam", "target_label": 3})
    )
    assert got["label"].tolist() == [3] == [ref.target_label]
    np.testing.assert_allclose(got["mask"][0, 0], from_tensor(ref.mask), atol=1e-6)
    # per-row targets as the NEMt graph's second input
    two = outputs(
        client.infer(
            "lesions-nemt", [bytes_input(data, data), tensor_input("target", np.array([1, 2], np.int64), "INT64")]
        )
    )
    assert two["label"].tolist() == [1, 2]
    assert not np.array_equal(two["mask"][0], two["mask"][1])


def test_denoiser_equals_denoise(zoo, client):
    x = np.random.default_rng(5).standard_normal((2, 1, 64, 64)).astype(np.float32)
    ref = zoo.stub().Denoise(pb.DenoiseRequest(model="cryoem-spiral", tensor=to_tensor(x[:, 0])))
    got = outputs(client.infer("cryoem-spiral", [tensor_input("particles", x)]))
    np.testing.assert_allclose(got["denoised"][:, 0], from_tensor(ref.denoised), atol=1e-6)


def test_stream_answers_in_order_and_a_bad_request_does_not_end_it(client):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        data, _ = png(64, 64, seed=6)
        client.async_stream_infer("scenes-nemu", [bytes_input(data)], request_id="1")
        client.async_stream_infer("scenes-nemu", [bytes_input(b"not an image")], request_id="2")
        client.async_stream_infer("scenes-nemu", [bytes_input(data)], request_id="3")
        got = [answers.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    assert got[0][1] is None and got[0][0].get_response().id == "1"
    assert got[1][0] is None and "INVALID_ARGUMENT" in got[1][1].message() and "decoded" in got[1][1].message()
    assert got[2][1] is None and np.array_equal(got[0][0].as_numpy("mask"), got[2][0].as_numpy("mask"))


# ------------------------------------------------------------------------------------ bad input
def test_unknown_model_and_version(client):
    status, msg = refused(lambda: client.infer("no-such-model", [bytes_input(b"x")]))
    assert status == "StatusCode.NOT_FOUND" and "no-such-model" in msg and "scenes-nemu" in msg
    status, msg = refused(lambda: client.get_model_metadata("scenes-nemu", model_version="99"))
    assert status == "StatusCode.NOT_FOUND" and "version" in msg and "1" in msg


@pytest.mark.parametrize(
    "inputs,params,needle",
    [
        (lambda: [tensor_input("image", np.zeros((1, 3, 64, 64), np.int32), "INT32")], {}, "takes FP32 [B, 3, 64, 64]"),
        (lambda: [tensor_input("image", np.zeros((1, 3, 32, 32), np.float32))], {}, "takes FP32 [B, 3, 64, 64]"),
        (lambda: [tensor_input("image", np.full((1, 3, 64, 64), np.nan, np.float32))], {}, "NaN"),
        (lambda: [bytes_input(b"\x89PNG\r\n\x1a\n not really")], {}, "could not be decoded"),
        (lambda: [bytes_input(png(64, 64)[0], png(32, 32)[0])], {}, "images of one size"),
        (lambda: [tensor_input("target", np.zeros((1,), np.int64), "INT64")], {}, "needs input 'image'"),
        (lambda: [bytes_input(png(8, 8)[0]), tensor_input("extra", np.zeros((1,), np.float32))], {}, "has no input"),
        (lambda: [bytes_input(png(8, 8)[0])], {"colour": "red"}, "parameter 'colour' is unknown; known: method"),
        (lambda: [bytes_input(png(8, 8)[0])], {"method": "astrology"}, "is unknown; known:"),
        (lambda: [bytes_input(png(8, 8)[0])], {"method": "relax"}, "submit it as a job"),
        (lambda: [bytes_input(png(8, 8)[0])], {"fidelity": "yes"}, "fidelity must be a bool"),
        (lambda: [bytes_input(png(8, 8)[0])], {"target_label": 3}, "classifiers and NEMt"),
        (lambda: [tensor_input("image", np.zeros((17, 3, 64, 64), np.float32))], {}, "at most 16 per request"),
    ],
)
def test_bad_input_gets_invalid_argument_with_an_actionable_message(client, inputs, params, needle):
    status, msg = refused(lambda: client.infer("scenes-nemu", inputs(), parameters=params))
    assert status == "StatusCode.INVALID_ARGUMENT", msg
    assert needle in msg, msg
    assert len(msg) < 1200
    # the server goes on answering
    assert outputs(client.infer("scenes-nemu", [bytes_input(png(8, 8)[0])]))["mask"].shape == (1, 1, 8, 8)


def test_outputs_that_need_an_explanation_or_do_not_exist(client):
    x = [bytes_input(png(8, 8)[0])]
    status, msg = refused(lambda: client.infer("scenes-simclr", x, outputs=[tg.InferRequestedOutput("mask")]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "set parameter method to one of" in msg and "saliency" in msg
    status, msg = refused(lambda: client.infer("scenes-simclr", x, outputs=[tg.InferRequestedOutput("logits")]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "no output 'logits'" in msg
    status, msg = refused(
        lambda: client.infer("scenes-classifier", x, outputs=[tg.InferRequestedOutput("output", class_count=3)])
    )
    assert status == "StatusCode.INVALID_ARGUMENT" and "classification" in msg
    status, msg = refused(
        lambda: client.infer("cryoem-spiral", [tensor_input("particles", np.zeros((1, 64, 64), np.float32))])
    )
    assert status == "StatusCode.INVALID_ARGUMENT" and "FP32 [B, 1, 64, 64]" in msg


def test_garbage_bytes_are_invalid_argument_not_unknown(zoo):
    with grpc.insecure_channel(zoo.address) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as ei:
            call(b"\xff\xff\xff\xff", timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inference.ModelInferRequest" in ei.value.details()


# ------------------------------------------------------------------- metrics, reflection, auth
def test_requests_are_counted_under_their_rpc_and_model(zoo, client):
    client.infer("scenes-nemu", [bytes_input(png(8, 8)[0])])
    text = urllib.request.urlopen(zoo.metrics_url, timeout=10).read().decode()
    assert 'xaiserve_requests_total{code="OK",model="scenes-nemu:1",rpc="ModelInfer"}' in text
    assert 'xaiserve_requests_total{code="INVALID_ARGUMENT",model="scenes-nemu:1",rpc="ModelInfer"}' in text


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_and_describes_the_inference_service(zoo, version):
    from grpc_reflection.v1alpha import reflection_pb2 as r

    with grpc.insecure_channel(zoo.address) as ch:
        call = ch.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=r.ServerReflectionRequest.SerializeToString,
            response_deserializer=r.ServerReflectionResponse.FromString,
        )
        listed, described = call(
            iter(
                [
                    r.ServerReflectionRequest(list_services=""),
                    r.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
                ]
            ),
            timeout=10,
        )
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "inference.GRPCInferenceService",
        "explain.v1.Explainer",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    fd = descriptor_pb2.FileDescriptorProto.FromString(described.file_descriptor_response.file_descriptor_proto[0])
    assert fd.package == "inference" and "ModelInfer" in [m.name for m in fd.service[0].method]


def test_tokens_guard_the_inference_service_too(tiny_store, tmp_path):
    token = "oip-test-token-0123456789abcdef"
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tc": {"token": token, "methods": ["inference.GRPCInferenceService/*"]}}))
    with running_server(tiny_store, tokens_file=str(tokens), job_workers=0) as srv:
        c = tg.InferenceServerClient(srv.address)
        try:
            status, _ = refused(lambda: c.is_server_live())
            assert status == "StatusCode.UNAUTHENTICATED"
            assert c.is_server_live(headers={"authorization": f"Bearer {token}"})
            # the same token may not call explain.v1 (its policy names only the inference service)
            with pytest.raises(grpc.RpcError) as ei:
                srv.stub().ListModels(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {token}"),))
            assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            c.close()


def test_admission_refuses_model_infer_when_the_server_is_full(zoo, client):
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
    assert status == "StatusCode.RESOURCE_EXHAUSTED" and "max_inflight" in msg
    assert outputs(client.infer("scenes-nemu", [bytes_input(png(8, 8)[0])]))["mask"].shape == (1, 1, 8, 8)
