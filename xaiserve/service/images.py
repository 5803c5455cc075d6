"""Image decoding and model preprocessing (decode, channel conversion, resize, normalise).

Decoding uses Pillow; every failure becomes InvalidArgument with a message that says what to send.
Arrays are HWC float32 in [0, 1] until `to_model_input` turns them into the model's CHW,
normalised tensor (x - mean) / std. Masking everywhere happens on that normalised tensor, so a
masked-out pixel is the dataset mean (see METHODS.md, "pixel scaling").
"""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from xaiserve.clinical.windowing import DicomDefaults
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.dicom_in import is_dicom_image
from xaiserve.service.errors import InvalidArgument, ResourceExhausted
from xaiserve.service.tensors import check_tensor, from_tensor

MAX_SIDE = 4096
MAX_PIXELS = 4096 * 4096
# Pillow refuses decompression bombs above this; we check ourselves with a clearer message.
PILImage.MAX_IMAGE_PIXELS = MAX_PIXELS * 2
# Encoded formats we decode. Pillow knows dozens; each is decoder code an untrusted byte string
# reaches, so only the formats a client has a reason to send are opened.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
# Compression level of the PNG renderings: 0 stores, 1 is the fastest that compresses (part 4 of
# bench/bench_grpc.py measures it). With ISA-L (the `isal` package, a dependency) levels 1-4 run
# ISA-L's levels 0-3: deflate streams any PNG reader inflates, at 3-4x the speed of zlib's level 1
# and within ~20 % of its size; without it, zlib at the given level.
PNG_LEVEL = 1
try:
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - isal is a declared dependency; zlib keeps PNGs working
    _isal = None


RESIZE_MODES = ("stretch", "letterbox", "center-crop")


@dataclass(frozen=True)
class InputSpec:
    """What a model takes: size, channels, per-channel normalisation, and how an image of another
    size or aspect ratio is fitted to it (`resize`, one of RESIZE_MODES; see `fit`)."""

    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "stretch"
    # how a greyscale DICOM image becomes the channels (window / window stack; manifest input.dicom)
    dicom: DicomDefaults | None = None


@dataclass(frozen=True)
class Fit:
    """Where an h x w image lands in the model's input: it is scaled to `content` (height, width)
    and placed at `offset` (top, left), which is negative when the model sees a crop of it.

    stretch      content = the model size, offset 0 (the aspect ratio is not kept)
    letterbox    the largest size that fits inside, centred; the border is padded with the
                 normalisation mean (0 after normalising, what masking calls "absent")
    center-crop  the smallest size that covers, centred; the overhang is cut off
    """

    height: int
    width: int
    content: tuple[int, int]
    offset: tuple[int, int]


def fit(h: int, w: int, spec: InputSpec) -> Fit:
    """The geometry of `to_model_input` for an h x w image (see Fit)."""
    H, W = spec.height, spec.width
    if spec.resize == "stretch" or (h * W == w * H):
        return Fit(H, W, (H, W), (0, 0))
    if spec.resize not in RESIZE_MODES:
        raise InvalidArgument(f"input.resize {spec.resize!r} is not one of {', '.join(RESIZE_MODES)}")
    scale = min(H / h, W / w) if spec.resize == "letterbox" else max(H / h, W / w)
    ch, cw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    return Fit(H, W, (ch, cw), ((H - ch) // 2, (W - cw) // 2))


def _place(content: np.ndarray, f: Fit, fill: np.ndarray | float) -> np.ndarray:
    """Put HWC `content` (f.content sized) into an f.height x f.width canvas at f.offset."""
    out = np.empty((f.height, f.width, content.shape[2]), dtype=np.float32)
    out[...] = fill
    top, left = f.offset
    ys, xs = max(0, top), max(0, left)
    ye, xe = min(f.height, top + f.content[0]), min(f.width, left + f.content[1])
    out[ys:ye, xs:xe] = content[ys - top : ye - top, xs - left : xe - left]
    return out


def _check_size(h: int, w: int) -> None:
    if h <= 0 or w <= 0:
        raise InvalidArgument(f"image has a zero dimension ({h} x {w})")
    if h > MAX_SIDE or w > MAX_SIDE or h * w > MAX_PIXELS:
        raise ResourceExhausted(f"image is {h} x {w}; the largest accepted side is {MAX_SIDE} pixels")


@dataclass(frozen=True)
class ImageHeader:
    """What an Image message will decode to, read without decoding any pixel."""

    height: int
    width: int
    channels: int  # of the decoded array: 1, 3 or 4


def _undecodable(data: bytes, e: BaseException) -> InvalidArgument:
    return InvalidArgument(
        f"image.encoded ({len(data)} bytes) could not be decoded as an image ({e.__class__.__name__}); "
        "send PNG or JPEG bytes, or a raw tensor in image.tensor"
    )


def _open(data: bytes) -> PILImage.Image:
    try:
        return PILImage.open(io.BytesIO(data), formats=FORMATS)
    except PILImage.DecompressionBombError:
        raise ResourceExhausted(f"image is larger than {MAX_PIXELS} pixels") from None
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        TypeError,
        struct.error,
        EOFError,
        IndexError,
        KeyError,
        ZeroDivisionError,
        OverflowError,
        MemoryError,
    ) as e:
        # Pillow's header parsers raise a zoo of built-ins on malformed input.
        raise _undecodable(data, e) from None


def _channels_of(mode: str, bands: tuple[str, ...]) -> int:
    if mode in ("L", "RGB", "RGBA"):
        return len(bands)
    return 4 if "A" in bands else 3


def _check_tensor_image(t: pb.Tensor) -> tuple[int, int, int]:
    if len(t.shape) not in (2, 3):
        raise InvalidArgument(f"image.tensor shape {list(t.shape)[:8]} must be [H, W] or [H, W, C]")
    if len(t.shape) == 3 and t.shape[2] not in (1, 3, 4):
        raise InvalidArgument(
            f"image.tensor has {t.shape[2]} channels (shape {list(t.shape)}); give 1, 3 or 4 as the last dimension (HWC)"
        )
    if all(s > 0 for s in t.shape):
        _check_size(int(t.shape[0]), int(t.shape[1]))
    if t.dtype in ("int32", "int64"):
        raise InvalidArgument(f"image.tensor dtype {t.dtype} is not an image dtype; use uint8 or float32")
    check_tensor(t, what="image.tensor")
    return int(t.shape[0]), int(t.shape[1]), int(t.shape[2]) if len(t.shape) == 3 else 1


def probe_image(image: pb.Image) -> ImageHeader:
    """Size and channels of an Image message from its header (encoded) or its shape (tensor),
    with every check that needs no pixel: the admission step before any decoding work.
    Reading a PNG or JPEG header costs microseconds, whatever the image's size."""
    which = image.WhichOneof("source")
    if which is None:
        raise InvalidArgument("image is empty: set image.encoded (PNG/JPEG bytes) or image.tensor")
    if which == "tensor":
        return ImageHeader(*_check_tensor_image(image.tensor))
    if is_dicom_image(image):  # the DICOM header: rows x columns, frames, bit layout, transfer syntax
        from xaiserve.service.dicom_in import probe_dicom

        return ImageHeader(*probe_dicom(image))
    data = image.encoded
    if not data:
        raise InvalidArgument("image.encoded is empty: send PNG or JPEG bytes")
    with _open(data) as im:
        w, h = im.size
        _check_size(h, w)
        return ImageHeader(h, w, _channels_of(im.mode, im.getbands()))


def decode_image_source(image: pb.Image, spec: InputSpec | None = None):
    """decode_image, and for a DICOM image the service.dicom_in.DicomSource a DICOM result references
    (None for other images)."""
    if is_dicom_image(image):
        from xaiserve.service.dicom_in import decode_dicom

        d = decode_dicom(image, spec.dicom if spec else None, spec.channels if spec else 1)
        return d.pixels, d.source
    return decode_image(image, spec), None


def decode_image(image: pb.Image, spec: InputSpec | None = None) -> np.ndarray:
    """Decode an Image message to HWC float32 in [0, 1] (C = 1, 3 or 4), checking everything.
    DICOM goes through service.dicom_in, windowed as `spec` (the model's input) says."""
    if is_dicom_image(image):
        return decode_image_source(image, spec)[0]
    which = image.WhichOneof("source")
    if which is None:
        raise InvalidArgument("image is empty: set image.encoded (PNG/JPEG bytes) or image.tensor")
    if which == "encoded":
        data = image.encoded
        if not data:
            raise InvalidArgument("image.encoded is empty: send PNG or JPEG bytes")
        im = _open(data)
        try:
            w, h = im.size
            _check_size(h, w)
            im.load()
            if im.mode not in ("L", "RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            arr = np.asarray(im, dtype=np.float32) / 255.0
        except PILImage.DecompressionBombError:
            raise ResourceExhausted(f"image is larger than {MAX_PIXELS} pixels") from None
        except (
            UnidentifiedImageError,
            OSError,
            SyntaxError,
            ValueError,
            TypeError,
            struct.error,
            EOFError,
            IndexError,
            KeyError,
            ZeroDivisionError,
            OverflowError,
        ) as e:
            raise _undecodable(data, e) from None
        finally:
            im.close()
        if arr.ndim not in (2, 3) or arr.shape[:2] != (h, w):
            raise InvalidArgument(
                f"image.encoded decoded to shape {list(arr.shape)}, not the {h} x {w} its header declares"
            )
    else:
        t = image.tensor
        _check_tensor_image(t)
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
    """HWC [0,1] of any size -> CHW float32 at the model's size, normalised (x - mean) / std,
    fitted by spec.resize (see Fit); `to_input_geometry` maps a map at the model's size back."""
    a = to_channels(arr, spec.channels)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    f = fit(a.shape[0], a.shape[1], spec)
    if f.content == (spec.height, spec.width) and f.offset == (0, 0):
        a = resize(a, spec.height, spec.width)
    else:
        a = _place(resize(a, *f.content), f, mean)
    return np.ascontiguousarray(((a - mean) / std).transpose(2, 0, 1), dtype=np.float32)


def to_input_geometry(values: np.ndarray, spec: InputSpec, height: int, width: int, *, clip: bool = True) -> np.ndarray:
    """A map [..., h_m, w_m] at the model's input size -> [..., height, width] over the original
    image, undoing `to_model_input`'s fit: letterbox padding is cut away; with center-crop the
    border the model never saw is 0. A map at a coarser grid than the model's input (a RELAX or
    ablation mask grid at the same aspect) is first scaled to the model's size."""
    a = np.asarray(values, dtype=np.float32)
    lead = a.shape[:-2]
    flat = a.reshape(-1, a.shape[-2], a.shape[-1])
    f = fit(height, width, spec)
    out = np.empty((flat.shape[0], height, width), dtype=np.float32)
    for i, m in enumerate(flat):
        if m.shape != (spec.height, spec.width):
            m = resize(m[:, :, None], spec.height, spec.width)[:, :, 0]
        if f.content == (spec.height, spec.width) and f.offset == (0, 0):
            out[i] = resize(m[:, :, None], height, width)[:, :, 0]
            continue
        top, left = f.offset
        ch, cw = f.content
        # the part of the content the model saw, in model and in content coordinates
        ys, xs = max(0, top), max(0, left)
        ye, xe = min(spec.height, top + ch), min(spec.width, left + cw)
        seen = np.zeros((ch, cw), dtype=np.float32)
        seen[ys - top : ye - top, xs - left : xe - left] = m[ys:ye, xs:xe]
        out[i] = resize(seen[:, :, None], height, width)[:, :, 0]
    if clip:
        out = np.clip(out, 0.0, 1.0)
    return out.reshape(*lead, height, width)


def preview_shape(height: int, width: int, limit: int) -> tuple[int, int]:
    """The image's own aspect ratio with the longer side at most `limit` (progress previews of a job:
    the geometry of the result without its full resolution)."""
    scale = min(1.0, limit / max(height, width))
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an [h, w] mask to [height, width], kept in [0, 1]."""
    out = resize(mask[:, :, None].astype(np.float32), height, width)[:, :, 0]
    return np.clip(out, 0.0, 1.0)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def encode_png(arr: np.ndarray, level: int = PNG_LEVEL) -> bytes:
    """PNG bytes of an HW or HWC (C = 1, 3, 4) array in [0,1] (float) or uint8.

    Written here rather than by Pillow: Pillow tries five row filters on every row and keeps the
    best, which costs more than the compression itself (x3-x5 at level 1). One 'up' filter (each
    row minus the row above) makes smooth masks and photos compress well; level 0 stores."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        color, bpp = 0, 1
    elif a.ndim == 3 and a.shape[2] in (3, 4):
        color, bpp = (2 if a.shape[2] == 3 else 6), a.shape[2]
    else:
        raise ValueError(f"encode_png takes HW or HWC with C in 1, 3, 4; got shape {list(a.shape)}")
    h, w = a.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"encode_png: empty image {h} x {w}")
    rows = a.reshape(h, w * bpp)
    raw = np.empty((h, w * bpp + 1), np.uint8)
    if level <= 0:
        raw[:, 0] = 0  # filter 'none'
        raw[:, 1:] = rows
        idat = zlib.compress(raw.data, 0)
    else:
        raw[:, 0] = 2  # filter 'up' (mod 256); the row above the first is zeros
        raw[0, 1:] = rows[0]
        np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])
        if _isal is not None:
            idat = _isal.compress(raw.data, min(int(level) - 1, 3))
        else:
            idat = zlib.compress(raw.data, min(int(level), 9))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_bound(height: int, width: int, channels: int) -> int:
    """Largest size encode_png can produce for an image of this shape (zlib's deflateBound plus the
    PNG container): the admission step refuses a response that could not fit before rendering it."""
    raw = height * (width * channels + 1)
    return raw + (raw >> 12) + (raw >> 14) + (raw >> 25) + 13 + 6 + 8 + 3 * 12 + 13


def heat_colormap(values: np.ndarray) -> np.ndarray:
    """Map [0,1] to RGB, blue (low) -> white -> red (high); HW -> HWC float."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    blue = np.array([0.15, 0.25, 0.85], dtype=np.float32)
    white = np.array([1.0, 1.0, 1.0], dtype=np.float32)
    red = np.array([0.85, 0.1, 0.1], dtype=np.float32)
    low = blue + (white - blue) * (v * 2.0)
    high = white + (red - white) * (v * 2.0 - 1.0)
    return np.where(v < 0.5, low, high)


# heat_colormap at the 256 levels a PNG can hold, as a Pillow palette: colouring an 8-bit mask is
# then one table look-up per pixel in C.
_HEAT_PALETTE = (heat_colormap(np.arange(256, dtype=np.float32) / 255.0) * 255.0 + 0.5).astype(np.uint8).tobytes()


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """[0,1] float -> uint8 with rounding (what a PNG of the array holds); in place on one
    temporary, as this runs on every pixel of every rendering."""
    t = np.multiply(arr, 255.0, dtype=np.float32)
    t += 0.5
    np.clip(t, 0.0, 255.0, out=t)
    return t.astype(np.uint8)


def mask_png(mask: np.ndarray, level: int = PNG_LEVEL) -> bytes:
    """The grayscale PNG of an HW [0,1] mask."""
    return encode_png(to_uint8(mask), level)


def overlay_png(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, level: int = PNG_LEVEL) -> bytes:
    """The PNG of an HW [0,1] mask in heat_colormap over its HWC [0,1] image (same height and
    width): the pixels of encode_png(overlay(image, mask, alpha)) up to one level of rounding,
    computed in 8 bits (the colour map as a palette look-up, the blend in Pillow)."""
    q = to_uint8(mask)
    h, w = q.shape
    heat = PILImage.frombuffer("P", (w, h), q.tobytes(), "raw", "P", 0, 1)
    heat.putpalette(_HEAT_PALETTE)
    base = PILImage.fromarray(to_uint8(to_channels(image, 3)), mode="RGB")
    return encode_png(np.asarray(PILImage.blend(base, heat.convert("RGB"), alpha)), level)


# One helper thread encodes the mask PNG while the calling (decode-pool) thread renders the overlay:
# both compressors release the GIL, so the two PNGs cost about the longer one. Callers are the
# decode pool's threads, so at most that many encodes wait here.
_MASK_ENCODER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="png")


def render_pngs(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, level: int = PNG_LEVEL) -> tuple[bytes, bytes]:
    """(mask_png, overlay_png) of one mask and image, the two encoded at the same time."""
    fut = _MASK_ENCODER.submit(mask_png, mask, level)
    ov = overlay_png(image, mask, alpha, level)
    return fut.result(), ov


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0,1] heatmap (HW, same size as image) over an HWC [0,1] image."""
    rgb = to_channels(image, 3)
    return (1.0 - alpha) * rgb + alpha * heat_colormap(heat)
