"""Conversion between numpy arrays and the `explain.v1.Tensor` message (little-endian, C order)."""

from __future__ import annotations

import math

import numpy as np

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.errors import InvalidArgument, ResourceExhausted, quote

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "uint8": np.dtype("u1"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
MAX_RANK = 8  # no tensor of ours has more dimensions; a longer shape is a malformed message


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """Encode an array; float arrays of other widths are sent as float32."""
    a = np.asarray(array)
    name = next((k for k, v in DTYPES.items() if v == a.dtype.newbyteorder("<") or v == a.dtype), None)
    if name is None:
        a, name = a.astype("<f4"), "float32"
    a = np.ascontiguousarray(a.astype(DTYPES[name], copy=False))
    return pb.Tensor(dtype=name, shape=list(a.shape), data=a.tobytes())


def check_tensor(
    t: pb.Tensor, *, what: str = "tensor", max_elements: int | None = None
) -> tuple[tuple[int, ...], np.dtype]:
    """Check a Tensor message's dtype, shape and byte length without touching its data (the
    admission step: nothing is allocated); returns (shape, dtype) or raises InvalidArgument /
    ResourceExhausted."""
    if t.dtype not in DTYPES:
        raise InvalidArgument(f"{what}: dtype {quote(t.dtype)} is not supported; use one of {sorted(DTYPES)}")
    if not t.shape:
        raise InvalidArgument(f"{what}: shape is empty; give the tensor's dimensions, e.g. [H, W, 3]")
    if len(t.shape) > MAX_RANK:
        raise InvalidArgument(f"{what}: shape has {len(t.shape)} dimensions; at most {MAX_RANK} are accepted")
    shape = tuple(int(s) for s in t.shape)
    if any(s <= 0 for s in shape):
        raise InvalidArgument(f"{what}: shape {list(shape)} has a zero or negative dimension")
    n = math.prod(shape)
    if max_elements is not None and n > max_elements:
        raise ResourceExhausted(f"{what}: {n} elements is more than the limit of {max_elements}")
    dt = DTYPES[t.dtype]
    expected = n * dt.itemsize
    if len(t.data) != expected:
        raise InvalidArgument(
            f"{what}: {len(t.data)} bytes of data but dtype {t.dtype} x shape {list(shape)} needs {expected}"
        )
    return shape, dt


def from_tensor(t: pb.Tensor, *, what: str = "tensor", max_elements: int | None = None) -> np.ndarray:
    """Decode a Tensor message, checking dtype, shape and byte length; raise InvalidArgument."""
    shape, dt = check_tensor(t, what=what, max_elements=max_elements)
    return np.frombuffer(t.data, dtype=dt).reshape(shape)


def tensor_message_bytes(shape: tuple[int, ...], itemsize: int = 4) -> int:
    """Serialized size of a Tensor of this shape (data, dtype name, packed shape, tags), an upper
    bound used to refuse a response that could not fit the message limit before computing it."""
    data = math.prod(shape) * itemsize
    return data + 10 * len(shape) + 32
