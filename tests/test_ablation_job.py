"""The "ablation_path" job method with a real model store: a small handlers.nets classifier trained
here (in seconds) to detect a bright square, loaded through Registry.torch_module ->
handlers.nets.load_module. Submit-time validation of every parameter, a full run with every
AblationResult field checked, cancellation within one iteration, a classifier without gradients
failing with the reason, and the job through the real server (submit, watch, result)."""

from __future__ import annotations

import io
import json
import warnings

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image as PILImage

from tests.jobs_support import RecordingContext
from xaiserve.errors import FailedPrecondition, InvalidArgument, NotFound
from xaiserve.handlers.nets import EncoderArch, FrozenSpec
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.jobs.ablation import AblationJobMethod
from xaiserve.service.jobs.contract import JobCancelled
from xaiserve.service.modelstore import add_entry
from xaiserve.service.registry import Registry, RegistryConfig
from xaiserve.service.tensors import from_tensor, to_tensor

# the module's store holds a classifier trained by its fixture
pytestmark = pytest.mark.slow

torch.set_num_threads(1)

SIZE = 32
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
SQUARE = (slice(5, 12), slice(18, 25))  # the bright square of the test image (rows, cols)
SPEC = FrozenSpec(EncoderArch(stem=8, widths=(16, 16), blocks=(1, 1)), num_classes=2)


def _batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Dim noisy backgrounds; label 1 images carry one bright square at a random place."""
    x = 0.2 + 0.05 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    for i in range(n):
        if y[i]:
            r, c = (int(v) for v in torch.randint(2, 22, (2,), generator=g))
            s = int(torch.randint(5, 9, (1,), generator=g))
            x[i, :, r : r + s, c : c + s] = 0.9
    return (x - 0.5) / 0.25, y


def _train_square_detector() -> torch.nn.Module:
    torch.manual_seed(0)
    model = SPEC.build()
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for _ in range(60):
        x, y = _batch(32, g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _entry(name: str, kind: str, arch: dict, **kw) -> dict:
    return {
        "name": name,
        "version": "1",
        "kind": kind,
        "files": {"state_dict": f"{name}/1/weights.pt"},
        "input": {"height": SIZE, "width": SIZE, "channels": 3, "mean": MEAN, "std": STD},
        "arch": arch,
        **kw,
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation_store")
    model = _train_square_detector()
    (root / "squares/1").mkdir(parents=True)
    torch.save(model.state_dict(), root / "squares/1/weights.pt")
    add_entry(root, _entry("squares", "classifier", SPEC.to_arch(), labels=["background", "square"], output_dim=2))
    flat = SPEC.build()
    flat.load_state_dict(model.state_dict())
    with torch.no_grad():
        flat.head.weight.zero_()  # logits = bias: the output ignores the image
    (root / "flat/1").mkdir(parents=True)
    torch.save(flat.state_dict(), root / "flat/1/weights.pt")
    add_entry(root, _entry("flat", "classifier", SPEC.to_arch(), labels=["background", "square"], output_dim=2))
    (root / "onnx-only/1").mkdir(parents=True)  # a classifier served through ONNX only: no gradients
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, SIZE, SIZE),),
            str(root / "onnx-only/1/model.onnx"),
            input_names=["image"],
            output_names=["output"],
            dynamic_axes={"image": {0: "b"}, "output": {0: "b"}},
            dynamo=False,
            opset_version=17,
        )
    add_entry(
        root,
        {
            **_entry("onnx-only", "classifier", SPEC.to_arch(), output_dim=2),
            "files": {"onnx": "onnx-only/1/model.onnx"},
        },
    )
    enc = FrozenSpec(SPEC.encoder)
    (root / "enc/1").mkdir(parents=True)
    torch.save(enc.build().state_dict(), root / "enc/1/weights.pt")
    add_entry(root, _entry("enc", "encoder", enc.to_arch(), output_dim=16))
    return root


@pytest.fixture(scope="module")
def registry(store) -> Registry:
    return Registry(RegistryConfig(store=store, warmup=False))


def _png(square: bool = True, size: int = SIZE) -> bytes:
    rng = np.random.default_rng(0)
    a = np.clip(0.2 + 0.05 * rng.standard_normal((size, size, 3)), 0, 1)
    if square:
        a[SQUARE[0], SQUARE[1]] = 0.9
    buf = io.BytesIO()
    PILImage.fromarray((a * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# saturation off: the end-to-end test counts every one of the 12 iterations (no saturation stop)
SMALL = dict(num_slices=6, mask_size=16, sigma_regu=1.5, max_iterations=12, saturation=0.0)


def _request(model: str = "squares", image: bytes | None = None, **params) -> pb.JobRequest:
    return pb.JobRequest(
        method="ablation_path",
        model=model,
        image=pb.Image(encoded=_png() if image is None else image),
        ablation=pb.AblationParams(**params),
    )


# --- validate(): everything known at submit time -----------------------------------------------------
def test_valid_requests_pass(registry):
    m = AblationJobMethod()
    assert m.name == "ablation_path"
    m.validate(_request(), registry)
    m.validate(pb.JobRequest(method="ablation_path", model="squares:1", image=pb.Image(encoded=_png())), registry)
    m.validate(
        _request(
            score="straddling",
            reduction="contrastive",
            num_slices=2,
            mask_size=32,
            target_label=0,
            saturation=0.5,
            ramp_saturation=True,
            window=8,
            baseline=pb.Image(tensor=to_tensor(np.zeros((20, 20, 3), np.uint8))),
        ),
        registry,
    )


@pytest.mark.parametrize(
    "params,word",
    [
        (
            dict(target_label=2),
            "target_label 2 is out of range for squares:1, which has 2 classes: 0..1 (background, square)",
        ),
        (dict(target_label=-1), "target_label -1"),
        (dict(num_slices=1), "num_slices"),
        (dict(mask_size=33), "mask_size 33 is larger than the model's input (32 x 32)"),
        (dict(mask_size=1), "mask_size"),
        (dict(sigma_regu=0.0), "sigma_regu"),
        (dict(sigma_regu=-2.0), "sigma_regu"),
        (dict(score="keep"), "score 'keep' is unknown"),
        (dict(reduction="mean"), "reduction 'mean' is unknown"),
        (dict(reduction="contrastive"), "needs score 'straddling'"),
        (dict(max_iterations=0), "max_iterations"),
        (dict(max_iterations=100000), "max_iterations"),
        (dict(step_size=0.0), "step_size"),
        (dict(saturation=-0.5), "saturation"),
        (dict(min_iterations=-1), "min_iterations"),
        (dict(stop_saturation=1.5), "stop_saturation"),
        (dict(window=-3), "window"),
        (dict(baseline=pb.Image(encoded=b"not an image")), "params.baseline"),
    ],
)
def test_bad_parameters_are_invalid_argument(registry, params, word):
    with pytest.raises(InvalidArgument) as e:
        AblationJobMethod().validate(_request(**params), registry)
    assert word in str(e.value)


def test_bad_models_and_images(registry):
    m = AblationJobMethod()
    with pytest.raises(
        InvalidArgument, match=r"enc:1 is a encoder.*Classifiers with torch weights in this store: flat:1, squares:1"
    ):
        m.validate(_request("enc"), registry)
    with pytest.raises(InvalidArgument, match=r"onnx-only:1 has no torch form.*flat:1, squares:1"):
        m.validate(_request("onnx-only"), registry)
    with pytest.raises(NotFound, match="nope"):
        m.validate(_request("nope"), registry)
    with pytest.raises(InvalidArgument, match="decoded"):
        m.validate(_request(image=b"\x89PNG broken"), registry)
    with pytest.raises(InvalidArgument, match="image is missing"):
        m.validate(pb.JobRequest(method="ablation_path", model="squares", ablation=pb.AblationParams()), registry)
    with pytest.raises(InvalidArgument, match="params.relax"):
        m.validate(
            pb.JobRequest(
                method="ablation_path", model="squares", image=pb.Image(encoded=_png()), relax=pb.RelaxParams()
            ),
            registry,
        )


# --- run() -------------------------------------------------------------------------------------------
def _check_path(path: np.ndarray, tol: float) -> None:
    T = path.shape[0]
    full = np.concatenate([np.zeros_like(path[:1]), path, np.ones_like(path[:1])])
    assert path.min() >= 0 and path.max() <= 1
    assert (np.diff(full, axis=0) >= -1e-6).all()
    assert np.abs(path.mean(axis=(1, 2)) - np.arange(1, T + 1) / (T + 1)).max() < tol


def test_job_runs_end_to_end_and_fills_every_field(registry):
    ctx = RecordingContext()
    res = AblationJobMethod().run(_request(return_images=True, seed=5, **SMALL), registry, ctx)
    r = res.ablation
    T = 6
    path = from_tensor(r.path)
    assert path.shape == (T, SIZE, SIZE) and path.dtype == np.float32
    _check_path(path, 0.02)
    np.testing.assert_allclose(from_tensor(r.times), np.arange(T + 2) / (T + 1), atol=1e-6)
    probs = from_tensor(r.probabilities)
    assert probs.shape == (T + 2, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert r.target_label == 1 and probs[0, 1] > 0.5  # argmax: the square
    heat = from_tensor(r.heatmap)
    assert heat.shape == (SIZE, SIZE) and heat.min() >= 0 and heat.max() <= 1
    row, col = divmod(int(heat.argmax()), SIZE)
    assert SQUARE[0].start <= row < SQUARE[0].stop and SQUARE[1].start <= col < SQUARE[1].stop
    assert len(r.score_history) == len(r.saturation_history) == r.iterations == 12
    assert r.stop_reason == "max_iterations"
    assert 4.0 <= r.baseline_sigma <= 100.0
    assert 0.0 <= r.score <= 1.0 and r.score > r.score_history[0]
    images = from_tensor(r.images)
    assert images.shape == (T + 2, SIZE, SIZE, 3)
    decoded = np.asarray(PILImage.open(io.BytesIO(_png())), np.float32) / 255
    np.testing.assert_allclose(images[0], decoded, atol=1e-5)  # t = 0 is the target image
    for png in (r.strip_png, r.heatmap_png):
        assert PILImage.open(io.BytesIO(png)).format == "PNG"
    assert not r.HasField("path_down")
    params = json.loads(res.parameters_json)
    assert params["model"] == "squares:1" and params["num_slices"] == 6 and params["target_label"] == 1
    assert params["target_source"] == "argmax" and params["baseline"] == "blur" and params["seed"] == 5
    assert params["reduction"] == "transition" and params["score"] == "retaining" and params["stop_saturation"] == 0.8
    # unset fields take the thesis's and the authors' defaults (METHODS.md, decision 2026-12)
    assert params["step_size"] == 0.5 and params["min_iterations"] == 6 and params["ramp_saturation"] is True
    assert params["saturation"] == 0.0 and params["transition_floor"] == 0.25 and params["sigma_regu"] == 1.5
    assert params["sigma_image_px"] == 1.5 and params["sigma_mask_px"] == pytest.approx(1.5 * 16 / SIZE)
    assert {"run", "model", "baseline", "render"} <= set(res.timings)
    # one progress report per iteration, with the current heatmap, score and saturation
    assert len(ctx.reports) == 12
    assert [rep["metrics"]["iteration"] for rep in ctx.reports] == list(range(1, 13))
    assert all(rep["heatmap"].shape == (SIZE, SIZE) and 0 <= rep["metrics"]["saturation"] <= 1 for rep in ctx.reports)
    assert [rep["score"] for rep in ctx.reports] == pytest.approx(list(r.score_history))
    fractions = [rep["fraction"] for rep in ctx.reports]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] <= 0.99


def test_straddling_job_returns_both_paths(registry):
    baseline = pb.Image(tensor=to_tensor(np.full((SIZE, SIZE, 3), 0.2, np.float32)))
    res = AblationJobMethod().run(
        _request(score="straddling", reduction="contrastive", baseline=baseline, **SMALL), registry, RecordingContext()
    )
    r = res.ablation
    assert r.baseline_sigma == 0.0 and json.loads(res.parameters_json)["baseline"] == "given"
    _check_path(from_tensor(r.path), 0.02)
    _check_path(from_tensor(r.path_down), 0.02)
    assert 0.0 <= r.score <= 2.0
    assert not r.HasField("images")


def test_cancellation_stops_within_one_iteration(registry):
    ctx = RecordingContext(cancel_after=3)
    with pytest.raises(JobCancelled):
        AblationJobMethod().run(_request(**{**SMALL, "max_iterations": 200}), registry, ctx)
    assert len(ctx.reports) == 3  # no fourth iteration ran after the cancel


def test_classifier_without_gradients_fails_with_the_reason(registry):
    with pytest.raises(FailedPrecondition, match="all zero"):
        AblationJobMethod().run(_request("flat", **SMALL), registry, RecordingContext())


def test_explicit_target_label(registry):
    res = AblationJobMethod().run(
        _request(target_label=0, **{**SMALL, "max_iterations": 3}), registry, RecordingContext()
    )
    assert res.ablation.target_label == 0 and json.loads(res.parameters_json)["target_source"] == "request"


# --- through the real server -------------------------------------------------------------------------
def test_ablation_job_through_the_server(store):
    from tests.serverutil import running_server

    with running_server(store, job_workers=1) as srv:
        stub = srv.stub()
        with pytest.raises(grpc.RpcError) as e:
            stub.SubmitJob(_request("enc"), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "squares:1" in e.value.details()
        job = stub.SubmitJob(_request(**SMALL), timeout=30)
        events = list(stub.WatchJob(pb.JobRef(id=job.id), timeout=120))
        assert events[-1].type == pb.EVENT_SUCCEEDED, events[-1].job.error
        progress = [ev for ev in events if ev.type == pb.EVENT_PROGRESS]
        assert progress and all("saturation" in ev.metrics and ev.HasField("score") for ev in progress)
        assert any(ev.HasField("partial_heatmap") for ev in progress)
        r = events[-1].job.result.ablation
        assert r.iterations == 12 and from_tensor(r.path).shape == (6, SIZE, SIZE)
        failed = stub.SubmitJob(_request("flat", **SMALL), timeout=30)
        last = list(stub.WatchJob(pb.JobRef(id=failed.id), timeout=120))[-1]
        assert last.type == pb.EVENT_FAILED and "all zero" in last.job.error
