"""Tiny stand-in models with the model-store contract (service/registry.py), built in seconds.

They let the service tests run on a store the test controls: a frozen small CNN encoder and a
decoder exported to ONNX as a NEM-U graph, a classifier and a NEMt graph, and a deliberately slow
mask model (a wide convolution stack) for the streaming tests. The real default models in
model_store/ are exercised by their own end-to-end tests.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from xaiserve.service.modelstore import add_entry

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


class TinyEncoder(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU()
        )
        self.head = nn.Linear(8, dim)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


class TinyNemU(nn.Module):
    """Mask = sigmoid of a fixed linear function of the input; output = the encoder's embedding."""

    def __init__(self, encoder: nn.Module, width: int = 8, depth: int = 1):
        super().__init__()
        self.encoder = encoder
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(width, 1, 3, padding=1)]
        self.dec = nn.Sequential(*layers)

    def forward(self, image):
        return torch.sigmoid(self.dec(image)), self.encoder(image)


class TinyNemT(nn.Module):
    def __init__(self, classifier: nn.Module, classes: int):
        super().__init__()
        self.classifier = classifier
        self.dec = nn.Conv2d(3, classes, 3, padding=1)

    def forward(self, image, target):
        logits = self.classifier(image)
        label = torch.where(target < 0, logits.argmax(dim=1), target)
        maps = torch.sigmoid(self.dec(image))
        idx = label.view(-1, 1, 1, 1).expand(-1, 1, maps.shape[2], maps.shape[3])
        return torch.gather(maps, 1, idx), logits, label


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={n: {0: "batch"} for n in inputs + outputs},
            dynamo=False,
            opset_version=17,
        )


def _entry(name: str, kind: str, size: int, **kw) -> dict:
    return {
        "name": name,
        "version": kw.pop("version", "1"),
        "kind": kind,
        "files": {"onnx": f"{name}/{kw.get('v', '1')}/model.onnx"},
        "input": {"height": size, "width": size, "channels": 3, "mean": MEAN, "std": STD},
        **kw,
    }


def build_store(root: Path, size: int = 32, slow: bool = True) -> Path:
    """Write a model store with tiny-encoder, tiny-nemu, tiny-classifier, tiny-nemt (and slow-nemu)."""
    torch.manual_seed(0)
    x = torch.zeros(1, 3, size, size)
    enc = TinyEncoder()
    _export(enc, (x,), root / "tiny-encoder/1/model.onnx", ["image"], ["output"])
    add_entry(root, _entry("tiny-encoder", "encoder", size, output_dim=16, description="tiny test encoder"))
    _export(TinyNemU(enc), (x,), root / "tiny-nemu/1/model.onnx", ["image"], ["mask", "output"])
    add_entry(root, _entry("tiny-nemu", "nem_u", size, output_dim=16, explains="tiny-encoder:1"))
    clf = nn.Sequential(TinyEncoder(3))
    _export(clf, (x,), root / "tiny-classifier/1/model.onnx", ["image"], ["output"])
    labels = ["a", "b", "c"]
    add_entry(root, _entry("tiny-classifier", "classifier", size, output_dim=3, labels=labels))
    _export(
        TinyNemT(clf, 3),
        (x, torch.tensor([-1])),
        root / "tiny-nemt/1/model.onnx",
        ["image", "target"],
        ["mask", "output", "label"],
    )
    add_entry(root, _entry("tiny-nemt", "nemt", size, output_dim=3, labels=labels, explains="tiny-classifier:1"))
    if slow:
        _export(
            TinyNemU(enc, width=96, depth=6),
            (torch.zeros(1, 3, 64, 64),),
            root / "slow-nemu/1/model.onnx",
            ["image"],
            ["mask", "output"],
        )
        add_entry(root, _entry("slow-nemu", "nem_u", 64, output_dim=16, explains="tiny-encoder:1"))
    return root


def perturbed_denoiser(config, seed: int = 0):
    """A spiral/cartesian `Denoiser` (eval mode) whose batch-norm statistics, affine terms and
    output gain are off their defaults, so that folding and ordering mistakes show in outputs."""
    from xaiserve.handlers.denoise.networks import Denoiser

    torch.manual_seed(seed)
    m = Denoiser(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
                mod.weight.copy_(torch.rand(c, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(c, generator=g) * 0.2)
        m.gain.fill_(0.7)
    return m.eval()
