"""Denoise request decoding and validation (xaiserve/service/denoise.py)."""

from __future__ import annotations

import io

import mrcfile
import numpy as np
import pytest

from xaiserve.errors import InvalidArgument, ResourceExhausted
from xaiserve.handlers.denoise.mrc import mrc_bytes, parse_mrc_bytes
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.denoise import fourier_resample, particles_from_request, to_mrc_bytes
from xaiserve.service.registry import ModelEntry
from xaiserve.service.tensors import to_tensor

ENTRY = ModelEntry.from_dict(
    {
        "name": "cryoem-spiral",
        "version": "1",
        "kind": "denoiser",
        "files": {"onnx": "cryoem-spiral/1/model.onnx"},
        "input": {"height": 32, "width": 32, "channels": 1, "mean": [0.0], "std": [1.0]},
        "particles": {"size_policy": "resample", "min_side": 16, "max_side_factor": 8},
    }
)
REJECTING = ModelEntry.from_dict({**ENTRY.raw, "particles": {"size_policy": "reject"}})


def _stack(n: int = 3, side: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, side, side)).astype(np.float32)


def _req(arr: np.ndarray | None = None, *, mrc: bytes | None = None, dtype=None) -> pb.DenoiseRequest:
    if mrc is not None:
        return pb.DenoiseRequest(model="cryoem-spiral", mrc=mrc)
    if arr is None:
        return pb.DenoiseRequest(model="cryoem-spiral")
    a = arr if dtype is None else arr.astype(dtype)
    return pb.DenoiseRequest(model="cryoem-spiral", tensor=to_tensor(a))


def test_tensor_stack_single_image_and_mrc_are_accepted():
    s = _stack()
    out = particles_from_request(_req(s), ENTRY, max_batch=8)
    assert out.shape == (3, 1, 32, 32) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0], s)
    one = particles_from_request(_req(s[0]), ENTRY, max_batch=8)
    assert one.shape == (1, 1, 32, 32)
    np.testing.assert_array_equal(particles_from_request(_req(s[:, None]), ENTRY, 8)[:, 0], s)  # [N,1,H,W]
    np.testing.assert_array_equal(particles_from_request(_req(s, dtype=np.float64), ENTRY, 8)[:, 0], s)
    via_mrc = particles_from_request(_req(mrc=to_mrc_bytes(s)), ENTRY, max_batch=8)
    np.testing.assert_array_equal(via_mrc[:, 0], s)


def test_mrc_written_by_mrcfile_in_integer_mode(tmp_path):
    ints = np.arange(2 * 32 * 32, dtype=np.int16).reshape(2, 32, 32) % 50
    with mrcfile.new(tmp_path / "p.mrcs") as m:
        m.set_data(ints)
        m.set_image_stack()
    out = particles_from_request(_req(mrc=(tmp_path / "p.mrcs").read_bytes()), ENTRY, 4)
    np.testing.assert_array_equal(out[:, 0], ints.astype(np.float32))


def test_missing_particles():
    with pytest.raises(InvalidArgument, match="no particles"):
        particles_from_request(_req(), ENTRY, 8)
    with pytest.raises(InvalidArgument, match="mrc is empty"):
        particles_from_request(pb.DenoiseRequest(model="m", mrc=b""), ENTRY, 8)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_the_particle(bad):
    s = _stack(4)
    s[2, 5, 7] = bad
    with pytest.raises(InvalidArgument, match=r"particle 2 of 4 contains NaN or Inf"):
        particles_from_request(_req(s), ENTRY, 8)
    with pytest.raises(InvalidArgument, match=r"particle 2 of 4"):
        particles_from_request(_req(mrc=mrc_bytes(s)), ENTRY, 8)


def test_batch_limits():
    with pytest.raises(ResourceExhausted, match=r"9 particles .* maximum of 8"):
        particles_from_request(_req(_stack(9)), ENTRY, max_batch=8)
    with pytest.raises(ResourceExhausted, match=r"maximum of 8|limit"):
        particles_from_request(_req(mrc=mrc_bytes(_stack(9))), ENTRY, max_batch=8)
    empty = pb.DenoiseRequest(model="m", tensor=pb.Tensor(dtype="float32", shape=[0, 32, 32], data=b""))
    with pytest.raises(InvalidArgument, match="empty"):
        particles_from_request(empty, ENTRY, 8)


def test_shape_and_dtype_errors():
    with pytest.raises(InvalidArgument, match="dtype 'int32'"):
        particles_from_request(_req(_stack().astype(np.int32)), ENTRY, 8)
    with pytest.raises(InvalidArgument, match=r"\[N, H, W\]"):
        particles_from_request(_req(np.zeros((2, 2, 32, 32), np.float32)), ENTRY, 8)
    with pytest.raises(InvalidArgument, match="bytes of data"):
        t = to_tensor(_stack())
        t.data = t.data[:-4]
        particles_from_request(pb.DenoiseRequest(model="m", tensor=t), ENTRY, 8)
    with pytest.raises(InvalidArgument, match=r"32 x 40 \(not square\)"):
        particles_from_request(_req(np.zeros((2, 32, 40), np.float32)), ENTRY, 8)
    with pytest.raises(InvalidArgument, match=r"8 x 8; model cryoem-spiral:1 takes 32 x 32"):
        particles_from_request(_req(np.zeros((2, 8, 8), np.float32)), ENTRY, 8)
    with pytest.raises(InvalidArgument, match=r"largest side accepted is 256"):
        particles_from_request(_req(np.zeros((1, 300, 300), np.float32)), ENTRY, 8)
    with pytest.raises(InvalidArgument, match=r"64 x 64; model cryoem-spiral:1 takes 32 x 32"):
        particles_from_request(_req(np.zeros((1, 64, 64), np.float32)), REJECTING, 8)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00" * 100, "shorter than the 1024-byte MRC header"),
        (b"x" * 3000, "not a valid MRC file"),
        (mrc_bytes(np.zeros((2, 32, 32), np.float32))[:-100], "corrupt"),
    ],
)
def test_corrupt_mrc_is_invalid_argument(data, message):
    with pytest.raises(InvalidArgument, match=message):
        particles_from_request(_req(mrc=data), ENTRY, 8)


def test_mrc_header_declaring_too_much_data_is_resource_exhausted():
    good = bytearray(mrc_bytes(np.zeros((2, 32, 32), np.float32)))
    good[8:12] = np.int32(100000).tobytes()  # nz = 100000 sections, data absent
    with pytest.raises(ResourceExhausted, match="declares"):
        particles_from_request(_req(mrc=bytes(good)), ENTRY, 8)


def test_other_square_sizes_are_fourier_resampled():
    side = 64
    ax = (2 * np.arange(side) + 1 - side) / side
    smooth = np.exp(-((ax[None, :] - 0.2) ** 2 + (ax[:, None] + 0.1) ** 2) / 0.08).astype(np.float32)
    out = particles_from_request(_req(np.stack([smooth, 2 * smooth])), ENTRY, 8)
    assert out.shape == (2, 1, 32, 32)
    ax32 = (2 * np.arange(32) + 1 - 32) / 32
    ref = np.exp(-((ax32[None, :] - 0.2) ** 2 + (ax32[:, None] + 0.1) ** 2) / 0.08)
    np.testing.assert_allclose(out[0, 0], ref, atol=0.01)
    np.testing.assert_allclose(out[1, 0], 2 * out[0, 0], rtol=1e-5, atol=1e-6)
    up = fourier_resample(out[:, 0], 64)  # back up: the band-limited content is kept
    np.testing.assert_allclose(up[0], smooth, atol=0.01)
    assert fourier_resample(smooth[None], 32).mean() == pytest.approx(smooth.mean(), rel=1e-4)


def test_to_mrc_bytes_round_trip():
    s = _stack(5)
    data = to_mrc_bytes(s)
    np.testing.assert_array_equal(parse_mrc_bytes(data), s)
    np.testing.assert_array_equal(parse_mrc_bytes(to_mrc_bytes(s[:, None])), s)
    with mrcfile.mrcinterpreter.MrcInterpreter(iostream=io.BytesIO(data)) as m:
        assert m.is_image_stack() and m.header.mode == 2
    with pytest.raises(ValueError):
        to_mrc_bytes(np.zeros((2, 3, 4, 5), np.float32))
