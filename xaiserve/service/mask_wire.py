"""The mask of an ExplainResponse in the encoding and on the grid the options ask for, and back.

The encodings themselves (quantisation, PNG decoding, mapping a model-grid mask back over the
image) are pure functions in service/mask_encoding.py; this module moves them in and out of the
protobuf messages. `fill_mask` runs in the fast path's CPU pool, `decode_mask` on the client.

Defaults: a unary Explain answers float32 at the input's resolution (what it always did); a
stream answers uint8 on the model's grid (`STREAM_DEFAULTS`): 64 x 64 x 1 byte = 4 kB an answer
instead of 1.2 MB at 640 x 480, no compression work on either side, and within 1/510 of the float
mask once mapped back. PNG is smaller still for smooth masks (about half) but costs a deflate on
the server and an inflate on the client for every frame.
"""

from __future__ import annotations

import numpy as np

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.errors import InvalidArgument
from xaiserve.service.images import InputSpec, encode_png, fit, render_pngs, resize, resize_mask, to_input_geometry
from xaiserve.service.mask_encoding import MaskGeometry, dequantize, png_decode, quantize, to_input
from xaiserve.service.tensors import from_tensor, to_tensor

ENCODINGS = (pb.MASK_FLOAT32, pb.MASK_UINT8, pb.MASK_PNG)
RESOLUTIONS = (pb.MASK_AT_INPUT, pb.MASK_AT_MODEL)
STREAM_DEFAULTS = {"mask_encoding": pb.MASK_UINT8, "mask_resolution": pb.MASK_AT_MODEL}


def with_stream_defaults(opts: pb.ExplainOptions) -> pb.ExplainOptions:
    """A copy of `opts` with the stream defaults where the encoding or resolution is unset."""
    out = pb.ExplainOptions()
    out.CopyFrom(opts)
    for name, value in STREAM_DEFAULTS.items():
        if getattr(out, name) == 0:
            setattr(out, name, value)
    return out


def choice(opts: pb.ExplainOptions) -> tuple[int, int]:
    """(encoding, resolution) of `opts`, unset = float32 at the input's resolution; InvalidArgument
    for a number this server does not know (proto3 enums accept any)."""
    enc = opts.mask_encoding or pb.MASK_FLOAT32
    res = opts.mask_resolution or pb.MASK_AT_INPUT
    if enc not in ENCODINGS:
        raise InvalidArgument(
            f"options.mask_encoding {enc} is unknown; use "
            + ", ".join(f"{pb.MaskEncoding.Name(v)} ({v})" for v in ENCODINGS)
        )
    if res not in RESOLUTIONS:
        raise InvalidArgument(
            f"options.mask_resolution {res} is unknown; use "
            + ", ".join(f"{pb.MaskResolution.Name(v)} ({v})" for v in RESOLUTIONS)
        )
    return enc, res


def geometry(mask_hw: tuple[int, int], h: int, w: int, spec: InputSpec | None) -> MaskGeometry:
    """Where an h x w image lies on the model's grid (service.images.fit), in mask pixels."""
    mh, mw = mask_hw
    if spec is None:
        return MaskGeometry(mh, mw, h, w, 0, 0, mh, mw)
    f = fit(h, w, spec)
    return MaskGeometry(mh, mw, h, w, f.offset[0], f.offset[1], f.content[0], f.content[1])


def fill_mask(
    resp: pb.ExplainResponse,
    image: np.ndarray,
    mask: np.ndarray,
    opts: pb.ExplainOptions,
    spec: InputSpec | None = None,
) -> None:
    """Put `mask` (the network's [h_m, w_m] map in [0, 1]) into `resp` as `opts` asks: mask /
    mask_png / mask_geometry, and with return_png the overlay over `image` (HWC, the input)."""
    enc, res = choice(opts)
    h, w = image.shape[:2]
    full = np.zeros((0, 0), np.float32)  # over the input: only computed when something needs it
    if res == pb.MASK_AT_INPUT or opts.return_png:
        # back over the original image, undoing the model's resize (letterbox padding cut away)
        full = resize_mask(mask, h, w) if spec is None else to_input_geometry(mask, spec, h, w)
    if res == pb.MASK_AT_INPUT:
        sent, geom = full, MaskGeometry.identity(h, w)
    else:
        m = np.asarray(mask, dtype=np.float32)
        if spec is not None and m.shape != (spec.height, spec.width):  # a coarser grid: the model's first
            m = resize(m[:, :, None], spec.height, spec.width)[:, :, 0]
        sent = np.clip(m, 0.0, 1.0)
        geom = geometry(sent.shape, h, w, spec)
    resp.mask_geometry.CopyFrom(
        pb.MaskGeometry(
            height=geom.height,
            width=geom.width,
            input_height=geom.input_height,
            input_width=geom.input_width,
            content_top=geom.content_top,
            content_left=geom.content_left,
            content_height=geom.content_height,
            content_width=geom.content_width,
        )
    )
    if enc == pb.MASK_FLOAT32:
        resp.mask.CopyFrom(to_tensor(sent.astype(np.float32)))
    elif enc == pb.MASK_UINT8:
        resp.mask.CopyFrom(to_tensor(quantize(sent)))
    if opts.return_png:
        mask_png, resp.overlay_png = render_pngs(image, full)
        if res == pb.MASK_AT_INPUT:
            resp.mask_png = mask_png
    if res == pb.MASK_AT_MODEL and (enc == pb.MASK_PNG or opts.return_png):
        resp.mask_png = encode_png(quantize(sent))
    elif enc == pb.MASK_PNG and not opts.return_png:
        resp.mask_png = encode_png(quantize(sent))


def geometry_of(resp: pb.ExplainResponse, mask_hw: tuple[int, int]) -> MaskGeometry:
    """The response's MaskGeometry (a server without encodings sends none: the mask is at the input)."""
    if not resp.HasField("mask_geometry"):
        return MaskGeometry.identity(*mask_hw)
    g = resp.mask_geometry
    geom = MaskGeometry(
        g.height,
        g.width,
        g.input_height,
        g.input_width,
        g.content_top,
        g.content_left,
        g.content_height,
        g.content_width,
    )
    geom.check()
    return geom


def sent_mask(resp: pb.ExplainResponse) -> np.ndarray:
    """The mask as sent, as float32 in [0, 1] on its own grid (uint8 and PNG dequantised)."""
    if resp.mask.shape:
        a = from_tensor(resp.mask, what="mask")
        return dequantize(a) if a.dtype == np.uint8 else a.astype(np.float32)
    if resp.mask_png:
        return dequantize(png_decode(resp.mask_png))
    raise ValueError("the response carries no mask (neither mask nor mask_png)")


def decode_mask(resp: pb.ExplainResponse) -> np.ndarray:
    """float32 [H, W] over the input image, whatever encoding and grid the server used (within the
    precision mask_encoding states: exact for float32, 1/510 for uint8 and PNG)."""
    a = sent_mask(resp)
    return to_input(a, geometry_of(resp, a.shape))
