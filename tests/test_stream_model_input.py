"""The model input made from 8-bit bands (service/model_input.py) equals the full decode + resize
up to float32 rounding; anything it does not handle falls back to the full path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image as PILImage

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.images import InputSpec, decode_image, to_model_input
from xaiserve.service.model_input import fast_model_input
from xaiserve.service.tensors import from_tensor, to_tensor


def encoded(mode: str, h: int, w: int, fmt: str, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    a = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
    im = PILImage.fromarray(a[:, :, 0] if bands == 1 else a, mode=mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


CASES = [
    ("RGB", "JPEG", 3, "stretch"),
    ("L", "JPEG", 3, "stretch"),
    ("RGB", "PNG", 1, "stretch"),
    ("RGBA", "PNG", 3, "letterbox"),
    ("RGB", "JPEG", 3, "center-crop"),
    ("L", "PNG", 1, "letterbox"),
]


@pytest.mark.parametrize("mode,fmt,channels,resize", CASES)
def test_equals_the_full_decode_and_resize(mode, fmt, channels, resize):
    spec = InputSpec(64, 64, channels, (0.47,) * channels, (0.26,) * channels, resize=resize)
    img = pb.Image(encoded=encoded(mode, 120, 200, fmt))
    got = fast_model_input(img, spec)
    assert got is not None
    shape_only, x = got
    ref = to_model_input(decode_image(img), spec)[None]
    assert x.shape == ref.shape == (1, channels, 64, 64) and x.dtype == np.float32
    assert np.abs(x - ref).max() <= 1e-5
    assert shape_only.shape[:2] == (120, 200) and shape_only.strides == (0, 0, 0)  # the size, no pixels


def test_what_it_does_not_handle_goes_to_the_full_path():
    spec = InputSpec(64, 64, 3, (0.5,) * 3, (0.25,) * 3)
    jpeg = encoded("RGB", 48, 64, "JPEG")
    wide = io.BytesIO()
    PILImage.fromarray(np.full((8, 8), 40000, np.uint16)).save(wide, format="PNG")  # a 16-bit grayscale PNG
    palette = io.BytesIO()
    PILImage.new("P", (8, 8)).save(palette, format="PNG")
    for img in (
        pb.Image(encoded=jpeg[: len(jpeg) // 2]),  # truncated: the full path names the error
        pb.Image(encoded=b"junk"),
        pb.Image(encoded=b""),
        pb.Image(),
        pb.Image(encoded=wide.getvalue()),
        pb.Image(encoded=palette.getvalue()),
        pb.Image(encoded=encoded("RGB", 8, 8, "BMP")),
        pb.Image(tensor=to_tensor(np.zeros((8, 8, 3), np.uint8))),
    ):
        assert fast_model_input(img, spec) is None


def test_the_server_answers_the_same_mask_with_and_without_the_full_decode(stub):
    img = pb.Image(encoded=encoded("RGB", 90, 120, "JPEG", 3))
    lean = stub.Explain(pb.ExplainRequest(model="tiny-nemu", image=img), timeout=30)
    full = stub.Explain(
        pb.ExplainRequest(model="tiny-nemu", image=img, options=pb.ExplainOptions(return_png=True)), timeout=30
    )
    assert np.abs(from_tensor(lean.mask) - from_tensor(full.mask)).max() <= 1e-5
