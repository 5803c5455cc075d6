"""Denoising fidelity on the unit disc ([THESIS], sec. 7.1 objective 1: ||F(x) - x_sig|| small).

Per particle, over the pixels of the unit disc (eq. 7.2):
    MSE  = mean (F(x) - x_sig)^2
    PSNR = 10 log10(peak^2 / MSE), peak = max(x_sig) - min(x_sig) on the disc (the clean
           particle's dynamic range; the data have no fixed white level).
Tables report the mean over particles of each (PSNR averaged in dB).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def disc_mse(pred: Tensor, clean: Tensor, disc: Tensor) -> Tensor:
    """Per-particle MSE over the disc: [B,1,H,W] x2, disc [1,1,H,W] or [H,W] -> [B]."""
    d = disc.to(pred.dtype)
    return (((pred - clean) * d) ** 2).flatten(1).sum(1) / d.sum()


def disc_psnr(pred: Tensor, clean: Tensor, disc: Tensor) -> Tensor:
    """Per-particle PSNR in dB over the disc (peak = dynamic range of the clean particle) -> [B]."""
    d = disc.to(torch.bool).expand_as(clean)
    big = torch.finfo(clean.dtype).max
    hi = torch.where(d, clean, torch.full_like(clean, -big)).flatten(1).amax(1)
    lo = torch.where(d, clean, torch.full_like(clean, big)).flatten(1).amin(1)
    mse = disc_mse(pred, clean, disc).clamp_min(1e-20)
    return 10.0 * torch.log10((hi - lo) ** 2 / mse)


def summarise(pred: Tensor, clean: Tensor, disc: Tensor) -> dict[str, float]:
    """{'mse': mean MSE, 'psnr': mean PSNR (dB)} over a batch."""
    return {
        "mse": float(disc_mse(pred, clean, disc).mean()),
        "psnr": float(disc_psnr(pred, clean, disc).mean()),
    }


def as_tensor(a: np.ndarray) -> Tensor:
    """float32 [N,H,W] numpy -> [N,1,H,W] tensor."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return t.unsqueeze(1) if t.dim() == 3 else t
