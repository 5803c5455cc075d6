"""DICOM greyscale pixel transforms as pure numpy functions, and the per-model DICOM defaults.

The greyscale pipeline of DICOM PS3.4 N.2 ("Grayscale transformation"), in the order a viewer applies it:

1. Modality LUT: stored value -> modality value (Hounsfield units for CT), by Rescale Slope / Intercept
   (PS3.3 C.11.1.1.2: ``m = slope * sv + intercept``) or a Modality LUT table.
2. VOI LUT: modality value -> display value in [0, 1], by a window (Window Center / Width with the VOI
   LUT Function LINEAR, LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2 and C.11.2.1.3) or a VOI LUT table.
3. MONOCHROME1: the minimum value is white, so the display value is inverted (PS3.3 C.7.6.3.1.2).

A model that takes more channels than the image has declares how grey becomes channels: ``replicate``
(one window, the grey value copied to every channel) or ``window_stack`` (one window per channel,
e.g. lung / soft tissue / bone for CT).

Nothing here imports grpc, protobuf or pydicom; errors are xaiserve.errors types with messages a
caller can act on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from xaiserve.errors import InvalidArgument

VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
GREY_TO_CHANNELS = ("replicate", "window_stack")


@dataclass(frozen=True)
class Window:
    """A VOI window: centre and width in modality units (HU for CT), and the VOI LUT Function."""

    center: float
    width: float
    function: str = "LINEAR"
    label: str = ""

    def describe(self) -> str:
        name = f"{self.label} " if self.label else ""
        return f"{name}C={self.center:g} W={self.width:g}" + ("" if self.function == "LINEAR" else f" {self.function}")


def check_window(center: float, width: float, function: str = "LINEAR", *, what: str = "window") -> Window:
    """A validated Window; InvalidArgument (naming `what`) for a width <= 0, a non-finite value or an
    unknown function. LINEAR needs width >= 1 (PS3.3 C.11.2.1.2.1); the other functions any width > 0."""
    function = (function or "LINEAR").strip().upper()
    if function not in VOI_FUNCTIONS:
        raise InvalidArgument(
            f"{what}: VOI LUT function {function[:32]!r} is unknown; use one of {', '.join(VOI_FUNCTIONS)}"
        )
    if not (math.isfinite(center) and math.isfinite(width)):
        raise InvalidArgument(
            f"{what}: centre and width must be finite numbers (got centre {center!r}, width {width!r})"
        )
    if width <= 0:
        raise InvalidArgument(
            f"{what}: window width must be > 0 (got {width:g}); give the width of the value range to show, "
            "e.g. centre 40 width 400 for a soft-tissue CT window, centre -600 width 1500 for lung"
        )
    if function == "LINEAR" and width < 1:
        raise InvalidArgument(
            f"{what}: window width {width:g} < 1 is not allowed with the LINEAR VOI LUT function (DICOM PS3.3 "
            "C.11.2.1.2.1); use a width >= 1"
        )
    return Window(float(center), float(width), function)


def _affine(window: Window) -> tuple[float, float]:
    """(lo, scale) such that the LINEAR / LINEAR_EXACT window is clip((x - lo) * scale, 0, 1).

    LINEAR (C.11.2.1.2.1): y = ((x - (c - 0.5)) / (w - 1) + 0.5) on c - 0.5 -/+ (w - 1) / 2, which is
    (x - lo) / (w - 1) with lo = c - 0.5 - (w - 1) / 2. LINEAR_EXACT (C.11.2.1.3.2): (x - (c - w/2)) / w."""
    c, w = window.center, window.width
    if window.function == "LINEAR_EXACT":
        return c - w / 2.0, 1.0 / w
    if w <= 1.0:  # w == 1: a step at c - 0.5 (x <= c - 0.5 -> 0, else 1)
        return c - 0.5, 1e30
    return c - 0.5 - (w - 1.0) / 2.0, 1.0 / (w - 1.0)


def apply_window(values: np.ndarray, window: Window, *, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Display values in [0, 1] (float32) of `values` under `window`.

    `slope` / `intercept` fold the Modality LUT rescale into the same pass (values are then stored
    values): the window is applied to slope * values + intercept, in one affine map and one clip."""
    x = np.asarray(values)
    if window.function == "SIGMOID":  # C.11.2.1.3.1: y = 1 / (1 + exp(-4 (x - c) / w))
        m = x.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        z = np.float32(-4.0 / window.width) * (m - np.float32(window.center))
        return (1.0 / (1.0 + np.exp(np.clip(z, -80.0, 80.0)))).astype(np.float32)
    lo, scale = _affine(window)
    # (slope * x + intercept - lo) * scale: the offset before the scale keeps float32 exact for the
    # integer stored values of CT / MR (x * a + b would cancel digits at large x and narrow windows)
    out = x.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    out += np.float32(intercept - lo)
    out *= np.float32(scale)
    np.clip(out, 0.0, 1.0, out=out)
    if scale >= 1e30:  # the w == 1 step: exactly 0 or 1
        out = (out > 0).astype(np.float32)
    return out


def rescale(values: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Modality LUT by Rescale Slope / Intercept (PS3.3 C.11.1.1.2), float32."""
    out = np.asarray(values).astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def apply_lut_table(values: np.ndarray, first_mapped: int, table: np.ndarray, bits: int) -> np.ndarray:
    """A LUT given as a table (VOI LUT Sequence, PS3.3 C.11.2.1.1): inputs below the first mapped value
    take the first entry, above the last the last one; the output is scaled to [0, 1] by 2**bits - 1."""
    t = np.asarray(table)
    if t.size == 0:
        raise InvalidArgument(
            "the VOI LUT Sequence has an empty LUT Data table; the file is damaged, or send a window instead"
        )
    if not 1 <= int(bits) <= 16:
        raise InvalidArgument(f"the VOI LUT Descriptor says {bits} bits per entry; DICOM allows 8 to 16")
    idx = np.clip(np.rint(np.asarray(values, dtype=np.float64)).astype(np.int64) - int(first_mapped), 0, t.size - 1)
    return (t.astype(np.float32)[idx] / np.float32(2 ** int(bits) - 1)).clip(0.0, 1.0)


def range_window(values: np.ndarray) -> Window:
    """The window spanning the image's own value range (the fallback when nothing else gives one)."""
    x = np.asarray(values)
    lo, hi = float(x.min()), float(x.max())
    return Window(center=(lo + hi) / 2.0, width=max(hi - lo, 1e-6), function="LINEAR_EXACT", label="image range")


def invert(display: np.ndarray) -> np.ndarray:
    """MONOCHROME1 (PS3.3 C.7.6.3.1.2): the minimum value is white, so the display value flips."""
    return (np.float32(1.0) - display).astype(np.float32, copy=False)


def check_bits(bits_allocated: int, bits_stored: int, high_bit: int, samples: int) -> None:
    """The Image Pixel Module's bit layout (PS3.3 C.7.6.3.1): InvalidArgument for layouts no decoder
    can honour (bits stored above bits allocated, above 16 in a 16-bit image, a high bit outside)."""
    if bits_allocated not in (1, 8, 16, 32):
        raise InvalidArgument(f"Bits Allocated is {bits_allocated}; DICOM images use 1, 8, 16 or 32 bits per sample")
    if not 1 <= bits_stored <= bits_allocated:
        extra = " (a 16-bit image stores at most 16 bits)" if bits_allocated == 16 else ""
        raise InvalidArgument(
            f"Bits Stored is {bits_stored} with Bits Allocated {bits_allocated}{extra}: the header is inconsistent; "
            "fix the file's Image Pixel Module (Bits Stored <= Bits Allocated) or re-export it from the modality or PACS"
        )
    if not bits_stored - 1 <= high_bit < bits_allocated:
        raise InvalidArgument(
            f"High Bit is {high_bit} with Bits Stored {bits_stored} and Bits Allocated {bits_allocated}: the header is "
            "inconsistent (High Bit is normally Bits Stored - 1); fix the file's Image Pixel Module"
        )
    if samples not in (1, 3):
        raise InvalidArgument(f"Samples per Pixel is {samples}; images have 1 (greyscale) or 3 (colour) samples")


# -- per-model defaults (the manifest's input.dicom) -----------------------------------------------
@dataclass(frozen=True)
class DicomDefaults:
    """How a model takes a greyscale DICOM image: its window(s) and how grey becomes its channels.

    grey_to_channels "replicate": windows[0] (when given) is the model's window and the grey display
    value is copied to every channel. "window_stack": one window per model channel, stacked."""

    grey_to_channels: str = "replicate"
    windows: tuple[Window, ...] = ()

    def describe(self) -> str:
        return f"{self.grey_to_channels}: " + (", ".join(w.describe() for w in self.windows) or "no default window")

    def to_dict(self) -> dict[str, Any]:
        return {
            "grey_to_channels": self.grey_to_channels,
            "windows": [
                {"center": w.center, "width": w.width, "function": w.function, "label": w.label} for w in self.windows
            ],
        }


def parse_dicom_defaults(d: Mapping[str, Any] | None, channels: int, *, what: str = "model") -> DicomDefaults | None:
    """Parse a manifest entry's input.dicom, e.g.

        {"grey_to_channels": "window_stack",
         "windows": [{"center": -600, "width": 1500, "label": "lung"}, {"center": 40, "width": 400}, ...]}

    Raises ValueError (a malformed manifest is the operator's error, reported at load)."""
    if d is None:
        return None
    if not isinstance(d, Mapping):
        raise ValueError(f"{what}: input.dicom must be an object, got {type(d).__name__}")
    mode = str(d.get("grey_to_channels", "replicate"))
    if mode not in GREY_TO_CHANNELS:
        raise ValueError(f"{what}: input.dicom.grey_to_channels {mode!r} is not one of {GREY_TO_CHANNELS}")
    raw: Sequence[Any] = d.get("windows", [])
    windows = []
    for i, w in enumerate(raw):
        try:
            c, wd = (w["center"], w["width"]) if isinstance(w, Mapping) else (w[0], w[1])
            fn = str(w.get("function", "LINEAR")) if isinstance(w, Mapping) else "LINEAR"
            win = check_window(float(c), float(wd), fn, what=f"{what}: input.dicom.windows[{i}]")
        except (KeyError, IndexError, TypeError, InvalidArgument) as e:
            raise ValueError(
                f"{what}: input.dicom.windows[{i}] is malformed ({e}); give {{'center': C, 'width': W}}"
            ) from None
        label = str(w.get("label", "")) if isinstance(w, Mapping) else ""
        windows.append(Window(win.center, win.width, win.function, label))
    if mode == "window_stack" and len(windows) != channels:
        raise ValueError(
            f"{what}: input.dicom window_stack has {len(windows)} windows for a {channels}-channel model; "
            "give one window per channel"
        )
    if mode == "replicate" and len(windows) > 1:
        raise ValueError(f"{what}: input.dicom replicate takes at most one window, got {len(windows)}")
    return DicomDefaults(mode, tuple(windows))


def grey_to_channels(
    modality: np.ndarray,
    windows: Sequence[Window],
    *,
    monochrome1: bool = False,
    slope: float = 1.0,
    intercept: float = 0.0,
) -> np.ndarray:
    """HWC float32 in [0, 1]: one channel per window (a window stack), or HW1 for one window (which
    to_channels replicates to the model's channels). `slope`/`intercept` fold the rescale in."""
    chans = [apply_window(modality, w, slope=slope, intercept=intercept) for w in windows]
    if monochrome1:
        chans = [invert(c) for c in chans]
    return np.stack(chans, axis=2) if len(chans) > 1 else chans[0][:, :, None]
