"""MRC particle stacks (the Cryo-EM exchange format) in files and in memory, via `mrcfile`.

A stack is float32 [N, H, W] (N sections of H rows x W columns; mrcfile's data axes are
(z, y, x)). A single 2-D image reads as N = 1. Written stacks are mode 2 (float32) with the image
stack space group (ispg 0), as `.mrcs` files from RELION / cryoSPARC are.

Parsing untrusted bytes: the 1024-byte header is decoded here with numpy and checked before
mrcfile reads anything (map id, machine stamp, dimensions, mode, the extended-header size nsymbt,
nx * ny * nz against a limit, and 1024 + nsymbt + nx * ny * nz * itemsize against the byte length:
mrcfile allocates what a header declares, 2 GB for a 33 kB file claiming nsymbt = 2^31 - 1), then
the data, with mrcfile in strict mode; every failure is a ValueError with a message saying what is
wrong, which the serving layer turns into InvalidArgument.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from mrcfile.dtypes import HEADER_DTYPE
from mrcfile.mrcinterpreter import MrcInterpreter

HEADER_BYTES = 1024
# mrcfile modes: 0 int8, 1 int16, 2 float32, 4 complex64, 6 uint16, 12 float16 (101: 4-bit).
REAL_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
MODE_BYTES = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}
# Machine stamps (MRC2014): first byte 0x44 ("DA") little-endian, 0x11 big-endian; older writers
# leave the second byte 0x41 or 0x44 (little) or 0x11 (big), or zeros after the first.
_STAMP_ORDER = {0x44: "<", 0x11: ">"}


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


def check_header(data: bytes, *, max_values: int | None = None) -> tuple[int, int, int, int, int]:
    """Validate the header of MRC bytes without mrcfile: (nx, ny, nz, mode, nsymbt), or ValueError
    (MrcTooLarge when nx * ny * nz exceeds max_values). Nothing is allocated beyond the header."""
    size = len(data)
    if size < HEADER_BYTES:
        raise ValueError(
            f"{size} bytes is shorter than the {HEADER_BYTES}-byte MRC header; the file is truncated or not MRC"
        )
    head = bytes(data[:HEADER_BYTES])
    if head[208:211] != b"MAP":
        raise ValueError("not a valid MRC file: the map id 'MAP ' is missing at byte 208 (not MRC, or corrupt)")
    order = _STAMP_ORDER.get(head[212])
    if order is None:
        raise ValueError(
            f"not a valid MRC file: unrecognised machine stamp {head[212:216].hex()} "
            "(44 44 00 00 for little-endian, 11 11 00 00 for big-endian)"
        )
    h = np.frombuffer(head, dtype=HEADER_DTYPE.newbyteorder(order))[0]
    nx, ny, nz, mode, nsymbt = (int(h[k]) for k in ("nx", "ny", "nz", "mode", "nsymbt"))
    if min(nx, ny, nz) <= 0:
        raise ValueError(f"MRC header has a zero or negative dimension (nx={nx}, ny={ny}, nz={nz})")
    if mode not in REAL_MODES:
        raise ValueError(
            f"MRC mode {mode} is not supported; use a real-valued mode ({', '.join(f'{k} {v}' for k, v in REAL_MODES.items())})"
        )
    if nsymbt < 0 or nsymbt > size - HEADER_BYTES:
        raise ValueError(
            f"MRC header declares an extended header of {nsymbt} bytes (nsymbt), but the file has "
            f"only {size - HEADER_BYTES} bytes after the main header"
        )
    n = nx * ny * nz  # Python ints: no overflow
    if max_values is not None and n > max_values:
        raise MrcTooLarge(f"MRC header declares {nz} x {ny} x {nx} = {n} values, more than the limit of {max_values}")
    expected = HEADER_BYTES + nsymbt + n * MODE_BYTES[mode]
    if size != expected:
        raise ValueError(
            f"MRC file is corrupt: its header declares {nz} x {ny} x {nx} values of mode {mode} ({REAL_MODES[mode]}) after a {nsymbt}-byte "
            f"extended header, {expected} bytes in all, but the file has {size} bytes"
            + ("; it is truncated" if size < expected else "; trailing bytes follow the data")
        )
    return nx, ny, nz, mode, nsymbt


def parse_mrc_bytes(data: bytes, *, max_values: int | None = None) -> np.ndarray:
    """Bytes of an MRC image or stack -> float32 [N, H, W]; ValueError if corrupt or unsupported,
    MrcTooLarge if the header declares more than max_values values."""
    nx, ny, nz, _mode, _ = check_header(data, max_values=max_values)
    n = nx * ny * nz
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
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
