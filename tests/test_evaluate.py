"""The explanation evaluation harness end to end on a tiny model store (seconds).

The store follows the real contract: frozen models are handlers.nets modules (state dict + arch, so
Registry.torch_module rebuilds them) with their ONNX graphs; the masking networks are small ONNX
graphs with the nem_u / nemt I/O of service/registry.py. Nothing is mocked: the harness loads them
through the Registry, renders the real datasets at 32 x 32, and scores the real methods.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from xaiserve.handlers.nets import EncoderArch, FrozenSpec
from xaiserve.handlers.saliency import methods_for
from xaiserve.service.modelstore import add_entry
from xaiserve.service.registry import Registry, RegistryConfig
from xaiserve.training import metrics as M
from xaiserve.training.cli_eval import evaluate_main
from xaiserve.training.datasets.lesions import LESION_LABELS
from xaiserve.training.evaluate_explanations import (
    RANDOM_ROW,
    EvalConfig,
    evaluate,
    markdown_table,
    relax_api,
    write_report,
)

# end-to-end evaluations with trained tiny models
pytestmark = pytest.mark.slow

SIZE = 32
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
ARCH = EncoderArch(stem=4, widths=(8, 8), blocks=(1, 1))


class MaskU(nn.Module):
    """nem_u contract: image -> mask [B,1,H,W], output [B,D] (the frozen encoder's embedding)."""

    def __init__(self, frozen: nn.Module):
        super().__init__()
        self.frozen = frozen
        self.dec = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, image):
        return torch.sigmoid(self.dec(image)), self.frozen(image)


class MaskT(nn.Module):
    """nemt contract: image, target -> mask, logits, label (one decoder channel per class)."""

    def __init__(self, frozen: nn.Module, classes: int):
        super().__init__()
        self.frozen = frozen
        self.dec = nn.Conv2d(3, classes, 3, padding=1)

    def forward(self, image, target):
        logits = self.frozen(image)
        label = torch.where(target < 0, logits.argmax(dim=1), target)
        maps = torch.sigmoid(self.dec(image))
        idx = label.view(-1, 1, 1, 1).expand(-1, 1, maps.shape[2], maps.shape[3])
        return torch.gather(maps, 1, idx), logits, label


def _export(module, args, path: Path, names_in, names_out) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=names_in,
            output_names=names_out,
            dynamic_axes={n: {0: "batch"} for n in names_in + names_out},
            dynamo=False,
            opset_version=17,
        )


def _add(store: Path, name: str, kind: str, module: nn.Module, args, names_in, names_out, **extra) -> None:
    _export(module, args, store / name / "1" / "model.onnx", names_in, names_out)
    files = {"onnx": f"{name}/1/model.onnx"}
    if kind in ("encoder", "classifier"):
        torch.save(module.state_dict(), store / name / "1" / "weights.pt")
        files["state_dict"] = f"{name}/1/weights.pt"
    add_entry(
        store,
        {
            "name": name,
            "version": "1",
            "kind": kind,
            "files": files,
            "input": {"height": SIZE, "width": SIZE, "channels": 3, "mean": MEAN, "std": STD},
            **extra,
        },
    )


def build_eval_store(root: Path) -> Path:
    """tiny-simclr (encoder) + tiny-nemu, tiny-classifier (lesion classes) + tiny-nemt, at 32 x 32."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, SIZE, SIZE)
    enc_spec = FrozenSpec(encoder=ARCH)
    enc = enc_spec.build().eval()
    _add(
        root,
        "tiny-simclr",
        "encoder",
        enc,
        (x,),
        ["image"],
        ["output"],
        arch=enc_spec.to_arch(),
        output_dim=ARCH.embed_dim,
    )
    _add(
        root,
        "tiny-nemu",
        "nem_u",
        MaskU(enc),
        (x,),
        ["image"],
        ["mask", "output"],
        explains="tiny-simclr:1",
        output_dim=ARCH.embed_dim,
    )
    k = len(LESION_LABELS)
    clf_spec = FrozenSpec(encoder=ARCH, num_classes=k)
    clf = clf_spec.build().eval()
    _add(
        root,
        "tiny-classifier",
        "classifier",
        clf,
        (x,),
        ["image"],
        ["output"],
        arch={**clf_spec.to_arch(), "dataset": "lesions"},
        output_dim=k,
        labels=list(LESION_LABELS),
    )
    _add(
        root,
        "tiny-nemt",
        "nemt",
        MaskT(clf, k),
        (x, torch.tensor([-1])),
        ["image", "target"],
        ["mask", "output", "label"],
        explains="tiny-classifier:1",
        output_dim=k,
        labels=list(LESION_LABELS),
    )
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return build_eval_store(tmp_path_factory.mktemp("store"))


SMALL_SPLIT = {"train": 4, "val": 4, "test": 6}


def _config(store: Path, out: Path, dataset: str, mask_models: tuple[str, ...], **kw) -> EvalConfig:
    return EvalConfig(
        dataset=dataset,
        out=out,
        n=4,
        store=store,
        mask_models=mask_models,
        relax_masks=40,
        relax_batch=20,
        quiet=True,
        split_sizes=SMALL_SPLIT,
        **kw,
    )


def test_scenes_encoder_end_to_end(store, tmp_path):
    cfg = _config(store, tmp_path, "scenes", ("tiny-nemu",))
    res = evaluate(cfg)
    names = [r.name for r in res.rows]
    assert res.kind == "encoder" and res.frozen == "tiny-simclr:1" and res.n == 4
    assert names[0] == "tiny-nemu" and names[-1] == RANDOM_ROW
    assert len([r for r in res.rows if r.family == "gradient"]) == len(methods_for("encoder"))
    relax_available = relax_api()[0] is not None
    assert ("RELAX" in names and "U-RELAX" in names) == relax_available
    if not relax_available:
        assert any("RELAX and U-RELAX rows left out" in n for n in res.notes)
    for r in res.rows:
        assert r.maps.shape == (4, SIZE, SIZE)
        s = r.scores
        for key in ("pointing_game", "relevance_rank", "relevance_mass", "sparseness"):
            assert np.all((s[key] >= 0) & (s[key] <= 1)), (r.name, key)
        assert np.all(s["complexity"] <= np.log(SIZE * SIZE) + 1e-9)
        assert np.all(np.abs(s["fidelity"]) <= 1 + 1e-6)
        assert np.all(r.seconds > 0)
        assert "monotonicity" not in s  # encoders: no classifier, no monotonicity

    # the harness scores the map of image i against the ground truth of image i: recompute NEM-U's
    # numbers independently from the registry's ONNX session and the dataset split
    from xaiserve.training.datasets import get_dataset

    split = get_dataset("scenes", size=SIZE, sizes=SMALL_SPLIT).split("test")
    x = (torch.from_numpy(split.images[:4]).float() / 255 - 0.5) / 0.25
    sess = Registry(RegistryConfig(store=store, prefer_cuda=False)).onnx("tiny-nemu")
    masks = sess.run({"image": x.numpy()})["mask"][:, 0]
    nemu = res.rows[0]
    np.testing.assert_allclose(nemu.maps, masks, atol=1e-5)
    np.testing.assert_allclose(nemu.scores["relevance_mass"], M.relevance_mass(masks, split.masks[:4]), atol=1e-6)
    np.testing.assert_array_equal(res.gt, split.masks[:4])

    paths = write_report(res, tmp_path, examples=2)
    md = paths["markdown"].read_text()
    assert md == markdown_table(res)
    for r in res.rows:
        assert f"| {r.name} |" in md
    assert "relevance mass" in md and "acc./complexity" in md and "s / image" in md
    data = json.loads(paths["json"].read_text())
    assert data["settings"]["frozen"] == "tiny-simclr:1"
    assert set(data["results"]) == set(names)
    from PIL import Image

    with Image.open(paths["png"]) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 0  # 2 rows, 2 + len(rows) columns


def test_lesions_classifier_cli(store, tmp_path, capsys):
    out = tmp_path / "out"
    code = evaluate_main(
        "explanations",
        [
            "--dataset",
            "lesions",
            "--n",
            "3",
            "--out",
            str(out),
            "--store",
            str(store),
            "--mask-models",
            "tiny-nemt",
            "--relax-masks",
            "20",
            "--relax-batch",
            "10",
            "--monotonicity-patch",
            "8",
            "--monotonicity-samples",
            "1",
            "--methods",
            "saliency,gradcam,integrated_gradients",
            "--examples",
            "2",
            "--quiet",
        ],
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "| tiny-nemt |" in printed and "| GradCAM |" in printed and "| Integrated Gradients |" in printed
    data = json.loads((out / "explanations_lesions.json").read_text())
    assert data["settings"]["kind"] == "classifier" and data["settings"]["target"] == "true label"
    for name, cols in data["results"].items():
        assert -1 <= cols["monotonicity"]["mean"] <= 1, name
        assert 0 <= cols["fidelity"]["mean"] <= 1 + 1e-6, name  # cosine of probability vectors
        assert cols["seconds"]["n"] == 3
    assert (out / "explanations_lesions.png").stat().st_size > 0


def test_cli_bad_input(store, tmp_path, capsys):
    assert evaluate_main("metrics", []) == 2
    assert "unknown target" in capsys.readouterr().err
    base = ["--dataset", "scenes", "--n", "2", "--out", str(tmp_path), "--store", str(store), "--quiet"]
    assert evaluate_main("explanations", base + ["--methods", "saliency,occlusion"]) == 2
    err = capsys.readouterr().err
    assert "occlusion" in err and "gradient_shap" in err
    assert evaluate_main("explanations", base + ["--mask-models", "no-such-model"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    # the frozen model of tiny-nemt is a classifier; asking for it against tiny-simclr is refused
    assert evaluate_main("explanations", base + ["--mask-models", "tiny-nemt", "--frozen", "tiny-simclr"]) == 2
    assert "explains tiny-classifier:1" in capsys.readouterr().err
    # a model trained on lesions is not evaluated on scenes
    assert evaluate_main("explanations", base + ["--mask-models", "tiny-nemt"]) == 2
    assert "trained on lesions, not scenes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main("explanations", ["--dataset", "mnist"])
