"""Masking networks for a user's CNN: NEM-U on the MobileNet-style encoder (TorchScript only) and
NEMt on the VGG-style classifier (ONNX + torch.export), trained for one epoch on a folder of
generated PNGs (class subfolders give NEMt its labels), exported as one ONNX graph, picked up by a
running server, and served: mask and output equal to the torch module rebuilt from the store's
files, at the request image's resolution.

The models take 96 x 128 inputs here (not square, to exercise that; 224 x 224 trains the same way,
about 5x slower, which a test on two shared cores cannot afford).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from tests.byom_nets import make, save_forms
from tests.serverutil import running_server
from tests.test_byom_serve import wait_for
from tests.tiny_models import build_store
from xaiserve.handlers.nem.decoder import DecoderArch
from xaiserve.handlers.nem.models import NemT, NemU
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service import cli_models
from xaiserve.service.images import decode_image, to_model_input
from xaiserve.service.registry import read_manifest
from xaiserve.service.tensors import from_tensor
from xaiserve.training.byom_nem import pyramid_model
from xaiserve.training.cli_nem import train_main

torch.set_num_threads(1)
pytestmark = pytest.mark.slow  # two trainings and exports: ~1 min on two shared cores

H, W = 96, 128
CLASSES = ("red", "green", "blue")
COLOURS = ((230, 40, 40), (40, 230, 40), (40, 40, 230))


def write_images(root: Path, per_class: int = 4) -> Path:
    """PNGs of several sizes (none the model's), a coloured rectangle per class on dark noise."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = (120, 160) if i % 2 else (90, 150)
            a = (rng.random((h, w, 3)) * 60).astype(np.uint8)
            y, x = int(rng.integers(5, h - 40)), int(rng.integers(5, w - 50))
            a[y : y + 35, x : x + 45] = COLOURS[c]
            PILImage.fromarray(a).save(root / name / f"{i}.png")
    return root


def png_bytes(h: int, w: int) -> bytes:
    a = (np.random.default_rng(1).random((h, w, 3)) * 60).astype(np.uint8)
    a[20:60, 30:80] = COLOURS[0]
    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("nem")
    store = build_store(root / "store", slow=False)
    vgg = save_forms(make("vgg", size=(H, W)), root / "vgg", size=(H, W), in_name="input", out_name="logits")
    mob = save_forms(make("mobile", size=(H, W)), root / "mobile", size=(H, W))
    (root / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    assert (
        cli_models.main(
            [
                "add",
                "vgg",
                str(vgg["onnx"]),
                "--torch",
                str(vgg["exported_program"]),
                "--kind",
                "classifier",
                "--labels",
                str(root / "labels.txt"),
                "--store",
                str(store),
            ]
        )
        == 0
    )
    assert (
        cli_models.main(
            [
                "add",
                "mob",
                str(mob["torchscript"]),
                "--kind",
                "encoder",
                "--input",
                f"3x{H}x{W}",
                "--resize",
                "letterbox",
                "--store",
                str(store),
            ]
        )
        == 0
    )
    images = write_images(root / "images")
    with running_server(store, reload_interval_s=0.2, job_workers=0) as srv:
        common = [
            "--images",
            str(images),
            "--epochs",
            "1",
            "--batch-size",
            "6",
            "--store",
            str(store),
            "--no-progress",
            "--threads",
            "1",
        ]
        assert train_main("nem-u", ["--encoder", "mob", *common]) == 0
        assert train_main("nemt", ["--classifier", "vgg:1", *common]) == 0
        yield srv, srv.stub(), store


def _rebuilt(store: Path, name: str) -> torch.nn.Module:
    """The masking network as a torch module, from the store's files: the frozen model's torch form,
    tapped as the card says, with the trained decoder weights."""
    entries = {e.id: e for e in read_manifest(store)}
    nem = entries[f"{name}:1"]
    frozen = pyramid_model(entries[nem.explains], store, [t["layer"] for t in nem.arch["frozen"]["taps"]])
    dec = DecoderArch.from_dict(nem.arch["decoder"])
    model = (
        NemU(frozen, dec)
        if nem.kind == "nem_u"
        else NemT(
            frozen,
            dec,
            num_classes=nem.arch["num_classes"],
            conditional=nem.arch["conditional"],
            smoothing=nem.arch["smoothing"],
        )
    )
    state = torch.load(store / nem.files["decoder_state"], weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("frozen.") for k in missing)
    return model.eval()


def test_trained_masking_networks_are_published_with_cards(trained):
    _, _, store = trained
    entries = {e.id: e for e in read_manifest(store)}
    nemu, nemt = entries["mob-nemu:1"], entries["vgg-nemt:1"]
    assert nemu.kind == "nem_u" and nemu.explains == "mob:1" and nemt.explains == "vgg:1"
    assert (nemu.input.height, nemu.input.width, nemu.input.resize) == (H, W, "letterbox")
    assert [t["stride"] for t in nemu.arch["frozen"]["taps"]] == [2, 4, 8, 16, 32]
    for e in (nemu, nemt):
        assert max(e.metrics["onnx_max_abs_diff"].values()) < 1e-4
        assert e.metrics["training_seconds"] > 0 and "test" in e.metrics
        card = (store / e.files["card"]).read_text()
        assert "Held-out metrics" in card and "s per 1000 images" in card and "probe forward pass" in card
    assert "Labels: folders" in (store / nemt.files["card"]).read_text()


@pytest.mark.parametrize("name", ["mob-nemu", "vgg-nemt"])
def test_served_mask_and_output_equal_the_torch_module(trained, name):
    _, stub, store = trained
    info = wait_for(stub, f"{name}:1")
    assert info.available and info.kind in ("nem_u", "nemt")
    model = _rebuilt(store, name)
    image = png_bytes(H * 2, W * 2)  # the model's aspect ratio: the fit is a plain resize
    r = stub.Explain(
        pb.ExplainRequest(model=name, image=pb.Image(encoded=image), options=pb.ExplainOptions(return_output=True)),
        timeout=60,
    )
    entry = {e.id: e for e in read_manifest(store)}[f"{name}:1"]
    x = torch.from_numpy(to_model_input(decode_image(pb.Image(encoded=image)), entry.input))[None]
    with torch.no_grad():
        out = model(x) if info.kind == "nem_u" else model(x, torch.tensor([-1]))
    mask, output = out[0][0, 0].numpy(), out[1][0].numpy()
    got = from_tensor(r.mask)
    assert got.shape == (H * 2, W * 2)
    # the served mask is mapped back to the 192 x 256 image; downsampled again it is the model's mask
    small = np.asarray(PILImage.fromarray(got).resize((W, H), PILImage.BILINEAR))
    assert np.abs(small - mask).max() < 0.05
    np.testing.assert_allclose(from_tensor(r.output), output, atol=1e-4)
    if info.kind == "nemt":
        assert r.target_label == int(output.argmax())
    # another size and aspect ratio comes back at its own size
    r2 = stub.Explain(pb.ExplainRequest(model=name, image=pb.Image(encoded=png_bytes(70, 200))), timeout=60)
    assert from_tensor(r2.mask).shape == (70, 200)


def test_training_refuses_a_model_without_torch_form_and_bad_folders(trained, tmp_path, capsys):
    _, _, store = trained
    (tmp_path / "one").mkdir()
    assert (
        train_main(
            "nem-u", ["--encoder", "mob", "--images", str(tmp_path / "one"), "--store", str(store), "--no-progress"]
        )
        == 2
    )
    assert "holds 0 image(s)" in capsys.readouterr().err
    assert (
        train_main(
            "nem-u", ["--encoder", "tiny-encoder", "--images", str(tmp_path), "--store", str(store), "--no-progress"]
        )
        == 2
    )
    assert "needs its torch form" in capsys.readouterr().err
    bad = write_images(tmp_path / "wrong")
    (bad / "red").rename(bad / "purple")
    assert (
        train_main("nemt", ["--classifier", "vgg", "--images", str(bad), "--store", str(store), "--no-progress"]) == 2
    )
    assert "label 'purple' is not one of the model's classes (red, green, blue)" in capsys.readouterr().err
    assert (
        train_main(
            "nem-u",
            ["--encoder", "mob", "--images", str(bad), "--taps", "nope", "--store", str(store), "--no-progress"],
        )
        == 2
    )
    assert "tap 'nope' is not a 4-D activation" in capsys.readouterr().err
    assert json.loads((store / "manifest.json").read_text())  # untouched and readable
