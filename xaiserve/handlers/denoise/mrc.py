"""MRC particle stacks (the Cryo-EM exchange format) in files and in memory, via `mrcfile`.

A stack is float32 [N, H, W] (N sections of H rows x W columns; mrcfile's data axes are
(z, y, x)). A single 2-D image reads as N = 1. Written stacks are mode 2 (float32) with the image
stack space group (ispg 0), as `.mrcs` files from RELION / cryoSPARC are.

Parsing untrusted bytes: the header is read and checked first (dimensions, mode, declared size
against a limit), then the data, with mrcfile in strict mode; every failure is a ValueError
with a message saying what is wrong, which the serving layer turns into InvalidArgument.
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from mrcfile.mrcinterpreter import MrcInterpreter

HEADER_BYTES = 1024
# mrcfile modes: 0 int8, 1 int16, 2 float32, 4 complex64, 6 uint16, 12 float16 (101: 4-bit).
REAL_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}


class MrcTooLarge(ValueError):
    """The header declares more values than the caller allows."""


def _as_stack(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"an MRC particle stack is [N, H, W] or [H, W]; got shape {list(a.shape)}")
    return np.ascontiguousarray(a, dtype=np.float32)


def mrc_bytes(stack: np.ndarray, voxel_size: float = 1.0) -> bytes:
    """float32 [N, H, W] (or [H, W]) -> bytes of an MRC image stack (mode 2, ispg 0)."""
    data = _as_stack(stack)
    buf = io.BytesIO()
    # mrcfile's documented way to write to a stream: no stream at init, default attributes,
    # then set _iostream (see MrcInterpreter.__init__'s docstring).
    m = MrcInterpreter()
    m._create_default_attributes()
    m._iostream = buf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # header statistics of data with NaN (rejected elsewhere)
        m.set_data(data)
        m.set_image_stack()
        m.voxel_size = voxel_size
        m.update_header_stats()
        m.flush()
    return buf.getvalue()


def parse_mrc_bytes(data: bytes, *, max_values: int | None = None) -> np.ndarray:
    """Bytes of an MRC image or stack -> float32 [N, H, W]; ValueError if corrupt or unsupported,
    MrcTooLarge if the header declares more than max_values values."""
    if len(data) < HEADER_BYTES:
        raise ValueError(f"{len(data)} bytes is shorter than the {HEADER_BYTES}-byte MRC header; the file is truncated or not MRC")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            head = MrcInterpreter(iostream=io.BytesIO(data), permissive=False, header_only=True)
        except ValueError as e:
            raise ValueError(f"not a valid MRC file: {e}") from e
        h = head.header
        nx, ny, nz, mode = int(h.nx), int(h.ny), int(h.nz), int(h.mode)
        if min(nx, ny, nz) <= 0:
            raise ValueError(f"MRC header has a zero or negative dimension (nx={nx}, ny={ny}, nz={nz})")
        if mode not in REAL_MODES:
            raise ValueError(f"MRC mode {mode} is not supported; use a real-valued mode ({', '.join(f'{k} {v}' for k, v in REAL_MODES.items())})")
        n = nx * ny * nz
        if max_values is not None and n > max_values:
            raise MrcTooLarge(f"MRC header declares {nz} x {ny} x {nx} = {n} values, more than the limit of {max_values}")
        try:
            m = MrcInterpreter(iostream=io.BytesIO(data), permissive=False)
        except ValueError as e:
            raise ValueError(f"MRC file is corrupt: {e}") from e
    arr = m.data
    if arr is None:
        raise ValueError("MRC file has no readable data block")
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or math.prod(arr.shape) != n:
        raise ValueError(f"MRC data has shape {list(arr.shape)}, which does not match its header ({nz} x {ny} x {nx})")
    return arr.astype(np.float32)


def write_stack(path: str | Path, stack: np.ndarray, voxel_size: float = 1.0) -> None:
    """Write float32 [N, H, W] (or [H, W]) to `path` as an MRC image stack (overwrites)."""
    Path(path).write_bytes(mrc_bytes(stack, voxel_size))


def read_stack(path: str | Path) -> np.ndarray:
    """Read an MRC image or stack file as float32 [N, H, W]."""
    p = Path(path)
    try:
        return parse_mrc_bytes(p.read_bytes())
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from e
