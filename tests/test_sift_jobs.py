"""The "sift_ablation" and "sift_rise" jobs through the real server on the default store
(model_store/): ListModels advertises them where the methods table says, both run to SUCCEEDED on
the lesions classifier with sensible results at the request image's resolution, sift_rise also on
an encoder, bad input is INVALID_ARGUMENT at submit, and a running job can be cancelled."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest

from tests.conftest import DEFAULT_STORE
from tests.jobs_support import RecordingContext
from tests.serverutil import running_server
from xaiserve.errors import InvalidArgument
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.jobs.sift import SiftAblationJobMethod, SiftRiseJobMethod
from xaiserve.service.tensors import from_tensor, to_tensor

# the default zoo's server for the module, and jobs on it
pytestmark = pytest.mark.slow

TERMINAL = (pb.EVENT_SUCCEEDED, pb.EVENT_FAILED, pb.EVENT_CANCELLED, pb.EVENT_EXPIRED)


@pytest.fixture(scope="module")
def lesions():
    from xaiserve.training.datasets.lesions import Lesions, LesionsConfig

    return Lesions(LesionsConfig(sizes={"train": 1, "val": 1, "test": 4})).split("test")


@pytest.fixture(scope="module")
def srv():
    with running_server(DEFAULT_STORE, job_workers=1) as s:
        yield s


@pytest.fixture(scope="module")
def stub(srv):
    return srv.stub()


def _image(chw_u8: np.ndarray, size: tuple[int, int] | None = None) -> pb.Image:
    hwc = np.ascontiguousarray(chw_u8.transpose(1, 2, 0))
    if size is not None:  # another resolution than the model's: results must come back at it
        from PIL import Image as PILImage

        hwc = np.asarray(PILImage.fromarray(hwc).resize((size[1], size[0]), PILImage.BILINEAR))
    return pb.Image(tensor=to_tensor(hwc))


def _finish(stub, job_id: str) -> tuple[pb.Job, list[pb.JobEvent]]:
    events = []
    for ev in stub.WatchJob(pb.JobRef(id=job_id), timeout=300):
        events.append(ev)
        if ev.type in TERMINAL:
            break
    return stub.GetJob(pb.JobRef(id=job_id, include_result=True), timeout=60), events


def test_list_models_advertises_them_where_the_table_says(stub):
    models = {m.name: list(m.methods) for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert {"sift_ablation", "sift_rise"} <= set(models["lesions-classifier"])
    assert {"sift_ablation", "sift_rise"} <= set(models["scenes-classifier"])
    assert "sift_rise" in models["scenes-simclr"] and "sift_ablation" not in models["scenes-simclr"]
    assert not {"sift_ablation", "sift_rise"} & set(models["cryoem-spiral"])


@pytest.mark.slow
def test_sift_ablation_job_succeeds_with_the_path_and_heatmaps(stub, lesions):
    label = int(lesions.labels[1])
    req = pb.JobRequest(
        method="sift_ablation",
        model="lesions-classifier",
        image=_image(lesions.images[1], (80, 72)),
        sift=pb.SiftParams(num_slices=6, max_iterations=8, target_label=label, return_images=True),
    )
    job, events = _finish(stub, stub.SubmitJob(req, timeout=60).id)
    assert job.state == pb.SUCCEEDED, job.error
    progress = [e for e in events if e.type == pb.EVENT_PROGRESS]
    assert progress and all("saturation" in e.metrics for e in progress)
    r = job.result.sift
    K = len(r.keypoints)
    gains = from_tensor(r.gains)
    assert K >= 3 and gains.shape == (8, K)
    assert np.allclose(gains[0], 1) and np.allclose(gains[-1], 0) and (np.diff(gains, axis=0) <= 1e-6).all()
    f = np.asarray(r.target_probability)
    assert f.shape == (8,) and from_tensor(r.probabilities).shape == (8, 4)
    assert f[0] > 0.5 and f[0] > f[-1]  # the lesion is recognised at t = 0; the empty image is not it
    for name in ("heatmap_voronoi", "heatmap_bandpass"):
        h = from_tensor(getattr(r, name))
        assert h.shape == (80, 72) and 0 <= h.min() and h.max() <= 1  # the request image's resolution
    assert from_tensor(r.images).shape == (8, 64, 64, 3)  # what the classifier saw
    assert r.strip_png[:4] == b"\x89PNG" and r.heatmap_png[:4] == b"\x89PNG"
    assert r.reconstruction_error < 1e-4 and r.target_label == label and r.iterations == len(r.score_history)
    assert all(0 <= kp.row < 64 and 0 <= kp.col < 64 and kp.sigma > 0 for kp in r.keypoints)
    params = json.loads(job.result.parameters_json)
    assert params["num_keypoints"] == K and params["cells"]["eta"] == 4.0 and params["score"] == "contrastive"


@pytest.mark.slow
def test_sift_rise_job_succeeds_on_a_classifier_and_an_encoder(stub, lesions):
    for model in ("lesions-classifier", "scenes-simclr"):
        req = pb.JobRequest(
            method="sift_rise",
            model=model,
            image=_image(lesions.images[2]),
            sift=pb.SiftParams(num_masks=64, batch_size=32, eta=2.0),
        )
        job, _ = _finish(stub, stub.SubmitJob(req, timeout=60).id)
        assert job.state == pb.SUCCEEDED, (model, job.error)
        r = job.result.sift
        K = len(r.keypoints)
        imp, unc, se = (from_tensor(t) for t in (r.importance, r.uncertainty, r.std_error))
        assert imp.shape == unc.shape == se.shape == (K,) and (unc >= 0).all() and np.isfinite(imp).all()
        assert r.num_masks == 64 and from_tensor(r.heatmap_voronoi).shape == (64, 64)
        if model == "scenes-simclr":
            assert r.target_label == -1 and imp.max() <= 1.0 + 1e-6  # cosine similarities
        else:
            assert 0 <= imp.min() and imp.max() <= 1 and r.target_label >= 0  # probabilities
        assert json.loads(job.result.parameters_json)["backend"] == "onnxruntime"


@pytest.mark.parametrize(
    "method, model, params, word",
    [
        ("sift_ablation", "scenes-simclr", pb.SiftParams(), "classifier"),
        ("sift_ablation", "cryoem-spiral", pb.SiftParams(), "sift_ablation"),
        ("sift_ablation", "lesions-classifier", pb.SiftParams(eta=0.0), "eta"),
        ("sift_rise", "lesions-classifier", pb.SiftParams(eta=-2.0), "eta"),
        ("sift_ablation", "lesions-classifier", pb.SiftParams(num_masks=10), "sift_rise"),
        ("sift_rise", "lesions-classifier", pb.SiftParams(max_iterations=3), "sift_ablation"),
        ("sift_ablation", "lesions-classifier", pb.SiftParams(score="best"), "score"),
        ("sift_rise", "lesions-classifier", pb.SiftParams(target_label=7), "out of range"),
    ],
)
def test_bad_requests_are_invalid_argument_at_submit(stub, lesions, method, model, params, word):
    req = pb.JobRequest(method=method, model=model, image=_image(lesions.images[0]), sift=params)
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitJob(req, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert word in e.value.details()


def test_a_flat_image_is_invalid_argument_at_submit(stub):
    flat = pb.Image(tensor=to_tensor(np.full((64, 64, 3), 128, np.uint8)))
    for method in ("sift_ablation", "sift_rise"):
        with pytest.raises(grpc.RpcError) as e:
            stub.SubmitJob(pb.JobRequest(method=method, model="lesions-classifier", image=flat), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no SIFT keypoint" in e.value.details()


def test_keypoints_beyond_the_configured_limit_are_refused(srv, lesions):
    # the limit is a setting of the job method (service.jobs.methods.default_methods(settings=...))
    req = pb.JobRequest(method="sift_rise", model="lesions-classifier", image=_image(lesions.images[0]))
    with pytest.raises(InvalidArgument, match="limit of 3"):
        SiftRiseJobMethod(max_keypoints=3).validate(req, srv.running.registry)
    SiftRiseJobMethod().validate(req, srv.running.registry)  # the default limit passes the same image


def _registry():
    from xaiserve.service.registry import Registry, RegistryConfig

    return Registry(RegistryConfig(store=DEFAULT_STORE, warmup=False))


def test_a_running_job_is_cancelled(stub, lesions):
    req = pb.JobRequest(
        method="sift_ablation",
        model="lesions-classifier",
        image=_image(lesions.images[1]),
        sift=pb.SiftParams(num_slices=4, max_iterations=5000, stop_saturation=1.0),
    )
    job_id = stub.SubmitJob(req, timeout=60).id
    for ev in stub.WatchJob(pb.JobRef(id=job_id), timeout=300):
        if ev.type == pb.EVENT_PROGRESS:
            break
    stub.CancelJob(pb.JobRef(id=job_id), timeout=60)
    deadline = time.time() + 60
    while stub.GetJob(pb.JobRef(id=job_id), timeout=60).state not in (pb.CANCELLED, pb.FAILED, pb.SUCCEEDED):
        assert time.time() < deadline
        time.sleep(0.2)
    assert stub.GetJob(pb.JobRef(id=job_id), timeout=60).state == pb.CANCELLED


def test_cancellation_inside_the_method_stops_within_one_iteration(lesions):
    req = pb.JobRequest(
        method="sift_ablation",
        model="lesions-classifier",
        image=_image(lesions.images[1]),
        sift=pb.SiftParams(num_slices=4, max_iterations=200, stop_saturation=1.0),
    )
    from xaiserve.service.jobs.contract import JobCancelled

    ctx = RecordingContext(cancel_after=2)
    with pytest.raises(JobCancelled):
        SiftAblationJobMethod().run(req, _registry(), ctx)
    assert len(ctx.reports) == 2
