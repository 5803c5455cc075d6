"""Spiral and cartesian denoisers ([THESIS], sec. 7.3.3), one definition, two geometries.

Graph (what the ONNX export contains; service/registry.py's denoiser contract):
    particles [B,1,H,W], raw units
      -> restrict to the unit disc (eq. 7.1-7.2), per-particle scaling x / std over the disc
         (a rotation-invariant statistic, so it does not break equivariance)
      -> encode to the space (spiral: barycentric resampling; cartesian: identity)
      -> U-Net: per level `convs_per_level` x (conv, batch norm, ReLU), coarser levels reached by
         `down` and come back by `up` with a concatenated skip (one level = the thesis's plain stack)
      -> 1-channel conv -> decode to the pixel grid
      -> undo the normalisation, zero outside the disc -> denoised [B,1,H,W], raw units.

Residual design: `predict="clean"` (default) regresses the clean image directly, the thesis's
choice ("direct signal estimation makes for clearer comparisons", sec. 6.3); `predict="noise"`
regresses the noise and subtracts it (DnCNN-style residual learning, ref. [118] of the thesis).

The U-Net is beyond the thesis (which used "fairly simplistic standard" stacks, sec. 7.3.3): at
SNR 1/64 a plain stack of 3 x 3 convolutions sees too little of the particle to denoise it.
Both architectures share it, with the same channels and kernel sizes, so they have the same
parameter count (a SpiralConv on a rows x n ribbon with a rows x k filter has as many weights as a
k x k conv2d when rows = k).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xaiserve.handlers.denoise import geometry as geo
from xaiserve.handlers.denoise.layers import CartesianOps, SpiralOps, spiral_levels

ARCHS = ("spiral", "cartesian")
# Measured at SNR 1/4 (3 epochs, 1000 particles): barycentric input resampling left the trained
# spiral network at an equivariance error of 0.13, a 0.7 px Gaussian average at 0.04, with a
# slightly better PSNR (26.56 vs 26.25 dB).
DEFAULT_ENCODE_SIGMA = {"spiral": 0.7, "cartesian": 0.0}


@dataclass(frozen=True)
class DenoiserConfig:
    """Architecture of a denoiser; `arch` in the manifest entry is `asdict` of this."""

    arch: str = "spiral"
    size: int = 64
    channels: tuple[int, ...] = (12, 24, 48)  # per level; len = number of levels
    convs_per_level: int = 2
    kernel: int = 3  # ribbon rows and filter width (3 or 5, sec. 7.3.2); k x k for the cartesian net
    n_wind: int = 0  # 0: size / 2 (winding distance = pixel pitch)
    n_spls: int = 0  # 0: round(pi n_wind^2) (sample spacing = winding distance)
    # Input anti-aliasing, in pixels. Spiral: cartesian -> spiral by a Gaussian average of this
    # width instead of barycentric interpolation (0 = barycentric, the thesis's method); cartesian:
    # a fixed Gaussian blur of the input (0 = none, the plain baseline). None = the arch default,
    # 0.7 for the spiral, 0 for the cartesian network (see geometry.cartesian_to_spiral).
    encode_sigma: float | None = None
    predict: str = "clean"  # "clean" or "noise"
    out_gain: float = 1.0  # initial value of the learnable output gain (see expected_signal_rms)
    eps: float = 1e-6  # relative floor of the per-particle std

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.predict not in ("clean", "noise"):
            raise ValueError(f"predict must be 'clean' or 'noise', got {self.predict!r}")
        if self.kernel not in (3, 5):
            raise ValueError(f"kernel must be 3 or 5 (ribbon rows), got {self.kernel}")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be positive, got {self.channels}")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.encode_sigma is None:
            object.__setattr__(self, "encode_sigma", DEFAULT_ENCODE_SIGMA[self.arch])
        if self.encode_sigma < 0:
            raise ValueError(f"encode_sigma must be >= 0, got {self.encode_sigma}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "DenoiserConfig":
        names = {f.name for f in fields(DenoiserConfig)}
        kw = {k: v for k, v in d.items() if k in names}
        if "channels" in kw:
            kw["channels"] = tuple(kw["channels"])
        return DenoiserConfig(**kw)


def normalise(particles: Tensor, disc: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-particle scaling over the disc: x / sd restricted to the disc, sd = standard deviation
    of x over the disc; returns (normalised, sd [B,1,1,1]). sd is floored at eps * (mean |x| + 1)
    so a constant particle gives a finite output instead of NaN.

    The mean is deliberately *not* subtracted: at SNR 1/64 the mean of a particle over the disc is
    dominated by noise (its noise is ~1.1x the clean particle's RMS), and a centred input hides
    it from the network, which then cannot correct the offset it adds back; we measured the
    centred variant's output to be dominated by that random offset. So the graph is equivariant
    to scaling but not to offsets: particles are expected with a zero-mean background, as
    Cryo-EM pipelines normalise them (the simulation's background is 0).
    """
    n = disc.sum()
    x = particles * disc
    mu = x.sum((-2, -1), keepdim=True) / n
    var = (((x - mu) * disc) ** 2).sum((-2, -1), keepdim=True) / n
    floor = eps * (x.abs().sum((-2, -1), keepdim=True) / n + 1.0)
    sd = torch.sqrt(var + floor * floor)
    return x / sd, sd


class ConvUnit(nn.Module):
    """conv -> batch norm -> ReLU on the space (sec. 7.3.3). `f` may be a list of feature maps,
    meaning their channel concatenation (the decoder's skip connections)."""

    def __init__(self, ops: nn.Module, level: int, cin: int, cout: int, kernel: int):
        super().__init__()
        self.conv = ops.make_conv(level, cin, cout, kernel, bias=False)
        self.norm = ops.make_norm(cout)

    def forward(self, f: Tensor | list[Tensor], ops: nn.Module) -> Tensor:
        if getattr(ops, "fold_norm", False) and not self.training and self.norm.track_running_stats:
            # Inference form of the spiral net: the batch norm (running statistics) folded into
            # the convolution as a per-channel scale and shift, because its convolution is a sum
            # of several convolutions that ONNX Runtime cannot fuse a BatchNormalization into.
            return torch.relu(self.conv(f, ops, *self.norm_affine()))
        return torch.relu(self.norm(self.conv(f, ops)))

    def norm_affine(self) -> tuple[Tensor, Tensor]:
        """The batch norm with its running statistics as a per-channel (scale, shift)."""
        n = self.norm
        scale = n.weight / torch.sqrt(n.running_var + n.eps)
        return scale, n.bias - n.running_mean * scale


class UNetCore(nn.Module):
    """Encoder-decoder over the space's levels; input and output have one channel."""

    def __init__(self, ops: nn.Module, channels: tuple[int, ...], convs_per_level: int, kernel: int):
        super().__init__()
        self.levels = len(channels)
        self.enc = nn.ModuleList()
        cin = 1
        for lev, c in enumerate(channels):
            units = []
            for _ in range(convs_per_level):
                units.append(ConvUnit(ops, lev, cin, c, kernel))
                cin = c
            self.enc.append(nn.ModuleList(units))
        self.dec = nn.ModuleList()
        for lev in range(self.levels - 2, -1, -1):
            self.dec.append(ConvUnit(ops, lev, channels[lev + 1] + channels[lev], channels[lev], kernel))
        self.out = ops.make_conv(0, channels[0], 1, kernel, bias=True)

    def forward(self, f: Tensor, ops: nn.Module) -> Tensor:
        skips = []
        for lev, units in enumerate(self.enc):
            if lev > 0:
                f = ops.down(lev - 1, f)
            for u in units:
                f = u(f, ops)
            skips.append(f)
        for i, lev in enumerate(range(self.levels - 2, -1, -1)):
            f = self.dec[i]([ops.up(lev, f), skips[lev]], ops)  # channel concatenation
        return self.out(f, ops)


class Denoiser(nn.Module):
    """Raw particles [B,1,H,W] -> denoised [B,1,H,W] in the same units (see module docstring)."""

    def __init__(self, config: DenoiserConfig = DenoiserConfig(), operators: dict[str, Tensor] | None = None):
        """`operators`: cached spiral geometry buffers (names as in SpiralOps) to reuse."""
        super().__init__()
        self.config = config
        levels = len(config.channels)
        if config.arch == "spiral":
            specs = spiral_levels(config.size, config.n_wind, config.n_spls, levels)
            self.ops = SpiralOps(
                config.size, specs, rows=config.kernel, operators=operators, encode_sigma=config.encode_sigma
            )
        else:
            self.ops = CartesianOps(config.size, levels, encode_sigma=config.encode_sigma)
        self.core = UNetCore(self.ops, config.channels, config.convs_per_level, config.kernel)
        # A learnable scalar on the network output, started at the expected size of the target in
        # normalised units: at SNR 1/64 the clean signal is ~1.6 % of the normalised particle, and
        # an output layer that must first shrink its random initial output 60-fold learns slowly.
        self.gain = nn.Parameter(torch.tensor(float(config.out_gain)))
        disc = torch.from_numpy(geo.disc_mask(config.size, config.size).astype(np.float32))
        self.register_buffer("disc", disc[None, None])

    def forward_normalised(self, xn: Tensor) -> Tensor:
        """Normalised particles (disc-restricted) -> normalised estimate of the clean image."""
        f = self.ops.encode(xn)
        y = self.ops.decode(self.core(f, self.ops)) * self.gain
        if self.config.predict == "noise":
            y = xn - y
        return y * self.disc

    def forward(self, particles: Tensor) -> Tensor:
        xn, sd = normalise(particles, self.disc, self.config.eps)
        return self.forward_normalised(xn) * sd


def build_denoiser(config: DenoiserConfig) -> Denoiser:
    return Denoiser(config)


def expected_signal_rms(snr: float) -> float:
    """RMS of the clean particle in the graph's normalised units at a given SNR (ratio of norms):
    the normalised particle has about unit mean square, of which the signal holds
    snr^2 / (1 + snr^2)."""
    return float(snr / np.sqrt(1.0 + snr * snr))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ARCHS",
    "DenoiserConfig",
    "Denoiser",
    "build_denoiser",
    "expected_signal_rms",
    "normalise",
    "parameter_count",
]
