"""Mask encodings for answers: how a [0, 1] mask travels, and how a client gets the float mask back.

Pure numpy / Pillow (no protobuf): service/mask_wire.py puts these into ExplainResponse fields.

Two independent choices:
- resolution: INPUT (the image's own H x W, what Explain always returned) or MODEL (the masking
  network's grid, e.g. 64 x 64, plus a `MaskGeometry` saying where the image lies on that grid);
- encoding: FLOAT32 (4 bytes a pixel, exact), UINT8 (1 byte a pixel, round(255 m)) or PNG (the same
  8 bits, deflated by service.images.encode_png; a browser or an image viewer shows it as it is).

Precision, stated as a bound on |m - decoded| per pixel:
- FLOAT32 at INPUT: exact (the server's float32 values).
- FLOAT32 at MODEL, mapped back with `to_input`: the same bilinear resize the server applies for
  INPUT, so equal to the INPUT answer up to float32 rounding (~1e-6).
- UINT8 / PNG: half a quantisation step, 1/510 ~ 0.00196, at the resolution sent. Mapped back
  with `to_input` the bound holds as well: bilinear interpolation is a convex combination of grid
  values (non-negative weights summing to 1), so it cannot enlarge a uniform error.

The masks are those of [NEM-U] sec. 3 / [NEMt] sec. 3 (one value in [0, 1] a pixel); nothing
here depends on how they were computed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage

QUANT_LEVELS = 255
MAX_QUANT_ERROR = 0.5 / QUANT_LEVELS  # UINT8 and PNG: half a step


@dataclass(frozen=True)
class MaskGeometry:
    """Where the input image lies on the grid of a mask.

    The mask is `height` x `width`. The input image (`input_height` x `input_width`) was scaled to
    `content_height` x `content_width` mask pixels and placed with its top-left corner at
    (`content_top`, `content_left`); negative offsets mean the network saw a crop (center-crop),
    a content smaller than the grid means padding (letterbox). At INPUT resolution the content is
    the whole mask at offset 0."""

    height: int
    width: int
    input_height: int
    input_width: int
    content_top: int
    content_left: int
    content_height: int
    content_width: int

    @staticmethod
    def identity(height: int, width: int) -> "MaskGeometry":
        """A mask already at the input's resolution."""
        return MaskGeometry(height, width, height, width, 0, 0, height, width)

    @property
    def at_input(self) -> bool:
        return (
            self.height,
            self.width,
            self.content_top,
            self.content_left,
            self.content_height,
            self.content_width,
        ) == (self.input_height, self.input_width, 0, 0, self.input_height, self.input_width)

    def check(self) -> None:
        """Raise ValueError for a geometry no mask can have (a corrupt or hand-made message)."""
        dims = (self.height, self.width, self.input_height, self.input_width, self.content_height, self.content_width)
        if min(dims) <= 0:
            raise ValueError(f"mask geometry has a zero or negative size: {self}")
        if max(dims) > 1 << 16 or max(abs(self.content_top), abs(self.content_left)) > 1 << 16:
            raise ValueError(f"mask geometry is out of range: {self}")


def quantize(mask: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 round(255 m) (values outside [0, 1] are clipped first)."""
    return (np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0) * QUANT_LEVELS + 0.5).astype(np.uint8)


def dequantize(q: np.ndarray) -> np.ndarray:
    """uint8 -> float32 q / 255 (within MAX_QUANT_ERROR of the quantised mask)."""
    return np.asarray(q, dtype=np.uint8).astype(np.float32) * np.float32(1.0 / QUANT_LEVELS)


def png_decode(data: bytes) -> np.ndarray:
    """The uint8 HW array of an 8-bit grayscale PNG (raises ValueError for anything else)."""
    try:
        with PILImage.open(io.BytesIO(data), formats=("PNG",)) as im:
            if im.mode != "L":
                raise ValueError(f"mask PNG has mode {im.mode}, not 8-bit grayscale (L)")
            im.load()
            return np.asarray(im, dtype=np.uint8).copy()
    except (OSError, SyntaxError) as e:
        raise ValueError(f"mask PNG ({len(data)} bytes) could not be decoded: {e.__class__.__name__}") from None


def _bilinear(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an HW float32 array with Pillow ("F" mode: float32 throughout)."""
    if a.shape == (height, width):
        return a.astype(np.float32, copy=False)
    img = PILImage.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")
    return np.asarray(img.resize((width, height), PILImage.Resampling.BILINEAR), dtype=np.float32)


def to_input(mask: np.ndarray, geometry: MaskGeometry) -> np.ndarray:
    """A float mask on `geometry`'s grid -> float32 [input_height, input_width] in [0, 1].

    The part of the grid covered by the image (content box) is cut out, with 0 where the image
    reaches past the grid (a crop the network never saw), and resized bilinearly to the input's
    size. For a stretched input (content = the whole grid) this is the resize the server applies
    when it answers at INPUT resolution (service.images.resize_mask), so both agree."""
    m = np.asarray(mask, dtype=np.float32)
    g = geometry
    if m.shape != (g.height, g.width):
        raise ValueError(f"mask is {list(m.shape)} but its geometry says {g.height} x {g.width}")
    if g.at_input:
        return np.clip(m, 0.0, 1.0)
    top, left, ch, cw = g.content_top, g.content_left, g.content_height, g.content_width
    if (top, left, ch, cw) != (0, 0, g.height, g.width):
        seen = np.zeros((ch, cw), dtype=np.float32)
        ys, xs = max(0, top), max(0, left)
        ye, xe = min(g.height, top + ch), min(g.width, left + cw)
        if ye > ys and xe > xs:
            seen[ys - top : ye - top, xs - left : xe - left] = m[ys:ye, xs:xe]
        m = seen
    return np.clip(_bilinear(m, g.input_height, g.input_width), 0.0, 1.0)
