"""Serving adapter of the Cryo-EM denoiser: request -> model input batch, output -> MRC bytes.

The Denoise RPC (wired by the server) calls `particles_from_request`, runs the ONNX graph
(particles [B,1,H,W] -> denoised [B,1,H,W], raw units, service/registry.py) micro-batched, and
answers with the float32 [N,H,W] tensor and, if asked, `to_mrc_bytes` of it.

Input policy (also in the model card, and in the manifest entry under "particles"):
- particles arrive as a float tensor [N,H,W] or [H,W] (float32, float64 or float16; [N,1,H,W]
  is accepted too) or as the bytes of an MRC image or stack (any real MRC mode);
- non-square particles are rejected; square particles of another size are Fourier-resampled to
  the model's size (crop or zero-pad of the centred spectrum, the usual Cryo-EM binning, which
  keeps the mean and the band-limited content) if their side is within [min_side, max_side];
  the denoised batch comes back at the model's size (the pixel size scales by side / model side);
- NaN/Inf, an empty batch and corrupt MRC bytes are InvalidArgument; a batch above `max_batch`
  (or an MRC header declaring more data than that allows) is ResourceExhausted.
"""

from __future__ import annotations

import math

import numpy as np

from xaiserve.errors import InvalidArgument, ResourceExhausted, quote
from xaiserve.handlers.denoise.mrc import MrcTooLarge, mrc_bytes, parse_mrc_bytes
from xaiserve.handlers.denoise.resample import DEFAULT_POLICY, fourier_resample
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.registry import ModelEntry
from xaiserve.service.tensors import DTYPES, from_tensor

FLOAT_DTYPES = ("float32", "float64", "float16")


def input_policy(entry: ModelEntry) -> dict:
    """The entry's "particles" policy (manifest), defaults filled in."""
    pol = dict(DEFAULT_POLICY)
    pol.update(entry.raw.get("particles", {}) or {})
    return pol


def _check_batch(n: int, max_batch: int) -> None:
    if n == 0:
        raise InvalidArgument("the particle batch is empty (0 particles); send at least one particle")
    if n > max_batch:
        raise ResourceExhausted(
            f"{n} particles in one request is more than the maximum of {max_batch}; split the stack into requests of at most {max_batch}"
        )


def _from_tensor(t: pb.Tensor, max_batch: int, max_side: int) -> np.ndarray:
    if t.dtype not in FLOAT_DTYPES:
        hint = "" if t.dtype in DTYPES else " (an unknown dtype)"
        raise InvalidArgument(f"particles tensor has dtype {quote(t.dtype)}{hint}; send float32 [N, H, W] or [H, W]")
    shape = [int(s) for s in t.shape]
    if len(shape) == 4 and shape[1] == 1:
        shape = [shape[0], shape[2], shape[3]]
    if len(shape) not in (2, 3):
        raise InvalidArgument(
            f"particles tensor has shape {list(t.shape)}; send float32 [N, H, W] (a stack) or [H, W] (one particle)"
        )
    if len(shape) == 3:
        _check_batch(shape[0], max_batch)
    if any(s <= 0 for s in shape[-2:]):
        raise InvalidArgument(f"particles tensor has shape {list(t.shape)} with a zero-size image side")
    if shape[-1] > max_side or shape[-2] > max_side:
        raise InvalidArgument(f"particles are {shape[-2]} x {shape[-1]}; the largest side accepted is {max_side}")
    arr = from_tensor(t, what="particles tensor", max_elements=max_batch * max_side * max_side)
    return arr.reshape(-1, shape[-2], shape[-1])


def _from_mrc(data: bytes, max_batch: int, max_side: int) -> np.ndarray:
    if not data:
        raise InvalidArgument("particles mrc is empty; send the bytes of an MRC image or stack (.mrc/.mrcs)")
    try:
        arr = parse_mrc_bytes(data, max_values=max_batch * max_side * max_side)
    except MrcTooLarge as e:
        raise ResourceExhausted(
            f"particles mrc: {e}; send at most {max_batch} particles of at most {max_side} x {max_side} per request"
        ) from e
    except ValueError as e:
        raise InvalidArgument(f"particles mrc: {e}") from e
    _check_batch(arr.shape[0], max_batch)
    return arr


def particles_from_request(req: pb.DenoiseRequest, entry: ModelEntry, max_batch: int) -> np.ndarray:
    """Decode and validate the particles of a DenoiseRequest -> float32 [N,1,H,W] at the model's size.

    Raises InvalidArgument (no particles, bad dtype/shape, non-square, unsupported size, NaN/Inf,
    empty batch, corrupt MRC) or ResourceExhausted (more than max_batch particles).
    """
    h, w = entry.input.height, entry.input.width
    pol = input_policy(entry)
    max_side = int(pol["max_side_factor"]) * max(h, w)
    which = req.WhichOneof("particles")
    if which is None:
        raise InvalidArgument(
            "no particles: set DenoiseRequest.tensor (float32 [N, H, W] or [H, W]) or DenoiseRequest.mrc (MRC stack bytes)"
        )
    if which == "tensor":
        arr = _from_tensor(req.tensor, max_batch, max_side)
    else:
        arr = _from_mrc(req.mrc, max_batch, max_side)
    n, ph, pw = arr.shape
    _check_batch(n, max_batch)
    finite = np.isfinite(arr).reshape(n, -1).all(1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        count = int((~np.isfinite(arr)).sum())
        raise InvalidArgument(
            f"particle {int(bad[0])} of {n} contains NaN or Inf ({count} non-finite values in {len(bad)} particle(s)); remove or repair them"
        )
    if ph != pw:
        raise InvalidArgument(
            f"particles are {ph} x {pw} (not square); model {entry.id} takes square particles ({h} x {w}); crop a square box centred on the particle"
        )
    if (ph, pw) != (h, w):
        if pol["size_policy"] != "resample" or ph < int(pol["min_side"]) or h != w:
            raise InvalidArgument(
                f"particles are {ph} x {pw}; model {entry.id} takes {h} x {w}"
                + (
                    f" (sides from {pol['min_side']} to {max_side} are resampled)"
                    if pol["size_policy"] == "resample"
                    else ""
                )
            )
        arr = fourier_resample(arr, h)
    return np.ascontiguousarray(arr[:, None], dtype=np.float32)


def to_mrc_bytes(arr: np.ndarray) -> bytes:
    """float32 [N,H,W] (or [N,1,H,W], [H,W]) -> bytes of an MRC image stack (mode 2)."""
    a = np.asarray(arr, dtype=np.float32)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim not in (2, 3) or math.prod(a.shape) == 0:
        raise ValueError(f"to_mrc_bytes takes [N, H, W] or [H, W]; got shape {list(a.shape)}")
    return mrc_bytes(a)
