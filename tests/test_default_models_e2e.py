"""The committed default model zoo, served by the real server over a real channel.

These are the models `xaiserve serve` serves out of the box; a failure here means a user on a
fresh clone gets a broken or useless service.
"""

from __future__ import annotations

import io
import subprocess
import sys

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.conftest import DEFAULT_STORE
from tests.serverutil import ROOT
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.tensors import from_tensor, to_tensor

# the default zoo's server, its datasets and every method on every model: ~30 s
pytestmark = pytest.mark.slow

DEFAULTS = {
    "scenes-simclr": "encoder",
    "scenes-classifier": "classifier",
    "lesions-classifier": "classifier",
    "scenes-nemu": "nem_u",
    "lesions-nemt": "nemt",
    "lesions-nemt-cond": "nemt",
    "cryoem-spiral": "denoiser",
    "cryoem-cartesian": "denoiser",
    "ct-phantoms-classifier": "classifier",
}


@pytest.fixture(scope="module")
def zstub(zoo):
    return zoo.stub()


@pytest.fixture(scope="module")
def scenes_test():
    from xaiserve.training.datasets.scenes import scenes

    return scenes().split("test")


@pytest.fixture(scope="module")
def lesions_test():
    from xaiserve.training.datasets.lesions import lesions

    return lesions().split("test")


def image_msg(chw_u8: np.ndarray) -> pb.Image:
    return pb.Image(tensor=to_tensor(np.ascontiguousarray(chw_u8.transpose(1, 2, 0))))


def test_the_store_holds_every_default_model_with_a_card(zstub):
    models = {m.name: m for m in zstub.ListModels(pb.ListModelsRequest()).models}
    for name, kind in DEFAULTS.items():
        assert name in models, f"default model {name} missing from model_store"
        assert models[name].kind == kind
        assert len(models[name].card) > 200, f"{name} has no real model card"
        assert models[name].loaded
    assert models["scenes-nemu"].explains.startswith("scenes-simclr")
    assert models["lesions-nemt"].explains.startswith("lesions-classifier")
    size = sum(p.stat().st_size for p in DEFAULT_STORE.rglob("*") if p.is_file())
    assert size < 50 * 1024 * 1024, f"model_store is {size / 2**20:.1f} MB"


def relevance_mass(mask: np.ndarray, gt: np.ndarray) -> float:
    m = (mask - mask.min()) / max(float(mask.max() - mask.min()), 1e-12)
    return float(m[gt].sum() / max(m.sum(), 1e-12))


def test_nem_u_masks_fall_on_the_objects(zstub, scenes_test):
    masses, areas, fids = [], [], []
    for i in range(16):
        r = zstub.Explain(
            pb.ExplainRequest(
                model="scenes-nemu",
                image=image_msg(scenes_test.images[i]),
                options=pb.ExplainOptions(fidelity=True, return_output=True),
            ),
            timeout=30,
        )
        mask = from_tensor(r.mask)
        assert mask.shape == scenes_test.masks[i].shape
        masses.append(relevance_mass(mask, scenes_test.masks[i]))
        areas.append(float(scenes_test.masks[i].mean()))
        fids.append(r.fidelity)
        assert from_tensor(r.output).ndim == 1
    # a mask that ignores the objects would put the ground truth's area fraction of its mass on them
    assert np.mean(masses) > np.mean(areas) + 0.1, (np.mean(masses), np.mean(areas))
    assert np.mean(fids) > 0.5


def test_nemt_explains_the_requested_label_and_the_conditional_model_every_label(zstub, lesions_test):
    x = image_msg(lesions_test.images[0])
    r = zstub.Explain(
        pb.ExplainRequest(model="lesions-nemt", image=x, options=pb.ExplainOptions(return_output=True)), timeout=30
    )
    assert r.target_label == int(from_tensor(r.output).argmax())
    n_labels = len(zstub.ListModels(pb.ListModelsRequest(kind="classifier")).models[0].labels)
    masks = []
    for t in range(n_labels):
        rc = zstub.Explain(
            pb.ExplainRequest(model="lesions-nemt-cond", image=x, options=pb.ExplainOptions(target_label=t)), timeout=30
        )
        assert rc.target_label == t
        masks.append(from_tensor(rc.mask))
    assert any(not np.allclose(masks[0], m, atol=1e-4) for m in masks[1:]), "the label must change the mask"
    # no class is explained by an empty mask (a shared network can collapse one class to all zeros)
    for c in range(n_labels):
        i = int(np.flatnonzero(lesions_test.labels == c)[0])
        rc = zstub.Explain(
            pb.ExplainRequest(
                model="lesions-nemt-cond",
                image=image_msg(lesions_test.images[i]),
                options=pb.ExplainOptions(target_label=c),
            ),
            timeout=30,
        )
        assert from_tensor(rc.mask).max() > 0.1, f"empty conditional mask for class {c}"
    masses, areas = [], []
    for i in range(16):
        rr = zstub.Explain(
            pb.ExplainRequest(
                model="lesions-nemt",
                image=image_msg(lesions_test.images[i]),
                options=pb.ExplainOptions(target_label=int(lesions_test.labels[i])),
            ),
            timeout=30,
        )
        masses.append(relevance_mass(from_tensor(rr.mask), lesions_test.masks[i]))
        areas.append(float(lesions_test.masks[i].mean()))
    assert np.mean(masses) > np.mean(areas) + 0.1, (np.mean(masses), np.mean(areas))


@pytest.mark.parametrize(
    "model,method",
    [
        ("scenes-simclr", "saliency"),
        ("scenes-simclr", "guided_backprop"),
        ("scenes-simclr", "smoothgrad"),
        ("scenes-nemu", "saliency"),
        ("lesions-classifier", "gradcam"),
        ("lesions-classifier", "integrated_gradients"),
    ],
)
def test_gradient_baselines_on_the_explain_rpc(zstub, scenes_test, model, method):
    r = zstub.Explain(
        pb.ExplainRequest(
            model=model,
            image=image_msg(scenes_test.images[1]),
            options=pb.ExplainOptions(method=method, return_png=True),
        ),
        timeout=60,
    )
    m = from_tensor(r.mask)
    assert m.shape == (64, 64) and np.isfinite(m).all() and m.max() <= 1.0 and m.min() >= 0.0 and m.max() > 0
    assert r.method == method
    Image.open(io.BytesIO(r.overlay_png)).verify()


def noisy_particles(n: int = 6, snr: float = 1 / 64):
    from xaiserve.training.datasets.cryoem import CryoEMConfig, simulate

    ps = simulate(CryoEMConfig(snr=snr, seed=123, sizes={"train": 1, "val": 1, "test": n}), "test", n)
    return ps.clean, ps.noisy


def test_denoise_tensor_and_mrc_round_trip(zstub, tmp_path):
    clean, noisy = noisy_particles()
    r = zstub.Denoise(pb.DenoiseRequest(model="cryoem-spiral", tensor=to_tensor(noisy), return_mrc=True), timeout=60)
    den = from_tensor(r.denoised)
    assert den.shape == noisy.shape
    assert np.mean((den - clean) ** 2) < 0.5 * np.mean((noisy - clean) ** 2), (
        "the denoiser must remove most of the noise"
    )
    from xaiserve.handlers.denoise.client_io import read_stack, write_stack

    write_stack(tmp_path / "in.mrcs", noisy)
    r2 = zstub.Denoise(pb.DenoiseRequest(model="cryoem-spiral", mrc=(tmp_path / "in.mrcs").read_bytes()), timeout=60)
    np.testing.assert_allclose(from_tensor(r2.denoised), den, atol=1e-4)
    (tmp_path / "out.mrcs").write_bytes(r.mrc)
    np.testing.assert_allclose(read_stack(tmp_path / "out.mrcs"), den, atol=1e-5)


@pytest.mark.parametrize(
    "req,code",
    [
        (
            pb.DenoiseRequest(model="cryoem-spiral", tensor=to_tensor(np.full((2, 64, 64), np.nan, np.float32))),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            pb.DenoiseRequest(model="cryoem-spiral", mrc=b"not an mrc file at all" * 20),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (pb.DenoiseRequest(model="cryoem-spiral"), grpc.StatusCode.INVALID_ARGUMENT),
        (
            pb.DenoiseRequest(model="cryoem-spiral", tensor=pb.Tensor(dtype="float32", shape=[0, 64, 64], data=b"")),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            pb.DenoiseRequest(model="cryoem-spiral", tensor=to_tensor(np.zeros((600, 64, 64), np.float32))),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (
            pb.DenoiseRequest(model="scenes-nemu", tensor=to_tensor(np.zeros((1, 64, 64), np.float32))),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            pb.DenoiseRequest(model="cryoem-nope", tensor=to_tensor(np.zeros((1, 64, 64), np.float32))),
            grpc.StatusCode.NOT_FOUND,
        ),
    ],
)
def test_denoise_bad_input(zstub, req, code):
    with pytest.raises(grpc.RpcError) as e:
        zstub.Denoise(req, timeout=60)
    assert e.value.code() == code, e.value.details()
    assert len(e.value.details()) > 20


def test_cli_denoise_through_the_server(zoo, tmp_path):
    from xaiserve.handlers.denoise.client_io import read_stack, write_stack

    _, noisy = noisy_particles(3)
    write_stack(tmp_path / "p.mrcs", noisy)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "xaiserve.service.cli",
            "denoise",
            str(tmp_path / "p.mrcs"),
            "--out",
            str(tmp_path / "d.mrcs"),
            "--address",
            zoo.address,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert read_stack(tmp_path / "d.mrcs").shape == noisy.shape


def watch_to_end(stub, job_id: str, timeout: float = 240) -> list[pb.JobEvent]:
    return list(stub.WatchJob(pb.JobRef(id=job_id), timeout=timeout))


def test_relax_job_end_to_end(zstub, scenes_test):
    req = pb.JobRequest(
        method="relax",
        model="scenes-simclr",
        image=image_msg(scenes_test.images[2]),
        relax=pb.RelaxParams(num_masks=300, batch_size=100, seed=1),
        idempotency_key="e2e-relax-1",
    )
    job = zstub.SubmitJob(req, timeout=30)
    again = zstub.SubmitJob(req, timeout=30)
    assert again.id == job.id, "the same idempotency key must give the same job"
    events = watch_to_end(zstub, job.id)
    types = [e.type for e in events]
    assert types[-1] == pb.EVENT_SUCCEEDED, events[-1]
    assert pb.EVENT_PROGRESS in types
    done = zstub.GetJob(pb.JobRef(id=job.id, include_result=True), timeout=30)
    assert done.state == pb.SUCCEEDED and done.progress == pytest.approx(1.0)
    res = done.result.relax
    assert res.num_masks == 300
    imp, unc = from_tensor(res.importance), from_tensor(res.uncertainty)
    assert imp.shape == (64, 64) and unc.shape == (64, 64) and (unc >= 0).all()
    Image.open(io.BytesIO(res.png)).verify()


def test_ablation_path_job_end_to_end_and_cancel(zstub, lesions_test):
    req = pb.JobRequest(
        method="ablation_path",
        model="lesions-classifier",
        image=image_msg(lesions_test.images[0]),
        ablation=pb.AblationParams(max_iterations=3, num_slices=6, mask_size=32),
    )
    job = zstub.SubmitJob(req, timeout=30)
    events = watch_to_end(zstub, job.id)
    assert events[-1].type == pb.EVENT_SUCCEEDED, events[-1]
    res = zstub.GetJob(pb.JobRef(id=job.id, include_result=True), timeout=30).result.ablation
    path = from_tensor(res.path)
    assert path.shape == (6, 64, 64)
    assert (np.diff(path, axis=0) >= -1e-5).all(), "a path is monotone in t"
    assert from_tensor(res.probabilities).shape[0] == 8
    assert res.stop_reason in ("saturation", "max_iterations")
    long = zstub.SubmitJob(
        pb.JobRequest(
            method="ablation_path",
            model="lesions-classifier",
            image=image_msg(lesions_test.images[1]),
            ablation=pb.AblationParams(max_iterations=5000),
        ),
        timeout=30,
    )
    it = zstub.WatchJob(pb.JobRef(id=long.id), timeout=240)
    for ev in it:
        if ev.type == pb.EVENT_PROGRESS:
            break
    cancelled = zstub.CancelJob(pb.JobRef(id=long.id), timeout=30)
    assert cancelled.state == pb.CANCELLED
    rest = list(it)
    assert rest[-1].type == pb.EVENT_CANCELLED


@pytest.mark.parametrize(
    "req,code,fragment",
    [
        (pb.JobRequest(method="lime", model="scenes-simclr"), grpc.StatusCode.INVALID_ARGUMENT, "relax"),
        (pb.JobRequest(method="relax", model="ghost", relax=pb.RelaxParams()), grpc.StatusCode.NOT_FOUND, "ghost"),
        (
            pb.JobRequest(method="relax", model="cryoem-spiral", relax=pb.RelaxParams()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "encoder",
        ),
        (
            pb.JobRequest(method="relax", model="scenes-simclr", relax=pb.RelaxParams(num_masks=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "num_masks",
        ),
        (
            pb.JobRequest(method="relax", model="scenes-simclr", relax=pb.RelaxParams(p_keep=1.5)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "p_keep",
        ),
        (
            pb.JobRequest(method="ablation_path", model="scenes-simclr", ablation=pb.AblationParams()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "classifier",
        ),
        (
            pb.JobRequest(method="ablation_path", model="lesions-classifier", ablation=pb.AblationParams(num_slices=1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "num_slices",
        ),
        (
            pb.JobRequest(
                method="ablation_path", model="lesions-classifier", ablation=pb.AblationParams(target_label=99)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "target",
        ),
    ],
)
def test_bad_job_requests_fail_at_submit_time(zstub, scenes_test, req, code, fragment):
    if not req.HasField("image"):
        req.image.CopyFrom(image_msg(scenes_test.images[0]))
    with pytest.raises(grpc.RpcError) as e:
        zstub.SubmitJob(req, timeout=30)
    assert e.value.code() == code, e.value.details()
    assert fragment in e.value.details(), e.value.details()


def test_unknown_job_is_not_found(zstub):
    for call in (zstub.GetJob, zstub.CancelJob):
        with pytest.raises(grpc.RpcError) as e:
            call(pb.JobRef(id="no-such-job"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
