"""U-Net decoder on a frozen encoder's feature pyramid ([NEM-U], sec. 3.3), optionally class-conditional.

The decoder starts at the deepest pyramid level, and at each shallower level upsamples x2, concatenates
the skip tap and applies a 3x3 conv + batch norm + ReLU (as in standard U-Net decoders; without the
norm, the unnormalised activations of a frozen classifier let one Prodigy run blow the mask logits up
to -1e5, a dead all-zero mask). A 1x1 conv gives one logit per pixel; a sigmoid makes the
mask (sec. 4.1: "a sigmoid activation function was applied in the final layer"); if the shallowest tap
is coarser than the input, the logits are bilinearly upsampled to the input resolution first.

Class-conditional variant (beyond the papers; METHODS.md "Known limit"): FiLM. A learned table maps
the target label to a per-channel scale and shift for every decoder block: h <- h * (1 + gamma_c) + beta_c,
so a single network can explain any label.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderArch:
    """widths[i] = channels of decoder block i, deepest first; one block per pyramid level used.

    The decoder uses the len(widths) deepest pyramid levels: a shorter `widths` skips the shallowest
    taps (cheaper; the mask logits are then upsampled to the input size)."""

    widths: tuple[int, ...] = (48, 32, 16, 8)
    num_classes: int = 0  # > 0: FiLM-conditioned on a target label in [0, num_classes)
    norm: bool = True  # batch norm after each conv (folded into the conv on export)
    # input strides of the pyramid levels, shallow to deep (a user model's taps, e.g. 2, 4, 8, 16, 32);
    # empty: 1, 2, 4, ... (handlers.nets' pyramid). Consecutive levels may be any integer factor apart.
    strides: tuple[int, ...] = ()
    # "zeros" (entries before the 2026-12 decision) or "replicate": the decoder convs' padding. Zero padding makes
    # the frame a feature of its own (the served NEM-U put its maximum within 3 px of the border on 26 %
    # of the test images, chance 18 %); replicate padding continues the edge activations instead.
    pad: str = "zeros"
    # > 0: mask logit l -> b * tanh(l / b) before the sigmoid (a bounded, calibrated head: the mask stays
    # in [sigmoid(-b), sigmoid(b)] and keeps a gradient; unbounded logits reached -467, sigmoid saturated)
    logit_bound: float = 0.0
    # > 0: the last block's activation is a leaky ReLU with this negative slope (the graded head, 2026-12). With a
    # ReLU, pixels where every last-block unit is cut to 0 all get the head's bias as their logit: one exact
    # plateau (24 % of the logit cells after one epoch of the families recipe, and the mask's maximum on every
    # image, as the head's weights were all negative), so the maximum was a tie over the whole plateau.
    head_slope: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        if self.strides:
            d["strides"] = list(self.strides)
        else:
            d.pop("strides")  # entries of handlers.nets pyramids stay as they were
        if self.pad == "zeros":
            d.pop("pad")
        if not self.logit_bound:
            d.pop("logit_bound")
        if not self.head_slope:
            d.pop("head_slope")
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "DecoderArch":
        # entries written before `norm` existed had no batch norm
        return DecoderArch(
            widths=tuple(int(v) for v in d["widths"]),
            num_classes=int(d.get("num_classes", 0)),
            norm=bool(d.get("norm", False)),
            strides=tuple(int(v) for v in d.get("strides", ())),
            pad=str(d.get("pad", "zeros")),
            logit_bound=float(d.get("logit_bound", 0.0)),
            head_slope=float(d.get("head_slope", 0.0)),
        )


class UNetDecoder(nn.Module):
    """pyramid (shallow -> deep) -> mask logits [B,1,h0,w0] at the shallowest tap's resolution.

    Graded head (`DecoderArch.head_slope`, beyond [NEM-U] sec. 4.1, whose final layer is a sigmoid over
    the decoder's last features): the last block ends in a leaky ReLU, so no region of the image has all
    head inputs at exactly 0 and the mask's maximum is not a plateau at sigmoid(head bias)."""

    def __init__(self, pyramid_channels: Sequence[int], arch: DecoderArch = DecoderArch()):
        super().__init__()
        chans = list(pyramid_channels)
        if not 1 <= len(arch.widths) <= len(chans):
            raise ValueError(f"decoder has {len(arch.widths)} blocks but the pyramid has {len(chans)} levels")
        self.arch = arch
        self.levels = len(arch.widths)
        strides = list(arch.strides) if arch.strides else [2**i for i in range(len(chans))]
        if (
            len(strides) != len(chans)
            or any(b % a for a, b in zip(strides, strides[1:]))
            or strides != sorted(set(strides))
        ):
            raise ValueError(f"pyramid strides {strides} must rise by integer factors, one per level of {len(chans)}")
        used = strides[::-1][: self.levels]  # deep -> shallow
        self.stride = used[-1]  # of the shallowest level used, relative to the input
        # upsampling factor before block i (i >= 1): 2 between handlers.nets levels, any integer for a user model
        self.factors = [used[i - 1] // used[i] for i in range(1, self.levels)]
        if arch.pad not in ("zeros", "replicate"):
            raise ValueError(f"decoder padding {arch.pad!r}: use 'zeros' or 'replicate'")
        deep = chans[::-1][: self.levels]
        pm = arch.pad
        blocks = [nn.Conv2d(deep[0], arch.widths[0], 3, 1, 1, padding_mode=pm)]
        for i in range(1, len(deep)):
            blocks.append(nn.Conv2d(arch.widths[i - 1] + deep[i], arch.widths[i], 3, 1, 1, padding_mode=pm))
        self.blocks = nn.ModuleList(blocks)
        self.norms = nn.ModuleList([nn.BatchNorm2d(w) for w in arch.widths]) if arch.norm else None
        self.head = nn.Conv2d(arch.widths[-1], 1, 1)
        self.film = None
        if arch.num_classes > 0:
            self.film = nn.Embedding(arch.num_classes, 2 * sum(arch.widths))
            nn.init.zeros_(self.film.weight)  # starts as the unconditional decoder

    def forward(self, pyramid: Sequence[torch.Tensor], label: torch.Tensor | None = None) -> torch.Tensor:
        return self.bound(self.head_logits(pyramid, label))

    def bound(self, logits: torch.Tensor) -> torch.Tensor:
        """The bounded head b tanh(l / b) (identity without `logit_bound`)."""
        if self.arch.logit_bound > 0:
            return self.arch.logit_bound * torch.tanh(logits / self.arch.logit_bound)
        return logits

    def head_logits(self, pyramid: Sequence[torch.Tensor], label: torch.Tensor | None = None) -> torch.Tensor:
        """The 1x1 head's logits l before the bound (`forward` = `bound(head_logits)`)."""
        feats = list(pyramid)[::-1][: self.levels]
        film = None
        if self.film is not None:
            if label is None:
                raise ValueError("a class-conditional decoder needs the target label")
            film = self.film(label)[:, :, None, None]  # [B, 2*sum(widths), 1, 1]
        off = 0
        h = feats[0]
        for i, conv in enumerate(self.blocks):
            if i > 0:
                h = upsample(h, self.factors[i - 1])
                h = torch.cat([h, feats[i]], dim=1)
            h = conv(h)
            if self.norms is not None:
                h = self.norms[i](h)
            if film is not None:
                w = self.arch.widths[i]
                h = h * (1 + film[:, off : off + w]) + film[:, off + w : off + 2 * w]
                off += 2 * w
            last = i == len(self.blocks) - 1
            h = F.leaky_relu(h, self.arch.head_slope) if last and self.arch.head_slope > 0 else F.relu(h)
        return self.head(h)


def upsample(h: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear x factor between pyramid levels (a constant scale, as upsample2)."""
    if factor == 2:
        return upsample2(h)
    return F.interpolate(h, scale_factor=float(factor), mode="bilinear", align_corners=False)


def upsample2(h: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 (pyramid levels are exactly a factor 2 apart). A constant scale, not a target size,
    keeps the exported graph free of shape arithmetic (about 30 fewer nodes per decoder)."""
    return F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)


def logits_to_mask(logits: torch.Tensor, stride: int) -> torch.Tensor:
    """Upsample mask logits by the stride of the shallowest pyramid level used (a constant), then
    sigmoid -> [B,1,H,W] in [0,1]."""
    if stride > 1:
        logits = F.interpolate(logits, scale_factor=float(stride), mode="bilinear", align_corners=False)
    return torch.sigmoid(logits)


def bank_forward(decoders: Sequence[UNetDecoder], pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
    """Run K unconditional decoders of the same shape as ONE fused network: logits [B,K,h,w].

    Equal to torch.cat([d(pyramid) for d in decoders], 1), but with one convolution per block instead
    of K: block 0 stacks the K output channel sets; in later blocks the conv over cat(h_k, skip) is
    split into a grouped conv over the K stacked h_k (groups = K) plus one conv over the shared skip
    tap with the K weight slices stacked; the heads form a grouped 1x1 conv. The weight stacking is
    constant-folded on ONNX export, so the served graph has about as many nodes as a single decoder.
    """
    a0 = decoders[0].arch
    if any(d.training for d in decoders) or a0.pad != "zeros" or a0.logit_bound or a0.head_slope:
        # batch statistics cannot be folded (and the fused convs zero-pad): run them one by one
        return torch.cat([d(pyramid) for d in decoders], dim=1)
    k = len(decoders)
    arch = decoders[0].arch
    feats = list(pyramid)[::-1][: decoders[0].levels]
    folded = [[_fold(d, i) for i in range(len(feats))] for d in decoders]  # (weight, bias) per decoder, block
    h = F.conv2d(feats[0], torch.cat([f[0][0] for f in folded]), torch.cat([f[0][1] for f in folded]), padding=1)
    h = F.relu(h)
    for i in range(1, len(feats)):
        h = upsample(h, decoders[0].factors[i - 1])
        prev = arch.widths[i - 1]
        w_h = torch.cat([f[i][0][:, :prev] for f in folded])  # [K*w_i, prev, 3, 3]
        w_f = torch.cat([f[i][0][:, prev:] for f in folded])  # [K*w_i, c_i, 3, 3]
        b = torch.cat([f[i][1] for f in folded])
        h = F.relu(F.conv2d(h, w_h, b, padding=1, groups=k) + F.conv2d(feats[i], w_f, None, padding=1))
    w = torch.cat([d.head.weight for d in decoders])  # [K, w_last, 1, 1]
    return F.conv2d(h, w, torch.cat([d.head.bias for d in decoders]), groups=k)


def _fold(decoder: UNetDecoder, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of block i with its (eval-mode) batch norm folded in."""
    conv = decoder.blocks[i]
    if decoder.norms is None:
        return conv.weight, conv.bias
    bn = decoder.norms[i]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return conv.weight * scale[:, None, None, None], (conv.bias - bn.running_mean) * scale + bn.bias
