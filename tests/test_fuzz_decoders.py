"""Property-based tests (hypothesis) of every decoder that untrusted bytes reach: encoded images,
raw tensors, MRC stacks and protobuf messages. Whatever the input, a decoder either returns a
well-formed result or raises the project's own errors (xaiserve.errors: InvalidArgument,
ResourceExhausted; ValueError from the pure MRC reader), and never allocates far beyond its input
(a header declaring 2 GB must not make us allocate 2 GB)."""

from __future__ import annotations

import io
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from xaiserve.errors import XaiError
from xaiserve.handlers.denoise.mrc import mrc_bytes, parse_mrc_bytes
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.images import decode_image, encode_png, probe_image
from xaiserve.service.rpc import BadMessage, request_deserializer
from xaiserve.service.tensors import DTYPES, from_tensor

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Any single example may use this much memory above its input (decoding a 64 x 64 image, MRC
# stacks of a few kB): orders of magnitude below what the malformed headers declare.
MEMORY_BOUND = 32 * 1024 * 1024


class bounded_memory:
    def __enter__(self):
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < MEMORY_BOUND, f"peak allocation {peak} bytes"
        return False


def _encoded(fmt: str, shape) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


SEEDS = [
    _encoded("PNG", (16, 12, 3)),
    _encoded("PNG", (9, 7)),
    _encoded("JPEG", (16, 16, 3)),
    _encoded("BMP", (5, 6, 3)),
    _encoded("GIF", (8, 8)),
    _encoded("WEBP", (8, 8, 3)),
    _encoded("TIFF", (4, 4, 3)),
]


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A valid file with some bytes overwritten, cut short, or with bytes inserted."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["set", "cut", "insert", "int32"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "set" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        elif op in ("insert", "set"):
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif pos + 4 <= len(data):  # a plausible-looking length or dimension field
            data[pos : pos + 4] = struct.pack(
                "<I" if draw(st.booleans()) else ">I",
                draw(
                    st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 65535, 65536, 4097, draw(st.integers(0, 2**32 - 1))])
                ),
            )
    return bytes(data)


def _check_image(arr: np.ndarray) -> None:
    assert arr.dtype == np.float32 and arr.ndim == 3 and arr.shape[2] in (1, 3, 4)
    assert np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0


@pytest.mark.slow
@FUZZ
@given(st.one_of(mutated(SEEDS), st.binary(max_size=2048)))
def test_encoded_images_decode_or_raise_our_errors(data):
    img = pb.Image(encoded=data)
    with bounded_memory():
        try:
            hdr = probe_image(img)
        except XaiError:
            hdr = None
        try:
            arr = decode_image(img)
        except XaiError:
            return
    _check_image(arr)
    if hdr is not None:  # the admission step saw the size the decode produced
        assert (hdr.height, hdr.width) == arr.shape[:2]


TENSOR_DTYPES = [*DTYPES, "complex64", "", "float8", "uint8 ", "f" * 300]


@st.composite
def tensors(draw) -> pb.Tensor:
    dtype = draw(st.sampled_from(TENSOR_DTYPES))
    shape = draw(
        st.lists(st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**40, 2**62, -(2**62)])), max_size=10)
    )
    n = 1
    for s in shape:
        n *= s
    itemsize = DTYPES[dtype].itemsize if dtype in DTYPES else 1
    exact = n * itemsize if 0 < n * itemsize <= 20000 else 0
    length = draw(st.one_of(st.just(exact), st.integers(0, 4096)))
    fill = draw(st.sampled_from([b"\x00", b"\x7f", b"\xff", b"\x3c"]))  # 0x7f/0xff: NaN/Inf patterns
    return pb.Tensor(dtype=dtype, shape=shape, data=fill * length)


@pytest.mark.slow
@FUZZ
@given(tensors())
def test_raw_tensors_decode_or_raise_our_errors(t):
    with bounded_memory():
        try:
            a = from_tensor(t)
        except XaiError:
            a = None
        if a is not None:
            assert a.dtype == DTYPES[t.dtype] and list(a.shape) == list(t.shape)
        try:
            probe_image(pb.Image(tensor=t))
            arr = decode_image(pb.Image(tensor=t))
        except XaiError:
            return
    _check_image(arr)


MRC_SEEDS = [
    mrc_bytes(np.random.default_rng(0).standard_normal((3, 8, 8)).astype(np.float32)),
    mrc_bytes(np.zeros((5, 6), np.float32)),
]
# offsets of nx, ny, nz, mode, nsymbt and the machine stamp in the 1024-byte header
MRC_FIELDS = [0, 4, 8, 12, 92, 212]


@st.composite
def mrc_mutants(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(MRC_SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        off = draw(st.sampled_from(MRC_FIELDS))
        value = draw(
            st.one_of(
                st.sampled_from([0, 1, 2, 3, 4, 6, 12, 101, -1, 2**31 - 1, -(2**31), 1 << 20]),
                st.integers(-(2**31), 2**31 - 1),
            )
        )
        data[off : off + 4] = struct.pack("<i", value)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.binary(max_size=64))
    return bytes(data)


@pytest.mark.slow
@FUZZ
@given(st.one_of(mrc_mutants(), mutated(MRC_SEEDS), st.binary(max_size=2048)))
def test_mrc_bytes_parse_or_raise_value_error(data):
    with bounded_memory():
        try:
            arr = parse_mrc_bytes(data, max_values=64 * 64 * 64)
        except ValueError:
            return
    assert arr.dtype == np.float32 and arr.ndim == 3


def test_the_nsymbt_bomb_is_refused_without_allocating():
    """A 33 kB stack declaring a 2 GB extended header made mrcfile allocate 2.1 GB."""
    data = bytearray(mrc_bytes(np.zeros((8, 32, 32), np.float32)))
    data[92:96] = struct.pack("<i", 2**31 - 1)
    with bounded_memory():
        with pytest.raises(ValueError, match="extended header of 2147483647 bytes"):
            parse_mrc_bytes(bytes(data))


REQUESTS = [pb.ExplainRequest, pb.DenoiseRequest, pb.ListModelsRequest, pb.JobRequest, pb.JobRef, pb.ExplainFrame]
VALID = [
    pb.ExplainRequest(model="m", image=pb.Image(encoded=SEEDS[0])).SerializeToString(),
    pb.JobRequest(method="relax", model="m", relax=pb.RelaxParams(num_masks=3)).SerializeToString(),
    pb.ExplainFrame(frame_id=3, model="m", policy=pb.ALL).SerializeToString(),
]


@FUZZ
@given(st.sampled_from(REQUESTS), st.one_of(st.binary(max_size=512), mutated(VALID)))
def test_protobuf_deserializers_never_raise(cls, data):
    out = request_deserializer(cls)(data)
    if isinstance(out, BadMessage):
        err = out.error()
        assert isinstance(err, XaiError) and err.code == "INVALID_ARGUMENT"
        assert f"not a valid {cls.DESCRIPTOR.full_name}" in str(err) and len(str(err)) < 600
    else:
        assert isinstance(out, cls)


@FUZZ
@given(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 3, 4]), st.integers(0, 9))
def test_png_encoder_round_trips_through_pillow(h, w, c, level):
    a = np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)
    back = np.asarray(Image.open(io.BytesIO(encode_png(a, level))))
    assert np.array_equal(back, a)
