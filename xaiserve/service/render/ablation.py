"""PNG renderings of an ablation path for people ([THESIS], sec. 2.9: the path is the main result).

strip_png: one column per t (0, the T interior slices, 1): the intervened image on top, the
ablation mask phi(t) below it (white = still the target, black = replaced by the baseline), and
under each column t and F(t) (the target-class probability) with a bar. Straddling results get a
second band for phi_down. heatmap_png: the heatmap over the image (service.images.overlay).
"""

from __future__ import annotations

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from xaiserve.service.images import encode_png, overlay, to_channels

_BG = (255, 255, 255)
_TEXT = (20, 20, 20)
_BAR = (200, 40, 40)
_BAR_BG = (225, 225, 225)


def denormalise(x: np.ndarray, mean, std) -> np.ndarray:
    """Normalised CHW (or NCHW) -> HWC (NHWC) in [0, 1] for display: x * std + mean."""
    x = np.asarray(x, dtype=np.float32)
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    if x.ndim == 3:
        return np.clip(np.moveaxis(x, 0, -1) * std + mean, 0.0, 1.0)
    return np.clip(np.moveaxis(x, 1, -1) * std + mean, 0.0, 1.0)


def _scale(h: int, w: int, min_side: int) -> int:
    return max(1, int(np.ceil(min_side / max(1, min(h, w)))))


def _tile(arr: np.ndarray, factor: int) -> PILImage.Image:
    """HWC / HW float [0, 1] -> an RGB PIL image enlarged by an integer factor (nearest, keeps pixels)."""
    a = np.asarray(arr, dtype=np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    rgb = (np.clip(to_channels(a, 3), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    im = PILImage.fromarray(rgb, mode="RGB")
    if factor > 1:
        im = im.resize((im.width * factor, im.height * factor), PILImage.NEAREST)
    return im


def _band(
    images: np.ndarray,
    masks: np.ndarray,
    f: np.ndarray,
    times: np.ndarray,
    factor: int,
    title: str,
    font: ImageFont.ImageFont,
) -> PILImage.Image:
    n, h, w = masks.shape
    tw, th = w * factor, h * factor
    pad, text_h, title_h = 4, 30, 14
    band = PILImage.new("RGB", (n * (tw + pad) + pad, title_h + 2 * th + text_h + 3 * pad), _BG)
    draw = ImageDraw.Draw(band)
    draw.text((pad, 1), title, fill=_TEXT, font=font)
    for k in range(n):
        x0 = pad + k * (tw + pad)
        band.paste(_tile(images[k], factor), (x0, title_h + pad))
        band.paste(_tile(1.0 - masks[k], factor), (x0, title_h + 2 * pad + th))
        y = title_h + 3 * pad + 2 * th
        draw.text((x0, y), f"t={times[k]:.2f} F={f[k]:.2f}", fill=_TEXT, font=font)
        draw.rectangle([x0, y + 14, x0 + tw - 1, y + 22], fill=_BAR_BG)
        fill = int(round(float(np.clip(f[k], 0.0, 1.0)) * (tw - 1)))
        if fill > 0:
            draw.rectangle([x0, y + 14, x0 + fill, y + 22], fill=_BAR)
    return band


def strip_png(
    images: np.ndarray,
    masks: np.ndarray,
    f: np.ndarray,
    times: np.ndarray,
    *,
    title: str = "",
    down: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    min_side: int = 64,
) -> bytes:
    """PNG strip of the path: images [N, H, W, C] in [0, 1], masks [N, H, W] (phi, boundaries
    included), F [N], t [N]; `down` = (images, masks, F) of phi_down for straddling results."""
    font = ImageFont.load_default()
    n, h, w = masks.shape
    factor = _scale(h, w, min_side)
    bands = [_band(images, masks, f, times, factor, title or "ablation path", font)]
    if down is not None:
        bands.append(_band(down[0], down[1], down[2], times, factor, "dissipating path (phi_down)", font))
    out = PILImage.new("RGB", (max(b.width for b in bands), sum(b.height for b in bands)), _BG)
    y = 0
    for b in bands:
        out.paste(b, (0, y))
        y += b.height
    return encode_png(np.asarray(out))


def heatmap_png(image: np.ndarray, heat: np.ndarray, *, min_side: int = 256, alpha: float = 0.5) -> bytes:
    """PNG of the [0, 1] heatmap [H, W] over the HWC [0, 1] image, enlarged to at least `min_side`."""
    blend = overlay(np.asarray(image, dtype=np.float32), np.asarray(heat, dtype=np.float32), alpha=alpha)
    factor = _scale(blend.shape[0], blend.shape[1], min_side)
    return encode_png(np.asarray(_tile(blend, factor)))
