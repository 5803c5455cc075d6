"""The "relax" job method: submit-time validation (every bad parameter, model and image), a run end
to end with a real ONNX encoder through the registry and ONNX Runtime, progress reporting, and
cancellation within one batch of masks."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from torch import nn

from tests.jobs_support import RecordingContext
from xaiserve.errors import FailedPrecondition, InvalidArgument, NotFound
from xaiserve.handlers.relax import Relax, RelaxConfig
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.images import decode_image, to_input_geometry, to_model_input
from xaiserve.service.jobs.contract import JobCancelled
from xaiserve.service.jobs.relax import RelaxJobMethod
from xaiserve.service.modelstore import add_entry
from xaiserve.service.registry import Registry, RegistryConfig
from xaiserve.service.tensors import from_tensor, to_tensor

torch.set_num_threads(1)

SIZE = 32
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


class TinyEncoder(nn.Module):
    """Two convolutions and a linear head with ReLU output (non-negative, as Theorem 1 assumes)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU()
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _entry(name: str, kind: str, **kw) -> dict:
    return {
        "name": name,
        "version": "1",
        "kind": kind,
        "files": {"onnx": f"{name}/1/model.onnx"},
        "input": {"height": SIZE, "width": SIZE, "channels": 3, "mean": MEAN, "std": STD},
        "output_dim": 16,
        **kw,
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, nn.Module]:
    root = tmp_path_factory.mktemp("relax_store")
    torch.manual_seed(0)
    enc = TinyEncoder().eval()
    path = root / "enc/1/model.onnx"
    path.parent.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            enc,
            (torch.zeros(1, 3, SIZE, SIZE),),
            str(path),
            input_names=["image"],
            output_names=["output"],
            dynamic_axes={"image": {0: "batch"}, "output": {0: "batch"}},
            dynamo=False,
            opset_version=17,
        )
    add_entry(root, _entry("enc", "encoder"))
    # the same graph registered as a classifier and as a NEM-U model that explains enc:1
    for name in ("clf", "nemu"):
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.onnx").write_bytes(path.read_bytes())
    add_entry(root, _entry("clf", "classifier", labels=[str(i) for i in range(16)]))
    add_entry(root, _entry("nemu", "nem_u", explains="enc:1"))
    add_entry(root, _entry("ghost", "encoder"))  # its ONNX file was never written
    return root, enc


@pytest.fixture(scope="module")
def registry(store) -> Registry:
    return Registry(RegistryConfig(store=store[0], intra_op_threads=1, prefer_cuda=False))


def _png(h: int = 40, w: int = 40, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    a = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    a[8:24, 10:30] = [230, 200, 40]  # a bright object
    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _request(model: str = "enc", image: bytes | None = None, **params) -> pb.JobRequest:
    return pb.JobRequest(
        method="relax",
        model=model,
        image=pb.Image(encoded=_png() if image is None else image),
        relax=pb.RelaxParams(**params),
    )


# --- validate(): everything known at submit time --------------------------------------------------
def test_valid_requests_pass(registry):
    m = RelaxJobMethod()
    m.validate(_request(), registry)
    m.validate(
        _request("enc:1", num_masks=10, cells=32, p_keep=0.3, masking="colour", threshold="mean", gamma=2.0), registry
    )
    m.validate(_request("nemu"), registry)  # a NEM-U model: RELAX explains its frozen encoder
    assert m.models(_request("nemu"), registry)[1].id == "enc:1"
    m.validate(
        pb.JobRequest(method="relax", model="enc", image=pb.Image(encoded=_png())), registry
    )  # no params: defaults


@pytest.mark.parametrize(
    "params, word",
    [
        ({"num_masks": 0}, "num_masks"),
        ({"num_masks": 100_001}, "num_masks"),
        ({"p_keep": 0.0}, "p_keep"),
        ({"p_keep": 1.0}, "p_keep"),
        ({"p_keep": 1.5}, "p_keep"),
        ({"cells": 0}, "cells"),
        ({"cells": 33}, "cells"),  # larger than the 32 x 32 model input
        ({"masking": "blur"}, "masking"),
        ({"threshold": "max"}, "threshold"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": -1.0}, "gamma"),
        ({"target_error": 0.0}, "target_error"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 5000}, "batch_size"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"estimator": "bootstrap"}, "estimator"),
    ],
)
def test_bad_parameters_are_invalid_argument(registry, params, word):
    with pytest.raises(InvalidArgument) as e:
        RelaxJobMethod().validate(_request(**params), registry)
    assert word in str(e.value)


def test_bad_models_and_images(registry):
    m = RelaxJobMethod()
    with pytest.raises(NotFound):
        m.validate(_request("nope"), registry)
    with pytest.raises(NotFound):
        m.validate(_request("enc:7"), registry)
    with pytest.raises(InvalidArgument) as e:
        m.validate(_request("clf"), registry)
    assert "classifier" in str(e.value) and "enc:1" in str(e.value)  # names the encoders available
    with pytest.raises(FailedPrecondition):
        m.validate(_request("ghost"), registry)
    with pytest.raises(InvalidArgument, match="decoded"):
        m.validate(_request(image=b"this is not a png"), registry)
    with pytest.raises(InvalidArgument):
        m.validate(pb.JobRequest(method="relax", model="enc"), registry)  # no image
    with pytest.raises(InvalidArgument, match="relax parameters"):
        m.validate(
            pb.JobRequest(method="relax", model="enc", image=pb.Image(encoded=_png()), ablation=pb.AblationParams()),
            registry,
        )


# --- run(): end to end with ONNX Runtime --------------------------------------------------------
def test_job_runs_end_to_end_with_onnx(registry, store):
    ctx = RecordingContext()
    req = _request(num_masks=256, batch_size=64, seed=7)
    res = RelaxJobMethod().run(req, registry, ctx)
    r = res.relax
    imp, unc, ur = (from_tensor(t) for t in (r.importance, r.uncertainty, r.u_relax))
    # at the request image's own resolution (40 x 40), not the model's 32 x 32
    assert imp.shape == unc.shape == ur.shape == (40, 40) and imp.dtype == np.float32
    assert r.num_masks == 256 and r.masks_per_second > 0
    assert np.isfinite(unc).all() and (unc >= 0).all()
    # U-RELAX keeps R exactly where U < eps (the median, by default)
    # (the median of U at the model's resolution; resampling to 40 x 40 moves the median a little)
    assert r.threshold == pytest.approx(float(np.median(unc)), rel=2e-2)
    np.testing.assert_array_equal(ur, np.where(unc < r.threshold, imp, 0.0))
    png = PILImage.open(io.BytesIO(r.png))
    assert png.size[1] >= 128 and png.size[0] == 3 * png.size[1] + 2 * 2  # three panels, 2 px gaps

    params = json.loads(res.parameters_json)
    assert params["seed"] == 7 and params["num_masks"] == 256 and params["cells"] == 7 and params["p_keep"] == 0.5
    assert params["masking"] == "zero" and params["threshold"] == "median" and params["gamma"] == 1.0
    assert params["encoder"] == "enc:1" and params["backend"] == "onnxruntime"
    assert params["estimator"] == "auto" and params["estimator_used"] == "plain"  # the paper's estimator for a fixed N
    assert {"run", "model", "decode"} <= set(res.timings) and res.timings["model"] > 0

    # progress once per batch, fraction rising to 1, the current normalised importance as heatmap
    assert [rep["metrics"]["masks"] for rep in ctx.reports] == [64, 128, 192, 256]
    assert [rep["fraction"] for rep in ctx.reports] == [0.25, 0.5, 0.75, 1.0]
    hm = ctx.reports[-1]["heatmap"]
    assert hm.shape == (SIZE, SIZE) and hm.min() == 0.0 and hm.max() == 1.0
    assert ctx.reports[-1]["score"] == pytest.approx(r.achieved_error, rel=1e-5)

    # the same numbers as the pure-torch Relax on the torch encoder (ONNX Runtime vs torch: ~1e-6)
    entry = registry.resolve("enc")
    x = torch.from_numpy(to_model_input(decode_image(req.image), entry.input))
    ref = Relax(store[1], RelaxConfig(num_masks=256, batch_size=64, seed=7)).attribute(x)
    back = lambda a: to_input_geometry(a.numpy(), entry.input, 40, 40, clip=False)  # noqa: E731
    np.testing.assert_allclose(imp, back(ref.importance), atol=2e-5)
    np.testing.assert_allclose(unc, back(ref.uncertainty), rtol=1e-2, atol=1e-6)

    # a NEM-U model explains its frozen encoder: the same result
    res2 = RelaxJobMethod().run(_request("nemu", num_masks=256, batch_size=64, seed=7), registry, RecordingContext())
    np.testing.assert_array_equal(from_tensor(res2.relax.importance), imp)


def test_adaptive_job_reports_n_and_error(registry):
    ctx = RecordingContext()
    res = RelaxJobMethod().run(
        _request(num_masks=3000, batch_size=100, adaptive=True, target_error=0.02), registry, ctx
    )
    r = res.relax
    assert r.num_masks < 3000 and r.achieved_error < 0.02
    params = json.loads(res.parameters_json)
    assert params["converged"] is True and params["estimator_used"] == "control_variate"  # "auto" with adaptive
    assert ctx.reports[-1]["fraction"] == 1.0 and ctx.reports[-1]["metrics"]["masks"] == r.num_masks
    # a tighter target: the paper's estimator on request needs more masks for it than the control variate
    runs = {}
    for est_name in ("plain", "control_variate"):
        res = RelaxJobMethod().run(
            _request(num_masks=3000, batch_size=50, adaptive=True, target_error=0.0015, estimator=est_name),
            registry,
            RecordingContext(),
        )
        assert json.loads(res.parameters_json)["estimator_used"] == est_name and res.relax.achieved_error < 0.0015
        runs[est_name] = res.relax.num_masks
    assert runs["plain"] > runs["control_variate"], runs


def test_cancellation_stops_within_one_batch(registry):
    ctx = RecordingContext(cancel_after=2)
    with pytest.raises(JobCancelled):
        RelaxJobMethod().run(_request(num_masks=3000, batch_size=50), registry, ctx)
    # cancelled while reporting batch 2: no further batch was run (or reported)
    assert len(ctx.reports) == 2 and ctx.reports[-1]["metrics"]["masks"] == 100


# --- the default SSL encoder on scenes with one object ---------------------------------------------
@pytest.mark.slow
def test_default_encoder_importance_is_higher_inside_the_object():
    """On scenes with one object, RELAX importance (scenes-simclr, the paper's defaults,
    N = 1000) is higher inside the object than outside: on average, and on more than half of a
    fixed set of 12 one-object test scenes (chance: half)."""
    from tests.conftest import DEFAULT_STORE
    from xaiserve.training.datasets.scenes import Scenes, ScenesConfig

    reg = Registry(RegistryConfig(store=DEFAULT_STORE, intra_op_threads=1, prefer_cuda=False))
    assert reg.resolve("scenes-simclr").kind == "encoder"
    scenes = Scenes(ScenesConfig(max_items=1, sizes={"train": 0, "val": 0, "test": 12})).split("test")
    method, diffs = RelaxJobMethod(), []
    for img, gt in zip(scenes.images, scenes.masks):
        hwc = np.ascontiguousarray(img.transpose(1, 2, 0))  # uint8 [64, 64, 3]
        req = pb.JobRequest(
            method="relax",
            model="scenes-simclr",
            image=pb.Image(tensor=to_tensor(hwc)),
            relax=pb.RelaxParams(num_masks=1000),
        )
        method.validate(req, reg)
        r = from_tensor(method.run(req, reg, RecordingContext()).relax.importance)
        assert gt.any() and not gt.all()
        diffs.append(float(r[gt].mean() - r[~gt].mean()))
    diffs = np.array(diffs)
    assert diffs.mean() > 0, diffs
    assert (diffs > 0).sum() > len(diffs) / 2, diffs
