"""Bring your own model, through the real server over gRPC: two architectures that are not
handlers.nets's (tests/byom_nets.py) added with `xaiserve models add` while the server runs.

- a VGG-style classifier at 224 x 224, given as ONNX with its own tensor names (input -> logits)
  plus a torch.export .pt2, served with letterbox preprocessing;
- a MobileNet-style encoder at 224 x 224 (7x7 stride-2 stem, max-pool, depthwise convolutions,
  projection head), given only as TorchScript: exported to ONNX on add;
- both appear without a restart; every gradient method ListModels advertises answers OK over gRPC
  at the request image's resolution; a RELAX job on the encoder and an ablation-path job on the
  classifier succeed.
"""

from __future__ import annotations

import io
import json
import time

import grpc
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from tests.byom_nets import make, save_forms
from tests.serverutil import running_server
from tests.tiny_models import build_store
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service import cli_models
from xaiserve.service.tensors import from_tensor

torch.set_num_threads(1)
pytestmark = pytest.mark.slow  # two 224 x 224 models, every gradient method, two jobs: ~1 min on 2 shared cores

GRADIENT = (
    "saliency",
    "guided_backprop",
    "smoothgrad",
    "integrated_gradients",
    "gradient_shap",
    "gradcam",
    "label_free_saliency",
)


def png(h: int, w: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    a = (rng.random((h, w, 3)) * 80).astype(np.uint8)
    a[h // 4 : h // 2, w // 3 : w // 2] = [230, 200, 40]
    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def wait_for(stub, model: str, timeout: float = 60.0) -> pb.ModelInfo:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models:
            if f"{m.name}:{m.version}" == model:
                return m
        time.sleep(0.2)
    raise AssertionError(f"{model} did not appear in ListModels within {timeout} s")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("byom")
    store = build_store(root / "store", slow=False)
    vgg = save_forms(make("vgg"), root / "vgg", in_name="input", out_name="logits")
    mob = save_forms(make("mobile"), root / "mobile", in_name="pixels", out_name="embedding")
    (root / "labels.txt").write_text("cat\ndog\nbird\n")
    with running_server(store, reload_interval_s=0.2, job_workers=1, max_delay_ms=0.0) as srv:
        stub = srv.stub()
        assert {m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models} >= {
            "tiny-encoder",
            "tiny-nemu",
        }
        rc = cli_models.main(
            [
                "add",
                "user-vgg",
                str(vgg["onnx"]),
                "--torch",
                str(vgg["exported_program"]),
                "--kind",
                "classifier",
                "--labels",
                str(root / "labels.txt"),
                "--mean",
                "imagenet",
                "--std",
                "imagenet",
                "--resize",
                "letterbox",
                "--store",
                str(store),
            ]
        )
        assert rc == 0
        rc = cli_models.main(
            [
                "add",
                "user-mobile",
                str(mob["torchscript"]),
                "--kind",
                "encoder",
                "--input",
                "3x224x224",
                "--store",
                str(store),
            ]
        )
        assert rc == 0
        yield srv, stub, store, root


def test_added_models_appear_without_restart_with_their_methods(served):
    _, stub, _, _ = served
    vgg = wait_for(stub, "user-vgg:1")
    mob = wait_for(stub, "user-mobile:1")
    assert vgg.available and mob.available
    assert vgg.kind == "classifier" and list(vgg.labels) == ["cat", "dog", "bird"] and vgg.output_dim == 3
    assert (vgg.input.height, vgg.input.width, vgg.input.channels) == (224, 224, 3)
    assert vgg.input.resize == "letterbox" and mob.input.resize == "stretch"
    # (other job methods of this server may be advertised too)
    assert set(vgg.methods) >= {*GRADIENT[:6], "ablation_path"} and "label_free_saliency" not in vgg.methods
    assert set(mob.methods) >= {*GRADIENT, "relax"}
    assert "letterbox" in vgg.card and "exported program" in vgg.card
    assert "torchscript" in mob.card and "ONNX graph exported" in mob.card


@pytest.mark.parametrize("model", ["user-vgg", "user-mobile"])
def test_every_advertised_gradient_method_over_grpc(served, model):
    _, stub, _, _ = served
    info = wait_for(stub, f"{model}:1")
    image = png(150, 260)  # not the model's size nor its aspect ratio
    for method in [m for m in info.methods if m in GRADIENT]:
        r = stub.Explain(
            pb.ExplainRequest(
                model=model, image=pb.Image(encoded=image), options=pb.ExplainOptions(method=method, return_output=True)
            ),
            timeout=120,
        )
        mask = from_tensor(r.mask)
        assert mask.shape == (150, 260), method
        assert np.isfinite(mask).all() and mask.min() >= 0.0 and mask.max() <= 1.0, method
        if method in ("saliency", "smoothgrad", "integrated_gradients"):
            assert mask.std() > 0, method
        out = from_tensor(r.output)
        assert out.shape == (info.output_dim,), method
        if info.kind == "classifier":
            assert 0 <= r.target_label < 3


def _run_job(stub, request: pb.JobRequest) -> pb.Job:
    job = stub.SubmitJob(request, timeout=60)
    events = list(stub.WatchJob(pb.JobRef(id=job.id), timeout=300))
    assert events[-1].type == pb.EVENT_SUCCEEDED, events[-1].job.error
    return stub.GetJob(pb.JobRef(id=job.id, include_result=True), timeout=30)


def test_relax_job_on_the_torchscript_encoder(served):
    _, stub, _, _ = served
    wait_for(stub, "user-mobile:1")
    job = _run_job(
        stub,
        pb.JobRequest(
            method="relax",
            model="user-mobile",
            image=pb.Image(encoded=png(120, 200, 1)),
            relax=pb.RelaxParams(num_masks=64, batch_size=32, seed=0),
        ),
    )
    imp = from_tensor(job.result.relax.importance)
    assert imp.shape == (120, 200) and np.isfinite(imp).all() and imp.std() > 0


def test_ablation_job_on_the_exported_classifier(served):
    _, stub, _, _ = served
    wait_for(stub, "user-vgg:1")
    # an untrained network's decision does not change under blur: give the baseline (a grey image)
    grey = io.BytesIO()
    PILImage.fromarray(np.full((160, 240, 3), 128, np.uint8)).save(grey, format="PNG")
    job = _run_job(
        stub,
        pb.JobRequest(
            method="ablation_path",
            model="user-vgg",
            image=pb.Image(encoded=png(160, 240, 2)),
            ablation=pb.AblationParams(
                num_slices=4, mask_size=28, max_iterations=2, target_label=1, baseline=pb.Image(encoded=grey.getvalue())
            ),
        ),
    )
    res = job.result.ablation
    heat, path = from_tensor(res.heatmap), from_tensor(res.path)
    assert heat.shape == (160, 240) and path.shape[1:] == (160, 240)
    assert res.target_label == 1 and res.iterations >= 1
    # letterbox: the model saw the 160 x 240 image as 149 x 224 in the middle of its 224 x 224 input;
    # the result is over the image itself (tests/test_byom_preprocess.py checks the geometry)
    assert np.isfinite(heat).all() and np.isfinite(path).all()
    assert json.loads(job.result.parameters_json)["baseline"] == "given"


def test_onnx_only_model_refuses_gradient_methods_naming_the_file_to_add(served):
    """Without its torch form (--no-convert here; or a graph onnx2torch cannot convert, see
    tests/test_byom_onnx_only.py) an ONNX model serves no gradient method and says which file to add."""
    _, stub, store, root = served
    rc = cli_models.main(
        [
            "add",
            "user-vgg-onnx",
            str(root / "vgg" / "model.onnx"),
            "--kind",
            "classifier",
            "--no-convert",
            "--store",
            str(store),
        ]
    )
    assert rc == 0
    info = wait_for(stub, "user-vgg-onnx:1")
    assert not set(info.methods) & set(GRADIENT) and "ablation_path" not in info.methods
    with pytest.raises(grpc.RpcError) as e:
        stub.Explain(
            pb.ExplainRequest(
                model="user-vgg-onnx", image=pb.Image(encoded=png(64, 64)), options=pb.ExplainOptions(method="saliency")
            ),
            timeout=30,
        )
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "torch" in e.value.details() and ("TorchScript" in e.value.details() or ".pt2" in e.value.details())
