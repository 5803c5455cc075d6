"""SimCLR augmentations in plain torch, batched (Chen et al. 2020, the CIFAR recipe; [SSL-XAI] sec. 3.1).

Input and output: float images [B,3,H,W] in [0,1] (normalisation comes after). Per sample:
random resized crop (scale 0.25-1, aspect 3/4-4/3) with horizontal flip, colour jitter with p = 0.8
(brightness, contrast, saturation 0.4, hue 0.1), grayscale with p = 0.2. Gaussian blur is left out,
as in the CIFAR variant of SimCLR for small images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.25, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2


_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def _u(b: int, lo: float, hi: float, g: torch.Generator | None) -> torch.Tensor:
    return torch.rand(b, generator=g) * (hi - lo) + lo


def resized_crop_flip(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator | None = None) -> torch.Tensor:
    b = x.shape[0]
    area = _u(b, *cfg.crop_scale, g)
    logr = _u(b, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), g)
    ratio = torch.exp(logr)
    w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop size as a fraction of the image
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def colour_jitter(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator | None = None) -> torch.Tensor:
    b = x.shape[0]
    on = (torch.rand(b, generator=g) < cfg.jitter_p).float().view(b, 1, 1, 1)
    y = x * _u(b, 1 - cfg.brightness, 1 + cfg.brightness, g).view(b, 1, 1, 1)
    gray = (y * _LUMA).sum(1, keepdim=True)
    c = _u(b, 1 - cfg.contrast, 1 + cfg.contrast, g).view(b, 1, 1, 1)
    y = (y - gray.mean(dim=(2, 3), keepdim=True)) * c + gray.mean(dim=(2, 3), keepdim=True)
    gray = (y * _LUMA).sum(1, keepdim=True)
    s = _u(b, 1 - cfg.saturation, 1 + cfg.saturation, g).view(b, 1, 1, 1)
    y = (y - gray) * s + gray
    # hue: rotate the chroma plane of YIQ by up to +-hue turns
    ang = _u(b, -cfg.hue, cfg.hue, g) * 2 * math.pi
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = torch.cos(ang), -torch.sin(ang)
    rot[:, 2, 1], rot[:, 2, 2] = torch.sin(ang), torch.cos(ang)
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # [b,3,3]
    y = torch.einsum("bij,bjhw->bihw", m, y)
    y = y.clamp(0, 1)
    return on * y + (1 - on) * x


def random_gray(x: torch.Tensor, p: float, g: torch.Generator | None = None) -> torch.Tensor:
    on = (torch.rand(x.shape[0], generator=g) < p).float().view(-1, 1, 1, 1)
    gray = (x * _LUMA).sum(1, keepdim=True).expand_as(x)
    return on * gray + (1 - on) * x


def simclr_view(
    x: torch.Tensor, cfg: AugmentConfig = AugmentConfig(), g: torch.Generator | None = None
) -> torch.Tensor:
    """One augmented view of a [0,1] batch."""
    return random_gray(colour_jitter(resized_crop_flip(x, cfg, g), cfg, g), cfg.gray_p, g)
