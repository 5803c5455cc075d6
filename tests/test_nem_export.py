"""Export: ONNX Runtime agrees with torch (bounded max abs difference), the graph contract, the store entry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xaiserve.handlers.loading import load_module
from xaiserve.handlers.nem import DecoderArch, NemT, NemU
from xaiserve.handlers.nem.build import arch_of
from xaiserve.handlers.nets import EncoderArch, FrozenSpec
from xaiserve.service.registry import Registry, RegistryConfig
from xaiserve.training.cli_nem import export_main, train_main
from xaiserve.training.nem_export import Publication, export_onnx, onnx_parity, ort_session, publish

TINY = EncoderArch(stem=4, widths=(8, 8, 8), blocks=(1, 1, 1))
PARITY_BOUND = 1e-4


def _nemu():
    torch.manual_seed(0)
    return NemU(FrozenSpec(TINY).build(), DecoderArch(widths=(8, 8))).eval()


def _nemt(conditional: bool):
    torch.manual_seed(0)
    model = NemT(
        FrozenSpec(TINY, num_classes=3).build(),
        DecoderArch(widths=(8, 8)),
        num_classes=3,
        conditional=conditional,
        smoothing=5,
    ).eval()
    if conditional:
        torch.nn.init.normal_(model.decoders[0].film.weight, std=0.3)
    return model


def test_nemu_onnx_matches_torch_with_a_dynamic_batch(tmp_path):
    model = _nemu()
    path = export_onnx(model, "nem_u", tmp_path / "m.onnx", (torch.randn(2, 3, 32, 32),))
    sess = ort_session(path)
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == ["mask", "output"]
    for b in (1, 5):
        x = torch.randn(b, 3, 32, 32)
        diff = onnx_parity(model, "nem_u", path, (x,))
        assert max(diff.values()) < PARITY_BOUND, diff
        mask, out = sess.run(None, {"image": x.numpy()})
        assert mask.shape == (b, 1, 32, 32) and out.shape == (b, 8)
        assert mask.min() >= 0 and mask.max() <= 1


@pytest.mark.parametrize("conditional", [False, True])
def test_nemt_onnx_matches_torch_and_honours_the_target(tmp_path, conditional):
    model = _nemt(conditional)
    x = torch.randn(4, 3, 32, 32)
    t = torch.tensor([-1, 0, 1, 2])
    path = export_onnx(model, "nemt", tmp_path / "t.onnx", (x, t))
    diff = onnx_parity(model, "nemt", path, (x, t))
    assert max(diff.values()) < PARITY_BOUND, diff
    sess = ort_session(path)
    assert [i.name for i in sess.get_inputs()] == ["image", "target"]
    mask, logits, label = sess.run(None, {"image": x[:3].numpy(), "target": np.array([-1, 2, 1], np.int64)})
    assert label.dtype == np.int64 and label.tolist() == [int(logits[0].argmax()), 2, 1]
    assert mask.shape == (3, 1, 32, 32)
    # deterministic serving: the same request gives the same mask
    again = sess.run(["mask"], {"image": x[:3].numpy(), "target": np.array([-1, 2, 1], np.int64)})[0]
    assert np.array_equal(mask, again)


def test_publish_writes_a_servable_store_entry(tmp_path):
    store = tmp_path / "store"
    enc = FrozenSpec(TINY)
    model = _nemu()
    pub = Publication(
        name="tiny-nemu",
        version="1",
        kind="nem_u",
        description="test model",
        input={"height": 32, "width": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3},
        labels=(),
        output_dim=8,
        arch=arch_of(model, enc.to_arch()),
        metrics={"relevance_mass": 0.5},
        card_sections={"Data": "synthetic test data"},
        explains="tiny-encoder:1",
    )
    entry = publish(store, pub, model)
    assert max(entry["metrics"]["onnx_max_abs_diff"].values()) < PARITY_BOUND
    manifest = json.loads((store / "manifest.json").read_text())
    assert [m["name"] for m in manifest["models"]] == ["tiny-nemu"]
    card = (store / "tiny-nemu/1/card.md").read_text()
    assert "code version" in card and "synthetic test data" in card and "max abs difference" in card
    reg = Registry(RegistryConfig(store=store, prefer_cuda=False))
    e = reg.resolve("tiny-nemu")
    onnx = reg.onnx(e)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    res = onnx.run({"image": x})
    back = load_module(e, store)
    with torch.no_grad():
        mask, out = back(torch.from_numpy(x))
    np.testing.assert_allclose(res["mask"], mask.numpy(), atol=PARITY_BOUND)
    np.testing.assert_allclose(res["output"], out.numpy(), atol=PARITY_BOUND)


def test_cli_rejects_bad_targets_and_missing_models(tmp_path, capsys):
    assert train_main("bogus", []) == 2
    assert export_main("bogus", []) == 2
    code = train_main("nem-u", ["--store", str(tmp_path), "--out", str(tmp_path / "runs"), "--no-progress"])
    assert code == 2
    assert "no manifest" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text('{"format": 1, "models": []}')
    assert train_main("nem-u", ["--store", str(tmp_path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 2
    assert "scenes-simclr:1 is not in" in capsys.readouterr().err
    assert export_main("nem-u", ["--out", str(tmp_path / "runs"), "--store", str(tmp_path)]) == 2
    assert "no trained result" in capsys.readouterr().err
