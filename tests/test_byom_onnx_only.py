"""Models given ONLY as ONNX get every method and a masking network: `xaiserve models add` converts
the graph to torch (onnx2torch, handlers/nets/onnx_torch.py), checked against ONNX Runtime.

- a VGG-style classifier and a MobileNet-style encoder with ReLU6 (depthwise convolutions, 7x7
  stride-2 stem, max-pool, projection head), ONNX with their own tensor names: the converted module
  is saved as a torch.export .pt2 beside the graph;
- a classifier of the common CNN ops whose Reshape target is computed from Shape
  (tests/byom_nets.OpsNet): torch.export cannot capture it, so the server converts the graph at load;
- all three appear in a running server without a restart; every gradient method ListModels
  advertises answers OK over gRPC at the request image's resolution;
- NEM-U on the ONNX-only encoder and NEMt on the converted-at-load classifier are trained for one
  epoch (`--device cpu`), published and served: mask and output equal to the torch module rebuilt
  from the store's files.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from tests.byom_nets import make, make_ops_net, save_forms
from tests.serverutil import running_server
from tests.test_byom_nem import _rebuilt, write_images
from tests.test_byom_serve import GRADIENT, png, wait_for
from tests.tiny_models import build_store
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service import cli_models
from xaiserve.service.images import decode_image, to_model_input
from xaiserve.service.registry import read_manifest
from xaiserve.service.tensors import from_tensor
from xaiserve.training.cli_nem import train_main

torch.set_num_threads(1)
pytestmark = pytest.mark.slow  # three conversions, every gradient method, two trainings: ~1-2 min on 2 cores

H, W = 64, 96  # the encoder's input (not square); the classifiers take 64 x 64


def _add(store: Path, name: str, path: Path, kind: str, *extra: str) -> None:
    assert cli_models.main(["add", name, str(path), "--kind", kind, *extra, "--store", str(store)]) == 0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-only")
    store = build_store(root / "store", slow=False)
    vgg = save_forms(make("vgg", size=(64, 64)), root / "vgg", size=(64, 64), in_name="input", out_name="logits")
    mob = save_forms(
        make("mobile", size=(H, W), act="relu6"), root / "mob", size=(H, W), in_name="pixels", out_name="embedding"
    )
    ops = root / "ops.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            make_ops_net(),
            (torch.randn(2, 3, 64, 64),),
            str(ops),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
            opset_version=17,
            dynamo=False,
        )
    (root / "labels.txt").write_text("red\ngreen\nblue\n")
    with running_server(store, reload_interval_s=0.2, job_workers=0, max_delay_ms=0.0) as srv:
        stub = srv.stub()
        _add(store, "onnx-vgg", vgg["onnx"], "classifier", "--labels", str(root / "labels.txt"))
        _add(store, "onnx-mob", mob["onnx"], "encoder", "--resize", "letterbox")
        _add(store, "onnx-ops", ops, "classifier")
        yield srv, stub, store, root


def test_add_converts_onnx_to_a_stored_torch_form_or_at_load(served):
    _, _, store, _ = served
    raw = {f"{m['name']}:{m['version']}": m for m in json.loads((store / "manifest.json").read_text())["models"]}
    for name in ("onnx-vgg:1", "onnx-mob:1"):
        tf = raw[name]["torch_form"]
        assert tf["from"] == "onnx" and tf["converter"].startswith("onnx2torch") and tf["stored"] == "exported_program"
        assert tf["max_abs_diff"] <= 1e-4 * 10 and (store / raw[name]["files"]["exported_program"]).is_file()
    ops = raw["onnx-ops:1"]
    assert ops["torch_form"]["stored"] == "converted at load" and "exported_program" not in ops["files"]
    card = (store / ops["files"]["card"]).read_text()
    assert "converted from the ONNX graph by onnx2torch" in card and "converted again at load" in card


def test_list_models_states_each_models_resize_mode(served):
    """InputSpec.resize: the manifest's `input.resize` (the default "stretch" when not given)."""
    _, stub, _, _ = served
    wait_for(stub, "onnx-ops:1")
    got = {f"{m.name}:{m.version}": m.input.resize for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert got["onnx-mob:1"] == "letterbox" and got["onnx-vgg:1"] == "stretch" and got["onnx-ops:1"] == "stretch"
    assert got["tiny-encoder:1"] == "stretch" and set(got.values()) <= {"stretch", "letterbox", "center-crop"}


@pytest.mark.parametrize("model", ["onnx-vgg", "onnx-mob", "onnx-ops"])
def test_every_gradient_method_over_grpc_on_an_onnx_only_model(served, model):
    _, stub, _, _ = served
    info = wait_for(stub, f"{model}:1")
    assert info.available
    want = set(GRADIENT) if info.kind == "encoder" else set(GRADIENT) - {"label_free_saliency"}
    assert set(info.methods) >= want, info.methods
    if info.kind == "classifier":
        assert "ablation_path" in info.methods
    image = png(90, 150)
    for method in sorted(want):
        r = stub.Explain(
            pb.ExplainRequest(
                model=model, image=pb.Image(encoded=image), options=pb.ExplainOptions(method=method, return_output=True)
            ),
            timeout=120,
        )
        mask = from_tensor(r.mask)
        assert mask.shape == (90, 150), method
        assert np.isfinite(mask).all() and mask.min() >= 0.0 and mask.max() <= 1.0, method
        if method in ("saliency", "smoothgrad", "integrated_gradients", "guided_backprop"):
            assert mask.std() > 0, method
        assert from_tensor(r.output).shape == (info.output_dim,), method


@pytest.fixture(scope="module")
def trained(served):
    srv, stub, store, root = served
    images = write_images(root / "images", per_class=3)
    (root / "ops-images").mkdir()
    for c, folder in enumerate(("red", "green")):  # the ops classifier's classes are 0..3
        (images / folder).rename(root / "ops-images" / str(c))
    common = ["--epochs", "1", "--batch-size", "4", "--store", str(store), "--no-progress", "--threads", "1"]
    assert (
        train_main("nem-u", ["--encoder", "onnx-mob", "--images", str(root / "ops-images"), "--device", "cpu", *common])
        == 0
    )
    assert (
        train_main(
            "nemt", ["--classifier", "onnx-ops", "--images", str(root / "ops-images"), "--device", "cpu", *common]
        )
        == 0
    )
    return stub, store


@pytest.mark.parametrize("name", ["onnx-mob-nemu", "onnx-ops-nemt"])
def test_masking_network_of_an_onnx_only_model_is_trained_and_served(trained, name):
    stub, store = trained
    info = wait_for(stub, f"{name}:1")
    assert info.available
    entry = {e.id: e for e in read_manifest(store)}[f"{name}:1"]
    assert entry.metrics["training_device"] == "cpu"
    assert "on cpu" in (store / entry.files["card"]).read_text()
    assert max(entry.metrics["onnx_max_abs_diff"].values()) < 1e-4
    model = _rebuilt(store, name)
    s = entry.input
    image = png(s.height * 2, s.width * 2)  # the model's aspect ratio: the fit is a plain resize
    r = stub.Explain(
        pb.ExplainRequest(model=name, image=pb.Image(encoded=image), options=pb.ExplainOptions(return_output=True)),
        timeout=60,
    )
    x = torch.from_numpy(to_model_input(decode_image(pb.Image(encoded=image)), s))[None]
    with torch.no_grad():
        out = model(x) if info.kind == "nem_u" else model(x, torch.tensor([-1]))
    got = from_tensor(r.mask)
    assert got.shape == (s.height * 2, s.width * 2)
    small = np.asarray(PILImage.fromarray(got).resize((s.width, s.height), PILImage.BILINEAR))
    assert np.abs(small - out[0][0, 0].numpy()).max() < 0.05
    np.testing.assert_allclose(from_tensor(r.output), out[1][0].numpy(), atol=1e-4)


def test_train_user_nem_rejects_a_device_this_machine_lacks(served, capsys):
    _, _, store, root = served
    images = root / "ops-images" if (root / "ops-images").exists() else write_images(root / "dev-images")
    rc = train_main(
        "nem-u",
        ["--encoder", "onnx-mob", "--images", str(images), "--device", "gpu0", "--store", str(store), "--no-progress"],
    )
    assert rc == 2
    assert "device 'gpu0' is not one of cpu, cuda, cuda:N" in capsys.readouterr().err
