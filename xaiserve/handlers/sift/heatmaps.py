"""Spatial heatmaps from keypoint gains ([THESIS] sec. 4.3.4A), for comparison with pixel methods.

Two extractions of a gain vector v [K] (a path reduction or a RISE importance):

- Voronoi (eq. 4.46-4.47): the decoder on the homogeneous scalar field C(sigma), I = D^{C,kappa}(v),
  i.e. every pixel averages the gains of the cells it belongs to over the scale layers.
- band-pass amplitude (eq. 4.48): I = gamma_{sigma_LP} * |y - gamma_{sigma_HP} * y| of the image
  y = D^{Delta,kappa}(v) the classifier would see, with the rectifier summed over the colour
  channels, in pixel units (the normalisation undone); sigma_LP = 8, sigma_HP = 5 (Table 4.2).
"""

from __future__ import annotations

from typing import Sequence

import torch

from xaiserve.handlers.ablation.path import gaussian_blur
from xaiserve.handlers.ablation.reductions import to_unit
from xaiserve.handlers.sift.decomposition import SiftDecoder

SIGMA_LP = 8.0
SIGMA_HP = 5.0


def to_pixels(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """Normalised [B, C, H, W] -> pixel units x * std + mean (identity without a normalisation)."""
    if mean is None or std is None:
        return x
    m = torch.as_tensor(list(mean), dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(list(std), dtype=x.dtype).view(1, -1, 1, 1)
    return x * s + m


def bandpass_amplitude(images: torch.Tensor, sigma_lp: float = SIGMA_LP, sigma_hp: float = SIGMA_HP) -> torch.Tensor:
    """eq. 4.48: gamma_LP * |y - gamma_HP * y| for images [B, C, H, W] -> [B, H, W] (channels summed)."""
    high = (images - gaussian_blur(images, sigma_hp)).abs().sum(dim=1)
    return gaussian_blur(high, sigma_lp)


def unit_gains(v: torch.Tensor) -> torch.Tensor:
    """Gains in [0, 1] for the band-pass image: the positive part of v scaled to a maximum of 1."""
    pos = v.clamp_min(0.0)
    top = float(pos.max()) if pos.numel() else 0.0
    return pos / top if top > 0 else pos


@torch.no_grad()
def extract(
    decoder: SiftDecoder,
    v: torch.Tensor,
    *,
    signed: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    sigma_lp: float = SIGMA_LP,
    sigma_hp: float = SIGMA_HP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Voronoi heatmap, band-pass heatmap), each [H, W] in [0, 1], of the keypoint values v [K].

    Voronoi: v in [0, 1] gives a map in [0, 1] (the cells are a partition of unity) that is
    clamped; signed v (influence, contrastive reductions) maps 0 to 1/2 (reductions.to_unit).
    Band-pass: of the image decoded with `unit_gains(v)`, scaled to a maximum of 1.
    """
    vor = to_unit(decoder.voronoi(v.float())[0], signed=signed)
    image = to_pixels(decoder.decode(unit_gains(v.float())), mean, std)
    band = bandpass_amplitude(image, sigma_lp, sigma_hp)[0]
    top = float(band.max())
    return vor, (band / top if top > 0 else band)
