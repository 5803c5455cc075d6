"""The methods table is the one source: ListModels advertises exactly what the server accepts.

For every default model and every method in xaiserve.methods.METHODS, over a real gRPC channel:
an advertised method answers OK (jobs run to SUCCEEDED), a method that is not advertised is refused
with INVALID_ARGUMENT (wrong kind) or FAILED_PRECONDITION (the store lacks the model form it needs).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from tests.conftest import DEFAULT_STORE
from tests.serverutil import running_server
from xaiserve.methods import GRADIENT_METHODS, KINDS, METHODS, applies, supported_methods
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.tensors import to_tensor

pytestmark = pytest.mark.slow

REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


@pytest.fixture(scope="module")
def zoo():
    with running_server(DEFAULT_STORE, job_workers=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(zoo):
    return zoo.stub()


@pytest.fixture(scope="module")
def models(stub):
    return {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}


def _image(m: pb.ModelInfo) -> pb.Image:
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 255, (m.input.height + 7, m.input.width + 3, m.input.channels), dtype=np.uint8)
    return pb.Image(tensor=to_tensor(hwc if m.input.channels > 1 else hwc[..., 0]))


def _dataset(name: str):
    if name.startswith("ct-phantoms"):
        from xaiserve.training.datasets.phantoms import phantoms

        return phantoms().split("test")
    if name.startswith("lesions"):
        from xaiserve.training.datasets.lesions import lesions

        return lesions().split("test")
    from xaiserve.training.datasets.scenes import scenes

    return scenes().split("test")


def _chw(chw_u8: np.ndarray) -> pb.Image:
    return pb.Image(tensor=to_tensor(np.ascontiguousarray(chw_u8.transpose(1, 2, 0))))


def _call(stub, m: pb.ModelInfo, method: str):
    """Call `method` on model `m` the way a client would; returns the final Job for jobs."""
    spec = METHODS[method]
    if spec.rpc == "Explain":
        return stub.Explain(
            pb.ExplainRequest(model=m.name, image=_image(m), options=pb.ExplainOptions(method=method)), timeout=120
        )
    if spec.rpc == "Denoise":
        side = m.input.height
        parts = np.random.default_rng(1).normal(size=(2, side, side)).astype(np.float32)
        return stub.Denoise(pb.DenoiseRequest(model=m.name, tensor=to_tensor(parts)), timeout=120)
    req = pb.JobRequest(method=method, model=m.name, image=_image(m))
    if method == "relax":
        req.relax.CopyFrom(pb.RelaxParams(num_masks=64, batch_size=32))
    elif method == "ablation_path":
        # a real image and, as the baseline, one of another class: a random image may have no blur
        # that changes its class, which the method rightly refuses
        ds = _dataset(m.name)
        a, b = (int(np.flatnonzero(ds.labels == c)[0]) for c in np.unique(ds.labels)[:2])
        req.image.CopyFrom(_chw(ds.images[a]))
        req.ablation.CopyFrom(
            pb.AblationParams(num_slices=4, max_iterations=2, mask_size=16, baseline=_chw(ds.images[b]))
        )
    elif method in ("sift_ablation", "sift_rise"):
        # a real image: uniform noise has hundreds of SIFT keypoints; small settings keep it to seconds
        req.image.CopyFrom(_chw(_dataset(m.name).images[0]))
        req.sift.CopyFrom(
            pb.SiftParams(num_slices=4, max_iterations=2)
            if method == "sift_ablation"
            else pb.SiftParams(num_masks=32, batch_size=32)
        )
    job = stub.SubmitJob(req, timeout=120)
    terminal = (pb.EVENT_SUCCEEDED, pb.EVENT_FAILED, pb.EVENT_CANCELLED, pb.EVENT_EXPIRED)
    for ev in stub.WatchJob(pb.JobRef(id=job.id), timeout=300):
        if ev.type in terminal:
            break
    return stub.GetJob(pb.JobRef(id=job.id), timeout=60)


def test_every_default_model_advertises_something(models):
    assert len(models) >= 8
    for m in models.values():
        assert m.methods, f"{m.name} advertises no method"
        assert set(m.methods) <= set(METHODS), f"{m.name} advertises methods outside the table: {m.methods}"


@pytest.mark.parametrize("method", list(METHODS))
def test_advertised_methods_answer_ok_and_the_others_are_refused(stub, models, method):
    for m in models.values():
        if method in m.methods:
            out = _call(stub, m, method)
            if METHODS[method].rpc == "SubmitJob":
                assert out.state == pb.SUCCEEDED, (m.name, method, pb.JobState.Name(out.state), out.error)
        else:
            with pytest.raises(grpc.RpcError) as e:
                _call(stub, m, method)
            assert e.value.code() in REFUSED, (m.name, method, e.value.code(), e.value.details())
            assert method in e.value.details() or m.name in e.value.details(), e.value.details()


def test_what_the_defaults_advertise(models):
    """Spot checks of the rule: gradient methods on a masking network explain its frozen model."""
    assert "gradcam" in models["scenes-simclr"].methods  # served before, not advertised before
    assert "label_free_saliency" in models["scenes-simclr"].methods
    assert "label_free_saliency" not in models["scenes-classifier"].methods
    assert {"nem_u", *[g for g in GRADIENT_METHODS if g != "label_free_saliency"], "relax"} <= set(
        models["scenes-nemu"].methods
    )
    assert (
        "ablation_path" in models["lesions-classifier"].methods and "relax" not in models["lesions-classifier"].methods
    )
    assert models["cryoem-spiral"].methods == ["denoise"]


def test_the_table_rule_on_forms():
    """An ONNX-only classifier gets no gradient method (only forward-only ones); one with a torch form gets them all."""
    assert supported_methods("classifier", {"onnx"}) == ["sift_rise"]
    assert set(supported_methods("classifier", {"torch"})) >= {"saliency", "gradcam", "ablation_path"}
    assert supported_methods("nemt", {"onnx"}, "classifier", {"onnx"}) == ["nemt", "sift_rise"]
    assert applies(METHODS["relax"], "nem_u", {"onnx"}, "encoder", {"onnx"})
    assert not applies(METHODS["relax"], "nem_u", {"onnx"}, "classifier", {"onnx", "torch"})
    for name, k in KINDS.items():
        assert not k.masking or k.explains, name


def test_saliency_library_and_table_agree():
    from xaiserve.handlers.saliency import METHOD_CLASSES, methods_for

    assert set(METHOD_CLASSES) == set(GRADIENT_METHODS)
    for kind in ("encoder", "classifier"):
        assert set(methods_for(kind)) == {n for n in GRADIENT_METHODS if kind in METHODS[n].kinds}
