"""Bringing particles of another box size to the denoiser's size (pure numpy).

DEFAULT_POLICY is the input policy a denoiser's manifest entry starts from ("particles" key):
square particles of another size are Fourier-resampled to the model's size if their side is
within [min_side, max_side_factor x model side].
"""

from __future__ import annotations

import numpy as np

DEFAULT_POLICY = {"size_policy": "resample", "min_side": 16, "max_side_factor": 8}


def fourier_resample(stack: np.ndarray, side: int) -> np.ndarray:
    """Square [N,s,s] -> [N,side,side] by cropping / zero-padding the centred 2-D spectrum.

    Scaled by (side/s)^2 so pixel values (and the mean) keep their units. The box centres are
    kept aligned (pixel centres at (2j + 1 - N) / N as in handlers.denoise.geometry): plain DFT
    cropping keeps pixel 0 fixed instead, a shift of half a source pixel when halving the size,
    so the spectrum first gets the phase ramp of that sub-pixel shift.
    """
    n, s, _ = stack.shape
    if s == side:
        return stack.astype(np.float32, copy=False)
    spec = np.fft.fft2(stack.astype(np.float64))
    delta = 0.5 * (s / side - 1.0)  # target pixel m samples source position (m + 1/2) s/side - 1/2
    ramp = np.exp(2j * np.pi * np.fft.fftfreq(s) * delta)
    spec = np.fft.fftshift(spec * ramp[None, :, None] * ramp[None, None, :], axes=(-2, -1))
    out = np.zeros((n, side, side), np.complex128)
    m = min(s, side)
    src0, dst0 = s // 2 - m // 2, side // 2 - m // 2  # keep DC (index size // 2 after fftshift) aligned
    out[:, dst0 : dst0 + m, dst0 : dst0 + m] = spec[:, src0 : src0 + m, src0 : src0 + m]
    res = np.fft.ifft2(np.fft.ifftshift(out, axes=(-2, -1))).real * (side * side) / (s * s)
    return res.astype(np.float32)
