"""Rotation of particle images and the equivariance error of a denoiser ([THESIS], sec. 7.1, 7.4).

Rotation R_theta acts on the disc by (r, theta) -> (r, theta + dtheta) (eq. 7.3) and on images by
(R x)(p) = x(R^-1 p), evaluated by interpolation, two ways:

- "fourier" (default): sinc interpolation by the three-shear decomposition
  R(phi) = S_x(-tan(phi/2)) S_y(sin phi) S_x(-tan(phi/2)), each shear an exact sub-pixel shift of
  every row by a phase ramp in the DFT (on a 2x zero-padded box), after an exact rotation by a
  multiple of 90 degrees so that |phi| <= 45 degrees. Each shear is unitary, so white pixel noise
  stays white with the same variance (measured: norm ratio 0.99 on the disc);
- "bilinear" (torch grid_sample, align_corners=False = the pixel-centre convention of
  handlers.denoise.geometry): cheap, but it averages neighbouring pixels and so shrinks the norm of
  white noise to ~0.67 and correlates it. At SNR 1/64 the particle *is* noise, so F(R x) then
  denoises a visibly different kind of input: we measured the same equivariance error (~0.3) for
  spiral and cartesian networks, trained or not, i.e. the bilinear metric measured the interpolation,
  not the network. Use it only to compare with other work.

Equivariance error (METHODS.md, "Spiral-CNN Cryo-EM denoiser"):
    E_theta ||F(R_theta x) - R_theta F(x)|| / ||F(x)||
with both norms over the inner disc r <= inner_radius: at the rim, rotation reads outside the disc,
where the particle is undefined (Remark 31), so the rim is excluded. Even sinc interpolation cannot
rotate the spectral corners of pixel noise (frequencies beyond the inscribed circle of the DFT
square, 21 % of white-noise energy), so a small floor remains for any denoiser that passes them.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xaiserve.handlers.denoise.geometry import disc_mask


def rotate(images: Tensor, angles: Tensor, method: str = "fourier") -> Tensor:
    """Rotate [B,C,H,W] images by angles [B] radians about the image centre (x right, y down the
    rows: positive angles turn x towards y); "fourier" (sinc, three shears) or "bilinear"."""
    if method == "fourier":
        return rotate_fourier(images, angles)
    if method != "bilinear":
        raise ValueError(f"rotation method must be 'fourier' or 'bilinear', got {method!r}")
    return rotate_bilinear(images, angles)


def rotate_bilinear(images: Tensor, angles: Tensor) -> Tensor:
    """Bilinear rotation (grid_sample), zero outside the box."""
    c, s = torch.cos(angles), torch.sin(angles)
    # grid gives, for each output pixel p, the input location R^-1 p.
    theta = torch.stack(
        [torch.stack([c, s, torch.zeros_like(c)], -1), torch.stack([-s, c, torch.zeros_like(c)], -1)], 1
    )
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _shear_rows(f: Tensor, a: Tensor) -> Tensor:
    """Shift row y (pixels from the box centre) of f [B,C,H,W] by a[b] * y pixels along x, exactly
    for the DFT interpolant (phase ramp); the Nyquist bin keeps the real part (cosine)."""
    b, _, h, w = f.shape
    y = torch.arange(h, dtype=torch.float64, device=f.device) - (h - 1) / 2
    k = torch.fft.fftfreq(w, dtype=torch.float64, device=f.device)
    phase = -2 * math.pi * a.view(b, 1, 1, 1) * y.view(1, 1, h, 1) * k.view(1, 1, 1, w)
    ramp = torch.polar(torch.ones_like(phase), phase)
    if w % 2 == 0:
        ramp[..., w // 2] = ramp[..., w // 2].real.to(ramp.dtype)
    return torch.fft.ifft(torch.fft.fft(f, dim=-1) * ramp, dim=-1).real


def rotate_fourier(images: Tensor, angles: Tensor) -> Tensor:
    """Sinc-interpolated rotation by three DFT shears on a 2x zero-padded box (see module doc)."""
    b, c, h, w = images.shape
    p = 2 * max(h, w)
    ph, pw = (p - h) // 2, (p - w) // 2
    f = F.pad(images.double(), (pw, p - w - pw, ph, p - h - ph))
    ang = angles.double().reshape(b)
    quarter = torch.round(ang / (math.pi / 2)).long()
    phi = ang - quarter.double() * (math.pi / 2)
    out = f.clone()
    for q in (1, 2, 3):
        sel = (quarter % 4) == q
        if bool(sel.any()):
            out[sel] = torch.rot90(f[sel], -q, dims=(-2, -1))  # exact quarter turns, same sense
    a, s = -torch.tan(phi / 2), torch.sin(phi)
    out = _shear_rows(out, a)
    out = _shear_rows(out.transpose(-1, -2), s).transpose(-1, -2)
    out = _shear_rows(out, a)
    return out[..., ph : ph + h, pw : pw + w].to(images.dtype).contiguous()


def random_angles(n: int, seed: int = 0) -> Tensor:
    """n angles uniform in [0, 2 pi) from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=torch.float64).float() * (2 * math.pi)


@torch.no_grad()
def equivariance_errors(
    fn: Callable[[Tensor], Tensor],
    particles: Tensor,
    angles_per_particle: int = 4,
    inner_radius: float = 0.9,
    seed: int = 0,
    method: str = "fourier",
) -> Tensor:
    """Per (particle, angle) relative error ||F(R x) - R F(x)|| / ||F(x)|| on the inner disc.

    particles [B,1,H,W]; returns [B * angles_per_particle]. Angles are uniform random (fixed seed).
    """
    b, _, h, w = particles.shape
    inner = torch.from_numpy(disc_mask(h, w, inner_radius).astype(np.float32)).to(particles.device)
    fx = fn(particles)
    reps = angles_per_particle
    ang = random_angles(b * reps, seed).to(particles.device)  # drawn on the host: the same angles on every device
    x_rep = particles.repeat_interleave(reps, 0)
    fx_rep = fx.repeat_interleave(reps, 0)
    f_rx = fn(rotate(x_rep, ang, method))
    r_fx = rotate(fx_rep, ang, method)
    num = ((f_rx - r_fx) * inner).flatten(1).norm(dim=1)
    den = (fx_rep * inner).flatten(1).norm(dim=1).clamp_min(1e-12)
    return num / den


def equivariance_error(fn: Callable[[Tensor], Tensor], particles: Tensor, **kw) -> float:
    """Mean of `equivariance_errors` (the number the training log and the model card report)."""
    return float(equivariance_errors(fn, particles, **kw).mean())
