"""Happy paths of the fast path over a real gRPC channel to the real server."""

from __future__ import annotations

import io

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from tests.tiny_models import MEAN, STD
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.images import InputSpec, to_model_input
from xaiserve.service.tensors import from_tensor, to_tensor


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def rng_image(h=48, w=40, c=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)


def reference(store, name, img, extra=None):
    sess = ort.InferenceSession(str(store / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = to_model_input(img.astype(np.float32) / 255.0, InputSpec(32, 32, 3, tuple(MEAN), tuple(STD)))[None]
    feeds = {"image": x, **(extra or {})}
    return x, dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_explain_nem_u_returns_mask_at_input_resolution_and_output(stub, tiny_store):
    img = rng_image(48, 40)
    r = stub.Explain(
        pb.ExplainRequest(
            model="tiny-nemu",
            image=pb.Image(encoded=png(img)),
            options=pb.ExplainOptions(return_output=True, fidelity=True, return_png=True),
        ),
        timeout=30,
    )
    assert r.model == "tiny-nemu:1"
    mask = from_tensor(r.mask)
    assert mask.shape == (48, 40) and mask.dtype == np.float32
    assert 0.0 <= mask.min() and mask.max() <= 1.0
    x, ref = reference(tiny_store, "tiny-nemu", img)
    np.testing.assert_allclose(from_tensor(r.output), ref["output"][0], atol=1e-5)
    # the fidelity score is cos(Phi(x), Phi(x*m)) computed with the frozen encoder, m the min-max
    # normalised mask (the evaluation's definition, handlers/fidelity.py)
    enc = ort.InferenceSession(str(tiny_store / "tiny-encoder/1/model.onnx"), providers=["CPUExecutionProvider"])
    m = ref["mask"]
    m = (m - m.min()) / (m.max() - m.min())
    phi_xm = enc.run(None, {"image": (x * m).astype(np.float32)})[0][0]
    phi_x = ref["output"][0]
    cos = float(phi_x @ phi_xm / np.linalg.norm(phi_x) / np.linalg.norm(phi_xm))
    assert r.fidelity == pytest.approx(cos, abs=1e-4)
    assert Image.open(io.BytesIO(r.mask_png)).size == (40, 48)
    assert Image.open(io.BytesIO(r.overlay_png)).mode == "RGB"
    assert r.timing.total_ms > 0 and r.timing.batch_size >= 1


def test_explain_accepts_raw_tensors_uint8_float_and_gray(stub):
    img = rng_image(32, 32)
    a = stub.Explain(pb.ExplainRequest(model="tiny-nemu", image=pb.Image(tensor=to_tensor(img))), timeout=30)
    b = stub.Explain(
        pb.ExplainRequest(model="tiny-nemu", image=pb.Image(tensor=to_tensor(img.astype(np.float32) / 255))), timeout=30
    )
    c = stub.Explain(pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=png(img))), timeout=30)
    np.testing.assert_allclose(from_tensor(a.mask), from_tensor(c.mask), atol=1e-5)
    np.testing.assert_allclose(from_tensor(a.mask), from_tensor(b.mask), atol=1e-5)
    gray = stub.Explain(
        pb.ExplainRequest(model="tiny-nemu", image=pb.Image(tensor=to_tensor(img[:, :, 0]))), timeout=30
    )
    assert from_tensor(gray.mask).shape == (32, 32)


def test_explain_nemt_default_target_is_argmax_and_requested_label_is_used(stub, tiny_store):
    img = rng_image(32, 32, seed=3)
    r = stub.Explain(
        pb.ExplainRequest(
            model="tiny-nemt", image=pb.Image(encoded=png(img)), options=pb.ExplainOptions(return_output=True)
        ),
        timeout=30,
    )
    _, ref = reference(tiny_store, "tiny-nemt", img, {"target": np.array([-1], np.int64)})
    assert r.target_label == int(ref["output"][0].argmax())
    other = (r.target_label + 1) % 3
    r2 = stub.Explain(
        pb.ExplainRequest(
            model="tiny-nemt:1", image=pb.Image(encoded=png(img)), options=pb.ExplainOptions(target_label=other)
        ),
        timeout=30,
    )
    assert r2.target_label == other
    _, ref2 = reference(tiny_store, "tiny-nemt", img, {"target": np.array([other], np.int64)})
    np.testing.assert_allclose(from_tensor(r2.mask), ref2["mask"][0, 0], atol=1e-5)
    assert not np.allclose(from_tensor(r.mask), from_tensor(r2.mask))


def test_concurrent_requests_share_a_batch(server):
    stub = server.stub()
    img = png(rng_image(32, 32))
    futs = [
        stub.Explain.future(pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=img)), timeout=30)
        for _ in range(24)
    ]
    sizes = [f.result().timing.batch_size for f in futs]
    assert max(sizes) > 1, f"24 concurrent calls never shared a micro-batch: {sizes}"


def test_list_models_health_and_reflection(server, stub):
    ms = stub.ListModels(pb.ListModelsRequest()).models
    names = {m.name: m for m in ms}
    assert {"tiny-nemu", "tiny-nemt", "tiny-encoder", "tiny-classifier"} <= set(names)
    assert names["tiny-nemu"].explains == "tiny-encoder:1" and names["tiny-nemu"].kind == "nem_u"
    assert names["tiny-classifier"].labels == ["a", "b", "c"]
    assert [m.kind for m in stub.ListModels(pb.ListModelsRequest(kind="nemt")).models] == ["nemt"]
    ch = server.channel()
    h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="explain.v1.Explainer"))
    assert h.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(iter(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
    services = {s.name for s in resp.list_services_response.service}
    assert "explain.v1.Explainer" in services and "grpc.health.v1.Health" in services


def test_list_models_rejects_unknown_kind(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.ListModels(pb.ListModelsRequest(kind="transformer"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nem_u" in e.value.details()
