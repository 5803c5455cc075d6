"""Image decoding and model preprocessing (decode, channel conversion, resize, normalise).

Decoding uses Pillow; every failure becomes InvalidArgument with a message that says what to send.
Arrays are HWC float32 in [0, 1] until `to_model_input` turns them into the model's CHW,
normalised tensor (x - mean) / std. Masking everywhere happens on that normalised tensor, so a
masked-out pixel is the dataset mean (see METHODS.md, "pixel scaling").
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage, UnidentifiedImageError

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.errors import InvalidArgument, ResourceExhausted
from xaiserve.service.tensors import from_tensor

MAX_SIDE = 4096
MAX_PIXELS = 4096 * 4096
# Pillow refuses decompression bombs above this; we check ourselves with a clearer message.
PILImage.MAX_IMAGE_PIXELS = MAX_PIXELS * 2


@dataclass(frozen=True)
class InputSpec:
    """What a model takes: size, channels and per-channel normalisation."""

    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _check_size(h: int, w: int) -> None:
    if h <= 0 or w <= 0:
        raise InvalidArgument(f"image has a zero dimension ({h} x {w})")
    if h > MAX_SIDE or w > MAX_SIDE or h * w > MAX_PIXELS:
        raise ResourceExhausted(f"image is {h} x {w}; the largest accepted side is {MAX_SIDE} pixels")


def decode_image(image: pb.Image) -> np.ndarray:
    """Decode an Image message to HWC float32 in [0, 1] (C = 1, 3 or 4), checking everything."""
    which = image.WhichOneof("source")
    if which is None:
        raise InvalidArgument("image is empty: set image.encoded (PNG/JPEG bytes) or image.tensor")
    if which == "encoded":
        data = image.encoded
        if not data:
            raise InvalidArgument("image.encoded is empty: send PNG or JPEG bytes")
        try:
            with PILImage.open(io.BytesIO(data)) as im:
                w, h = im.size
                _check_size(h, w)
                im.load()
                if im.mode not in ("L", "RGB", "RGBA"):
                    im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise InvalidArgument(
                f"image.encoded ({len(data)} bytes) could not be decoded as an image ({e.__class__.__name__}); "
                "send PNG or JPEG bytes, or a raw tensor in image.tensor"
            ) from None
        except PILImage.DecompressionBombError:
            raise ResourceExhausted(f"image is larger than {MAX_PIXELS} pixels") from None
    else:
        t = image.tensor
        if len(t.shape) not in (2, 3):
            raise InvalidArgument(f"image.tensor shape {list(t.shape)} must be [H, W] or [H, W, C]")
        if len(t.shape) == 3 and t.shape[2] not in (1, 3, 4):
            raise InvalidArgument(
                f"image.tensor has {t.shape[2]} channels (shape {list(t.shape)}); give 1, 3 or 4 as the last dimension (HWC)"
            )
        if len(t.shape) >= 2 and all(s > 0 for s in t.shape):
            _check_size(int(t.shape[0]), int(t.shape[1]))
        a = from_tensor(t, what="image.tensor")
        if t.dtype == "uint8":
            arr = a.astype(np.float32) / 255.0
        elif t.dtype in ("float32", "float64", "float16"):
            arr = a.astype(np.float32)
            if not np.isfinite(arr).all():
                raise InvalidArgument("image.tensor contains NaN or Inf values")
            lo, hi = float(arr.min()), float(arr.max())
            if lo < -1e-3 or hi > 1.0 + 1e-3:
                raise InvalidArgument(
                    f"image.tensor float values span [{lo:.3g}, {hi:.3g}]; float images must be in [0, 1] (or send uint8)"
                )
            arr = np.clip(arr, 0.0, 1.0)
        else:
            raise InvalidArgument(f"image.tensor dtype {t.dtype} is not an image dtype; use uint8 or float32")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)


def to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """Convert HWC [0,1] to the model's channel count (drop alpha, gray <-> RGB)."""
    c = arr.shape[2]
    if c == 4:
        arr, c = arr[:, :, :3], 3
    if c == channels:
        return arr
    if channels == 3 and c == 1:
        return np.repeat(arr, 3, axis=2)
    if channels == 1 and c == 3:
        # ITU-R 601-2 luma, as Pillow's "L" conversion
        return (arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, :, None]
    raise InvalidArgument(f"cannot convert a {c}-channel image to the model's {channels} channels")


def resize(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of HWC float32 (antialiased when shrinking, as Pillow does)."""
    if arr.shape[0] == height and arr.shape[1] == width:
        return arr
    chans = [
        np.asarray(PILImage.fromarray(arr[:, :, i], mode="F").resize((width, height), PILImage.BILINEAR))
        for i in range(arr.shape[2])
    ]
    return np.stack(chans, axis=2).astype(np.float32)


def to_model_input(arr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """HWC [0,1] of any size -> CHW float32 at the model's size, normalised (x - mean) / std."""
    a = resize(to_channels(arr, spec.channels), spec.height, spec.width)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(((a - mean) / std).transpose(2, 0, 1), dtype=np.float32)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an [h, w] mask to [height, width], kept in [0, 1]."""
    out = resize(mask[:, :, None].astype(np.float32), height, width)[:, :, 0]
    return np.clip(out, 0.0, 1.0)


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of an HW or HWC array in [0,1] (float) or uint8."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def heat_colormap(values: np.ndarray) -> np.ndarray:
    """Map [0,1] to RGB, blue (low) -> white -> red (high); HW -> HWC float."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    blue = np.array([0.15, 0.25, 0.85], dtype=np.float32)
    white = np.array([1.0, 1.0, 1.0], dtype=np.float32)
    red = np.array([0.85, 0.1, 0.1], dtype=np.float32)
    low = blue + (white - blue) * (v * 2.0)
    high = white + (red - white) * (v * 2.0 - 1.0)
    return np.where(v < 0.5, low, high)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0,1] heatmap (HW, same size as image) over an HWC [0,1] image."""
    rgb = to_channels(image, 3)
    return (1.0 - alpha) * rgb + alpha * heat_colormap(heat)
