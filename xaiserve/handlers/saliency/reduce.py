"""From raw input-space attributions to maps: channel reduction and min-max normalisation (pure torch)."""

from __future__ import annotations

import numpy as np
import torch

from xaiserve.errors import FailedPrecondition


def reduce_channels(raw: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> [B,H,W]: mean over channels of the absolute value."""
    if raw.ndim != 4:
        raise ValueError(f"raw attribution must be [B,C,H,W], got {list(raw.shape)}")
    return raw.detach().abs().mean(dim=1)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-map (m - min) / (max - min); a constant map (no attribution anywhere) becomes all zeros."""
    flat = maps.flatten(1)
    lo = flat.amin(1, keepdim=True)
    span = flat.amax(1, keepdim=True) - lo
    out = torch.where(
        span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(flat)
    )
    return out.view_as(maps)


def to_map(raw: torch.Tensor) -> np.ndarray:
    """Raw attribution [B,C,H,W] -> float32 numpy [B,H,W] in [0,1]."""
    if not torch.isfinite(raw).all():
        # finite inputs were checked before: the model itself produced NaN/inf gradients
        raise FailedPrecondition("the model produced non-finite gradients for this input; no attribution map")
    m = minmax(reduce_channels(raw.float())).clamp_(0.0, 1.0)
    return m.cpu().numpy().astype(np.float32)
