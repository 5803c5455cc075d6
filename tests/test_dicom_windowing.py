"""The pure DICOM greyscale math (xaiserve.clinical.windowing) against the formulas of DICOM PS3.3,
and the manifest's input.dicom parsing."""

from __future__ import annotations

import numpy as np
import pytest

from xaiserve.clinical.windowing import (
    DicomDefaults,
    Window,
    apply_lut_table,
    apply_window,
    check_bits,
    check_window,
    grey_to_channels,
    invert,
    parse_dicom_defaults,
    range_window,
)
from xaiserve.errors import InvalidArgument


def linear_reference(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, written as the standard's three cases."""
    y = (x - (c - 0.5)) / (w - 1) + 0.5
    y = np.where(x <= c - 0.5 - (w - 1) / 2, 0.0, y)
    return np.where(x > c - 0.5 + (w - 1) / 2, 1.0, y)


@pytest.mark.parametrize("c,w", [(40.0, 400.0), (-600.0, 1500.0), (0.0, 2.0), (1000.5, 7.0)])
def test_linear_window_matches_the_standard(c, w):
    x = np.linspace(c - w, c + w, 2001).astype(np.float32)  # the pipeline computes in float32
    np.testing.assert_allclose(apply_window(x, Window(c, w)), linear_reference(x.astype(np.float64), c, w), atol=2e-6)


def test_linear_exact_and_sigmoid():
    x = np.linspace(-500, 500, 1001)
    exact = apply_window(x, Window(0.0, 400.0, "LINEAR_EXACT"))
    np.testing.assert_allclose(exact, np.clip((x - (0 - 200)) / 400.0, 0, 1), atol=1e-6)
    sig = apply_window(x, Window(10.0, 100.0, "SIGMOID"))
    np.testing.assert_allclose(sig, 1.0 / (1.0 + np.exp(-4.0 * (x - 10.0) / 100.0)), atol=1e-6)


def test_width_one_is_a_step_at_c_minus_half():
    out = apply_window(np.array([9.0, 9.5, 9.6, 10.0, 11.0]), Window(10.0, 1.0))
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_rescale_is_folded_into_the_window():
    stored = np.arange(0, 4096, 7, dtype=np.uint16)
    hu = stored.astype(np.float64) * 1.0 - 1024.0
    win = Window(40.0, 400.0)
    np.testing.assert_allclose(
        apply_window(stored, win, slope=1.0, intercept=-1024.0), linear_reference(hu, 40.0, 400.0), atol=2e-6
    )
    # a slope other than 1 (e.g. PET, some MR)
    np.testing.assert_allclose(
        apply_window(stored, win, slope=0.5, intercept=-100.0),
        linear_reference(stored * 0.5 - 100.0, 40.0, 400.0),
        atol=2e-6,
    )


@pytest.mark.parametrize(
    "c,w,fn,msg",
    [
        (40, 0, "LINEAR", "must be > 0"),
        (40, -5, "SIGMOID", "must be > 0"),
        (40, 0.5, "LINEAR", "< 1 is not allowed"),
        (float("nan"), 10, "LINEAR", "finite"),
        (40, 400, "GAMMA", "unknown"),
    ],
)
def test_bad_windows_are_invalid_argument(c, w, fn, msg):
    with pytest.raises(InvalidArgument, match=msg):
        check_window(c, w, fn)


def test_lut_table_range_window_and_inversion():
    table = np.array([0, 100, 200, 255], dtype=np.uint16)
    out = apply_lut_table(np.array([-5, 10, 11, 12, 13, 99]), 11, table, 8)
    np.testing.assert_allclose(out, np.array([0, 0, 0, 100, 200, 255]) / 255.0, atol=1e-6)
    x = np.array([[-100.0, 0.0], [50.0, 300.0]])
    win = range_window(x)
    shown = apply_window(x, win)
    assert shown.min() == 0.0 and shown.max() == 1.0
    np.testing.assert_allclose(invert(shown), 1.0 - shown)


def test_window_stack_and_monochrome1():
    hu = np.array([[-1000.0, -600.0], [40.0, 1000.0]])
    wins = (Window(-600, 1500), Window(40, 400), Window(400, 1800))
    stack = grey_to_channels(hu, wins)
    assert stack.shape == (2, 2, 3)
    for i, w in enumerate(wins):
        np.testing.assert_allclose(stack[:, :, i], linear_reference(hu, w.center, w.width), atol=2e-6)
    np.testing.assert_allclose(grey_to_channels(hu, wins, monochrome1=True), 1.0 - stack, atol=1e-6)
    assert grey_to_channels(hu, wins[:1]).shape == (2, 2, 1)


@pytest.mark.parametrize(
    "alloc,stored,high,msg",
    [
        (16, 17, 16, "at most 16 bits"),
        (16, 12, 16, "High Bit"),
        (16, 12, 10, "High Bit"),
        (12, 12, 11, "Bits Allocated is 12"),
        (8, 0, 0, "inconsistent"),
    ],
)
def test_bit_layouts(alloc, stored, high, msg):
    with pytest.raises(InvalidArgument, match=msg):
        check_bits(alloc, stored, high, 1)
    check_bits(16, 12, 11, 1)


def test_manifest_defaults():
    d = parse_dicom_defaults(
        {
            "grey_to_channels": "window_stack",
            "windows": [{"center": -600, "width": 1500, "label": "lung"}, [40, 400], {"center": 400, "width": 1800}],
        },
        3,
    )
    assert isinstance(d, DicomDefaults) and d.grey_to_channels == "window_stack" and d.windows[0].label == "lung"
    assert parse_dicom_defaults(d.to_dict(), 3) == d
    assert parse_dicom_defaults(None, 3) is None
    with pytest.raises(ValueError, match="one window per channel"):
        parse_dicom_defaults({"grey_to_channels": "window_stack", "windows": [[40, 400]]}, 3)
    with pytest.raises(ValueError, match="malformed"):
        parse_dicom_defaults({"windows": [{"center": 40, "width": 0}]}, 3)
    with pytest.raises(ValueError, match="not one of"):
        parse_dicom_defaults({"grey_to_channels": "rainbow"}, 3)
