"""A small ResNet-style encoder in plain torch that exposes its feature pyramid, and a classifier on it.

The pyramid (one tap per resolution: the stem at full resolution, then one per stage at 1/2, 1/4,
1/8) is what the NEM-U decoder uses as U-Net skip connections ([NEM-U], sec. 3.3: "the frozen model
acts as the U-Net encoder"). Both modules share one interface used by the masking networks:

    features(x) -> (output, pyramid)   output = embedding [B,D] (encoder) or logits [B,K] (classifier)
    pyramid_channels: tuple[int, ...]  channels of the pyramid taps, shallow to deep
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ARCH_TYPE = "resnet_pyramid"


@dataclass(frozen=True)
class EncoderArch:
    """Encoder shape. Defaults give ~0.3 M parameters and ~12 M multiply-adds at 64 x 64."""

    in_channels: int = 3
    stem: int = 16
    widths: tuple[int, ...] = (32, 64, 128)
    blocks: tuple[int, ...] = (1, 1, 1)

    @property
    def embed_dim(self) -> int:
        return self.widths[-1]

    @property
    def pyramid_channels(self) -> tuple[int, ...]:
        return (self.stem, *self.widths)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"], d["blocks"] = list(self.widths), list(self.blocks)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "EncoderArch":
        return EncoderArch(
            in_channels=int(d.get("in_channels", 3)),
            stem=int(d["stem"]),
            widths=tuple(int(v) for v in d["widths"]),
            blocks=tuple(int(v) for v in d["blocks"]),
        )


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs, batch norm, identity or 1x1 projection shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class PyramidEncoder(nn.Module):
    """x [B,C,H,W] (normalised) -> embedding [B,D] (global average pool of the last stage)."""

    kind = "encoder"

    def __init__(self, arch: EncoderArch = EncoderArch()):
        super().__init__()
        self.arch = arch
        self.stem = nn.Sequential(
            nn.Conv2d(arch.in_channels, arch.stem, 3, 1, 1, bias=False), nn.BatchNorm2d(arch.stem), nn.ReLU()
        )
        stages = []
        cin = arch.stem
        for w, nb in zip(arch.widths, arch.blocks):
            blocks = [BasicBlock(cin, w, 2)] + [BasicBlock(w, w, 1) for _ in range(nb - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.pyramid_channels = arch.pyramid_channels
        self.output_dim = arch.embed_dim

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(x)]
        for st in self.stages:
            feats.append(st(feats[-1]))
        return feats

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = self.pyramid(x)
        return feats[-1].mean(dim=(2, 3)), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0]


class PyramidClassifier(nn.Module):
    """Encoder + linear head: x -> logits [B,K]; `embed` gives the pooled features."""

    kind = "classifier"

    def __init__(self, arch: EncoderArch, num_classes: int):
        super().__init__()
        self.encoder = PyramidEncoder(arch)
        self.head = nn.Linear(arch.embed_dim, num_classes)
        self.pyramid_channels = self.encoder.pyramid_channels
        self.output_dim = num_classes
        self.num_classes = num_classes

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z, feats = self.encoder.features(x)
        return self.head(z), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0]


@dataclass(frozen=True)
class FrozenSpec:
    """What the manifest's `arch` says about a frozen model (the `handlers.nets` rebuild recipe)."""

    encoder: EncoderArch = field(default_factory=EncoderArch)
    num_classes: int = 0  # 0 = encoder (no head)

    def to_arch(self) -> dict[str, Any]:
        d = {
            "type": ARCH_TYPE,
            **self.encoder.to_dict(),
            "pyramid": list(self.encoder.pyramid_channels),
            "pyramid_strides": [2**i for i in range(len(self.encoder.pyramid_channels))],
        }
        if self.num_classes:
            d["num_classes"] = self.num_classes
        return d

    def build(self) -> nn.Module:
        return PyramidClassifier(self.encoder, self.num_classes) if self.num_classes else PyramidEncoder(self.encoder)
