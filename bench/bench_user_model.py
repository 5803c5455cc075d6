"""A user's ResNet-18-layout encoder at 224 x 224, brought in with `xaiserve models add`: what it costs.

    python bench/bench_user_model.py [--width 1.0] [--images 48] [--epochs 1] [--rounds 7] [--threads 1] [--export pt2|ts]
    (`xaiserve bench user_model ...`; --width 0.25 runs in about 30 s)

1. builds a ResNet-18-layout encoder in plain torch (7x7 stride-2 stem, max-pool, 4 stages of 2 basic
   blocks, 64..512 channels x --width, global pool, 128-d projection head), saves it as torch.export
   (or TorchScript) and adds it to a temporary store with `xaiserve models add` (ONNX exported there);
2. trains its NEM-U masking network on a folder of generated 224 x 224 PNGs with
   `xaiserve train nem-u --images` (pyramid found by the probe, strides 2..32) and reports training
   seconds per 1000 images;
3. times, in interleaved rounds at batch 1: the NEM-U graph (mask + output from one pass) and the bare
   frozen ONNX graph in ONNX Runtime, and every gradient method on the torch form against the bare
   ONNX forward (and the bare torch forward).

Prints ratios measured in this one run (the goal for NEM-U / bare forward: <= 1.3x). No timed
assertions; the shared machines make absolute times noisy, the ratios less so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xaiserve.paths import checkout_root  # noqa: E402

sys.path.insert(0, str(checkout_root()))

GOAL = 1.3


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18Encoder(nn.Module):
    """torchvision's resnet18 layout (no torchvision here), with a projection head instead of fc."""

    def __init__(self, width: float = 1.0, dim: int = 128):
        super().__init__()
        w = [max(8, int(c * width)) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(
            nn.Conv2d(3, w[0], 7, 2, 3, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        layers, cin = [], w[0]
        for i, c in enumerate(w):
            layers.append(nn.Sequential(Block(cin, c, 1 if i == 0 else 2), Block(c, c, 1)))
            cin = c
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(cin, 256), nn.ReLU(), nn.Linear(256, dim))

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))


def build(width: float) -> nn.Module:
    torch.manual_seed(0)
    m = ResNet18Encoder(width)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    m.train()
    with torch.no_grad():  # batch-norm statistics from random images, as training would leave them
        for bn in (b for b in m.modules() if isinstance(b, nn.BatchNorm2d)):
            bn.momentum = None
        m(torch.rand(8, 3, 224, 224))
        for bn in (b for b in m.modules() if isinstance(b, nn.BatchNorm2d)):
            bn.momentum = 0.1
    return m.eval()


def write_images(root: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        a = (rng.random((224, 224, 3)) * 70).astype(np.uint8)
        y, x = (int(v) for v in rng.integers(10, 150, 2))
        a[y : y + 60, x : x + 60] = rng.integers(120, 255, 3)
        Image.fromarray(a).save(root / f"{i}.png")
    return root


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 = ResNet-18's 64..512)")
    ap.add_argument("--images", type=int, default=48, help="generated training images")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    ap.add_argument("--reps", type=int, default=5, help="ONNX Runtime runs per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--export", choices=("pt2", "ts"), default="pt2")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store (its path is printed)")
    ap.add_argument(
        "--methods",
        default="saliency,guided_backprop,smoothgrad,integrated_gradients,gradient_shap,gradcam,label_free_saliency",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from xaiserve.handlers import saliency
    from xaiserve.handlers.loading import load_module
    from xaiserve.service import cli_models
    from xaiserve.service.registry import OnnxModel, read_manifest
    from xaiserve.training.cli_nem import train_main

    tmp = Path(tempfile.mkdtemp(prefix="bench-user-"))
    store = tmp / "store"
    model = build(args.width)
    x = torch.randn(2, 3, 224, 224)
    path = tmp / ("model.pt2" if args.export == "pt2" else "model.ts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.export == "pt2":
            torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b")},)), str(path))
        else:
            torch.jit.save(torch.jit.trace(model, x), str(path))
    t0 = time.perf_counter()
    assert (
        cli_models.main(
            [
                "add",
                "user-resnet18",
                str(path),
                "--kind",
                "encoder",
                "--input",
                "3x224x224",
                "--mean",
                "imagenet",
                "--std",
                "imagenet",
                "--store",
                str(store),
            ]
        )
        == 0
    )
    add_s = time.perf_counter() - t0
    images = write_images(tmp / "images", args.images)
    assert (
        train_main(
            "nem-u",
            [
                "--encoder",
                "user-resnet18",
                "--images",
                str(images),
                "--epochs",
                str(args.epochs),
                "--batch-size",
                "8",
                "--store",
                str(store),
                "--no-progress",
                "--threads",
                str(args.threads),
            ],
        )
        == 0
    )
    entries = {e.id: e for e in read_manifest(store)}
    frozen_e, nem_e = entries["user-resnet18:1"], entries["user-resnet18-nemu:1"]

    frozen = OnnxModel(
        store / frozen_e.files["onnx"], intra_op_threads=args.threads, prefer_cuda=False, kind="encoder", io=frozen_e.io
    )
    nem = OnnxModel(store / nem_e.files["onnx"], intra_op_threads=args.threads, prefer_cuda=False, kind="nem_u")
    torch_form = load_module(frozen_e, store)
    x1 = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    xt = torch.from_numpy(x1)
    methods = [m for m in args.methods.split(",") if m]

    def ort(session):
        def run():
            for _ in range(args.reps):
                session.run({"image": x1})

        return run

    def torch_forward():
        with torch.no_grad():
            torch_form(xt)

    contestants = {
        "onnx_forward": (ort(frozen), args.reps),
        "nem_u_onnx": (ort(nem), args.reps),
        "torch_forward": (torch_forward, 1),
    }
    for m in methods:
        contestants[m] = ((lambda m=m: saliency.attribute(m, torch_form, xt, kind="encoder")), 1)
    for fn, _ in contestants.values():  # warm-up (first calls compile / allocate)
        fn()
    times: dict[str, list[float]] = {k: [] for k in contestants}
    for _ in range(args.rounds):
        for name, (fn, per) in contestants.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) / per)
    base = statistics.median(times["onnx_forward"])
    tbase = statistics.median(times["torch_forward"])
    report = {
        "model": f"ResNet-18 layout x{args.width} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), "
        f"224 x 224, {args.export}, {args.threads} thread(s)",
        "taps": [(t["layer"], t["stride"], t["channels"]) for t in nem_e.arch["frozen"]["taps"]],
        "ms": {k: median_ms(v) for k, v in times.items()},
        "nem_u_over_bare_forward": round(statistics.median(times["nem_u_onnx"]) / base, 3),
        "goal": GOAL,
        "gradient_over_onnx_forward": {m: round(statistics.median(times[m]) / base, 2) for m in methods},
        "gradient_over_torch_forward": {m: round(statistics.median(times[m]) / tbase, 2) for m in methods},
        "training_seconds_per_1000_images": nem_e.metrics["seconds_per_1000_images"],
        "models_add_seconds": round(add_s, 1),
        "store": str(store) if args.keep else "(removed; --keep keeps it)",
    }
    print(json.dumps(report, indent=2))
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
