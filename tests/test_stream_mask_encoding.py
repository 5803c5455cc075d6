"""Mask encodings: each round-trips to the float mask within its stated precision, pure and
through the real server; a stream answers uint8 on the model's grid unless asked otherwise."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image as PILImage

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service import mask_encoding as me
from xaiserve.service.images import InputSpec, encode_png, resize_mask, to_input_geometry
from xaiserve.service.mask_wire import decode_mask, fill_mask, with_stream_defaults
from xaiserve.service.tensors import from_tensor, to_tensor

BOUND = me.MAX_QUANT_ERROR + 1e-6  # half a quantisation step, plus float32 rounding


def smooth_mask(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.random((4, 4)).astype(np.float32)
    return np.clip(resize_mask(coarse, h, w), 0.0, 1.0)


def test_uint8_and_png_are_within_half_a_step_and_uint8_is_exactly_the_png():
    m = smooth_mask(64, 64)
    m[0, :4] = [0.0, 1.0, 0.5, 1.0 / 510]  # the edges of the range and a value on a rounding boundary
    q = me.quantize(m)
    assert q.dtype == np.uint8
    assert np.abs(me.dequantize(q) - m).max() <= BOUND
    from_png = me.png_decode(encode_png(q))
    assert np.array_equal(from_png, q)
    with pytest.raises(ValueError, match="could not be decoded"):
        me.png_decode(b"\x89PNG not really")
    rgb = io.BytesIO()
    PILImage.new("RGB", (4, 4)).save(rgb, format="PNG")
    with pytest.raises(ValueError, match="grayscale"):
        me.png_decode(rgb.getvalue())


@pytest.mark.parametrize(
    "resize_mode,h,w", [("stretch", 48, 80), ("letterbox", 48, 80), ("center-crop", 48, 80), ("letterbox", 90, 30)]
)
def test_model_grid_mapped_back_equals_the_servers_input_resolution_mask(resize_mode, h, w):
    spec = InputSpec(32, 32, 3, (0.5,) * 3, (0.25,) * 3, resize=resize_mode)
    image = np.random.default_rng(1).random((h, w, 3)).astype(np.float32)
    mask = smooth_mask(32, 32, 2)
    at_input, at_model = pb.ExplainResponse(), pb.ExplainResponse()
    fill_mask(at_input, image, mask, pb.ExplainOptions(), spec)
    fill_mask(at_model, image, mask, pb.ExplainOptions(mask_resolution=pb.MASK_AT_MODEL), spec)
    full = from_tensor(at_input.mask)
    assert full.shape == (h, w) and full.dtype == np.float32
    np.testing.assert_array_equal(full, to_input_geometry(mask, spec, h, w))
    assert list(at_model.mask.shape) == [32, 32]
    g = at_model.mask_geometry
    assert (g.height, g.width, g.input_height, g.input_width) == (32, 32, h, w)
    np.testing.assert_allclose(decode_mask(at_model), full, atol=1e-6)
    for enc in (pb.MASK_UINT8, pb.MASK_PNG):
        r = pb.ExplainResponse()
        fill_mask(r, image, mask, pb.ExplainOptions(mask_encoding=enc, mask_resolution=pb.MASK_AT_MODEL), spec)
        assert np.abs(decode_mask(r) - full).max() <= BOUND, pb.MaskEncoding.Name(enc)


def test_to_input_rejects_a_mask_that_does_not_match_its_geometry():
    with pytest.raises(ValueError, match="geometry"):
        me.to_input(np.zeros((8, 8), np.float32), me.MaskGeometry(16, 16, 32, 32, 0, 0, 16, 16))
    with pytest.raises(ValueError, match="zero or negative"):
        me.MaskGeometry(0, 16, 32, 32, 0, 0, 16, 16).check()


def _jpeg(h: int, w: int, seed: int = 0) -> bytes:
    a = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


ENCODINGS = [
    (e, r) for e in (pb.MASK_FLOAT32, pb.MASK_UINT8, pb.MASK_PNG) for r in (pb.MASK_AT_INPUT, pb.MASK_AT_MODEL)
]


def test_every_encoding_through_explain_decodes_to_the_float32_input_mask(stub):
    img = pb.Image(encoded=_jpeg(48, 80))
    ref_resp = stub.Explain(pb.ExplainRequest(model="tiny-nemu", image=img), timeout=30)
    ref = from_tensor(ref_resp.mask)
    assert ref.shape == (48, 80) and ref.dtype == np.float32
    sizes = {}
    for enc, res in ENCODINGS:
        opts = pb.ExplainOptions(mask_encoding=enc, mask_resolution=res)
        r = stub.Explain(pb.ExplainRequest(model="tiny-nemu", image=img, options=opts), timeout=30)
        got = decode_mask(r)
        assert got.shape == ref.shape
        bound = 1e-6 if enc == pb.MASK_FLOAT32 else BOUND
        assert np.abs(got - ref).max() <= bound, (pb.MaskEncoding.Name(enc), pb.MaskResolution.Name(res))
        if enc == pb.MASK_PNG:
            assert not r.mask.shape and r.mask_png
        sizes[(enc, res)] = r.mask.ByteSize() + len(r.mask_png)
    # the model grid (32 x 32 here) is smaller than the 48 x 80 input, and 8 bits are smaller than 32
    assert (
        sizes[(pb.MASK_UINT8, pb.MASK_AT_MODEL)]
        < sizes[(pb.MASK_FLOAT32, pb.MASK_AT_MODEL)]
        < sizes[(pb.MASK_FLOAT32, pb.MASK_AT_INPUT)]
    )
    assert sizes[(pb.MASK_UINT8, pb.MASK_AT_MODEL)] < sizes[(pb.MASK_UINT8, pb.MASK_AT_INPUT)]


def test_return_png_with_a_model_grid_mask_still_overlays_at_the_input_resolution(stub):
    opts = pb.ExplainOptions(return_png=True, mask_encoding=pb.MASK_UINT8, mask_resolution=pb.MASK_AT_MODEL)
    r = stub.Explain(
        pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=_jpeg(48, 80)), options=opts), timeout=30
    )
    assert PILImage.open(io.BytesIO(r.overlay_png)).size == (80, 48)
    assert PILImage.open(io.BytesIO(r.mask_png)).size == (32, 32)  # the mask's PNG is on the mask's grid
    assert np.array_equal(me.png_decode(r.mask_png), from_tensor(r.mask))


@pytest.mark.parametrize("field,value", [("mask_encoding", 9), ("mask_resolution", 7)])
def test_an_unknown_encoding_number_is_invalid_argument(stub, field, value):
    opts = pb.ExplainOptions(**{field: value})
    with pytest.raises(grpc.RpcError) as e:
        stub.Explain(
            pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=_jpeg(32, 32)), options=opts), timeout=30
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"options.{field} {value}" in e.value.details()


def test_a_stream_answers_uint8_on_the_model_grid_by_default(stub):
    def frames():
        for i in range(3):
            f = pb.ExplainFrame(frame_id=i, image=pb.Image(encoded=_jpeg(48, 80, i)))
            if i == 0:
                f.model, f.policy = "tiny-nemu", pb.ALL
            yield f

    out = list(stub.StreamExplain(frames(), timeout=60))
    assert len(out) == 3
    for a in out:
        assert a.result.mask.dtype == "uint8" and list(a.result.mask.shape) == [32, 32]
        assert decode_mask(a.result).shape == (48, 80)
    assert with_stream_defaults(pb.ExplainOptions(mask_encoding=pb.MASK_FLOAT32)).mask_resolution == pb.MASK_AT_MODEL


def test_a_response_without_geometry_is_taken_as_input_resolution():
    m = smooth_mask(20, 30)
    r = pb.ExplainResponse(mask=to_tensor(m))
    np.testing.assert_array_equal(decode_mask(r), m)
