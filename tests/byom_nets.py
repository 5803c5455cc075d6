"""Two user architectures that are not handlers.nets's, built in the tests, and their files.

- VGGish: plain conv-ReLU pairs with max-pooling, pooling to 7 x 7 (at 224 px) and a fully connected head (VGG layout).
- MobileNetish: 7x7 stride-2 stem, max-pool, depthwise-separable blocks with batch norm, projection
  head (encoder).

Widths are small so a forward pass at 224 x 224 takes milliseconds on a CPU core. The batch norm
statistics are measured on random images, so eval-mode normalisation is not the identity (a
training-mode export would differ visibly).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


class VGGish(nn.Module):
    def __init__(self, classes: int = 3, widths: tuple[int, ...] = (4, 8, 8), pool: tuple[int, int] = (7, 7)):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for w in widths:
            layers += [
                nn.Conv2d(c, w, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c = w
        self.features = nn.Sequential(*layers)
        # VGG's 7 x 7 (at 224 x 224; input / 32 in general, which ONNX exports as a plain average pool)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c * pool[0] * pool[1], 16), nn.ReLU(), nn.Linear(16, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish}


class Separable(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: str = "relu"):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = ACTIVATIONS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn2(self.pw(self.act(self.bn1(self.dw(x))))))


class MobileNetish(nn.Module):
    """act: the blocks' activation, "relu", "relu6" (MobileNet v1/v2) or "hardswish" (MobileNet v3)."""

    def __init__(self, dim: int = 16, act: str = "relu"):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), ACTIVATIONS[act](), nn.MaxPool2d(3, 2, 1)
        )
        self.blocks = nn.Sequential(
            Separable(8, 12, 1, act), Separable(12, 16, 2, act), Separable(16, 24, 2, act), Separable(24, 32, 2, act)
        )
        self.head = nn.Sequential(nn.Linear(32, 32), ACTIVATIONS[act](), nn.Linear(32, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def make(arch: str, seed: int = 0, size: tuple[int, int] = (224, 224), act: str = "relu") -> nn.Module:
    """A randomly initialised network whose output depends visibly on its input: He-initialised
    convolutions, and batch-norm statistics measured on random images (as training would leave
    them; with default statistics the random MobileNet's embedding is the same for every image)."""
    torch.manual_seed(seed)
    m = VGGish(pool=(max(1, size[0] // 32), max(1, size[1] // 32))) if arch == "vgg" else MobileNetish(act=act)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    if bns:
        g = torch.Generator().manual_seed(seed + 1)
        for bn in bns:
            bn.momentum = None  # cumulative average over the calibration batches
        m.train()
        with torch.no_grad():
            for _ in range(2):
                m(torch.rand(4, 3, *size, generator=g))
        for bn in bns:
            bn.momentum = 0.1
    return m.eval()


def save_forms(
    module: nn.Module,
    out: Path,
    size: tuple[int, int] = (224, 224),
    *,
    in_name: str = "input",
    out_name: str = "logits",
    static_batch: bool = False,
) -> dict[str, Path]:
    """model.onnx (IO names in_name/out_name, dynamic batch), model.ts (traced), model.pt2 (exported)."""
    out.mkdir(parents=True, exist_ok=True)
    x = torch.randn(2, 3, *size)
    paths = {"onnx": out / "model.onnx", "torchscript": out / "model.ts", "exported_program": out / "model.pt2"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            str(paths["onnx"]),
            input_names=[in_name],
            output_names=[out_name],
            dynamic_axes=None if static_batch else {in_name: {0: "b"}, out_name: {0: "b"}},
            opset_version=17,
            dynamo=False,
        )
        torch.jit.save(torch.jit.trace(module, x), str(paths["torchscript"]))
        dyn = None if static_batch else ({0: torch.export.Dim("batch")},)
        torch.export.save(torch.export.export(module, (x,), dynamic_shapes=dyn), str(paths["exported_program"]))
    return paths


class OpsNet(nn.Module):
    """A classifier whose ONNX graph holds the common CNN ops a converter must handle: Conv (plain and
    depthwise), BatchNormalization (after an Add, so the exporter cannot fold it into a Conv), Relu,
    Clip(0, 6) (ReLU6), HardSwish, Sigmoid (squeeze-excite), GlobalAveragePool, AveragePool, MaxPool,
    Concat, Mul, Add, Flatten, Reshape (its target computed from Shape, as `x.reshape(x.shape[0], -1)`
    exports), Gemm and MatMul. Input 3 x 64 x 64."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 2, 1)
        self.a1 = nn.ReLU6()
        self.dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
        self.hs = nn.Hardswish()
        self.bn = nn.BatchNorm2d(16)
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 4, 1), nn.ReLU(), nn.Conv2d(4, 16, 1), nn.Sigmoid()
        )
        self.c2 = nn.Conv2d(16, 16, 3, 2, 1)
        self.ap = nn.AvgPool2d(2)
        self.mp = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 2 * 2, 12)
        self.proj = nn.Parameter(torch.randn(12, classes) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a1(self.c1(x))  # 32 x 32
        z = self.hs(self.dw(y))
        c = torch.cat([y, z], 1)
        c = self.bn(c * self.se(c) + c)
        c = torch.relu(self.c2(c))  # 16 x 16
        c = self.mp(self.ap(self.mp(c)))  # 2 x 2
        f = c.reshape(c.shape[0], -1)
        h = torch.clamp(self.fc(f), 0.0, 6.0)
        return torch.matmul(h, self.proj) + torch.flatten(c, 1)[:, :1]


def make_ops_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = OpsNet()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()
