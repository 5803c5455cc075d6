"""PNG renderings of SIFT-based saliency for people ([THESIS] sec. 4.3.4: "the result for a human is
the keypoints with their gains along the path and the reconstructed images").

path_strip_png: one column per t: the reconstructed image D(theta(t)) on top, the Voronoi map of the
gains below it (white = kept), t and F(t) under each (service.render.ablation's strip).
tiles_png: captioned tiles in a row (sift_rise: the reconstructions and the per-keypoint maps).
heatmaps_png: the Voronoi and band-pass heatmaps over the image, side by side.
"""

from __future__ import annotations

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from xaiserve.service.images import encode_png, overlay, to_channels
from xaiserve.service.render.ablation import strip_png

_BG = (255, 255, 255)
_TEXT = (20, 20, 20)


def _rgb(arr: np.ndarray, factor: int) -> PILImage.Image:
    a = np.asarray(arr, dtype=np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    im = PILImage.fromarray((np.clip(to_channels(a, 3), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="RGB")
    return im.resize((im.width * factor, im.height * factor), PILImage.NEAREST) if factor > 1 else im


def tiles_png(tiles: list[tuple[str, np.ndarray]], *, title: str = "", min_side: int = 96) -> bytes:
    """A row of captioned tiles (HWC or HW arrays in [0, 1], all the same size)."""
    font = ImageFont.load_default()
    h, w = tiles[0][1].shape[:2]
    factor = max(1, int(np.ceil(min_side / max(1, min(h, w)))))
    tw, th, pad, cap, head = w * factor, h * factor, 4, 14, 14 if title else 0
    out = PILImage.new("RGB", (len(tiles) * (tw + pad) + pad, head + th + cap + 2 * pad), _BG)
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((pad, 1), title, fill=_TEXT, font=font)
    for k, (caption, arr) in enumerate(tiles):
        x0 = pad + k * (tw + pad)
        out.paste(_rgb(arr, factor), (x0, head + pad))
        draw.text((x0, head + pad + th + 1), caption, fill=_TEXT, font=font)
    return encode_png(np.asarray(out))


def path_strip_png(
    images: np.ndarray,
    kept: np.ndarray,
    f: np.ndarray,
    times: np.ndarray,
    *,
    title: str,
    down: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> bytes:
    """images [N, H, W, C] in [0, 1] along the path, kept [N, H, W] (Voronoi map of the gains), F [N], t [N]."""
    masks = 1.0 - np.clip(kept, 0.0, 1.0)  # the ablation strip draws 1 - phi: white where kept
    dn = None if down is None else (down[0], 1.0 - np.clip(down[1], 0.0, 1.0), down[2])
    return strip_png(images, masks, f, times, title=title, down=dn)


def heatmaps_png(image: np.ndarray, voronoi: np.ndarray, bandpass: np.ndarray, *, min_side: int = 192) -> bytes:
    """The two heatmaps [H, W] over the HWC [0, 1] image: Voronoi (eq. 4.46) | band-pass (eq. 4.48)."""
    return tiles_png(
        [("Voronoi (eq. 4.46)", overlay(image, voronoi)), ("band-pass (eq. 4.48)", overlay(image, bandpass))],
        min_side=min_side,
    )
