"""PNG rendering of a RELAX result: importance | uncertainty | U-RELAX side by side, coloured with
service.images.heat_colormap (red high, blue low), as in [RELAX] Fig. 3."""

from __future__ import annotations

import numpy as np

from xaiserve.service.images import encode_png, heat_colormap

GAP = 2  # white pixels between panels
MIN_SIDE = 128  # small model inputs are enlarged (nearest neighbour) so the PNG is readable


def normalise(a: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0,1] over the finite values; +inf -> 1, a constant map -> 0."""
    a = np.asarray(a, dtype=np.float32)
    finite = np.isfinite(a)
    if not finite.any():
        return np.ones_like(a)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    out = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return np.where(finite, out, 1.0).astype(np.float32)


def panels(*maps: np.ndarray) -> np.ndarray:
    """HWC float image of [0,1] maps side by side, white gaps, enlarged if small."""
    h, w = np.asarray(maps[0]).shape
    scale = max(1, -(-MIN_SIDE // max(h, 1)))
    tiles = []
    for i, m in enumerate(maps):
        rgb = heat_colormap(m)
        if scale > 1:
            rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
        if i:
            tiles.append(np.ones((h * scale, GAP, 3), np.float32))
        tiles.append(rgb)
    return np.concatenate(tiles, axis=1)


def render_png(importance: np.ndarray, uncertainty: np.ndarray, u_relax: np.ndarray) -> bytes:
    """PNG bytes: importance | uncertainty | U-RELAX, each panel min-max normalised.

    The U-RELAX panel uses the importance panel's colour scale, with the filtered-out pixels at its
    minimum (blue): normalising the zeros of eq. 10 together with R would paint every kept pixel
    the same red and hide the importance differences among them.
    """
    imp = normalise(importance)
    ur = np.where(np.asarray(u_relax) != 0, imp, 0.0)
    return encode_png(panels(imp, normalise(uncertainty), ur))
