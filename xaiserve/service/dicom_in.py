"""DICOM images in: detection, header checks (admission), decoding of one frame with pydicom,
greyscale windowing into the model's channels, and the PHI-free form a job stores.

An Image message is DICOM when image.content_type says so ("application/dicom") or, with no
content type, when its bytes carry the Part 10 preamble ("DICM" at byte 128). Then:

1. `probe_dicom` reads the header (no pixel is decoded) and checks what can be checked there:
   Pixel Data present, bit layout, photometric interpretation, rows x columns against the image
   size limits, the frame index against Number of Frames, a decoder for the transfer syntax.
2. `decode_dicom` decodes the chosen frame only (pydicom + the pylibjpeg / pyjpegls plugins for
   compressed syntaxes) and maps it to HWC float32 in [0, 1]:
   - greyscale (MONOCHROME1/2): Modality LUT (rescale or table), then the VOI window: the request's
     (image.dicom.window_center / window_width), else the model's (manifest input.dicom), else the
     file's (VOI LUT Sequence, or Window Center / Width with its VOI LUT Function), else the image's
     own range; MONOCHROME1 is inverted. A model with grey_to_channels "window_stack" gets one
     channel per window of its manifest.
   - colour: RGB, YBR_* (converted to RGB by pydicom) and PALETTE COLOR (through its LUTs),
     scaled by 2**BitsStored - 1.
   Enhanced multi-frame files are read through a single-frame view of the chosen frame (its
   Functional Groups flattened to the top level), so the same code handles every layout.
3. `DicomSource` is what a DICOM result needs to reference the image (service.dicom_out).
4. `job_request_for_storage` replaces a DICOM image in a JobRequest by a minimal file that holds
   the chosen frame's pixels, the attributes needed to decode and window them, and the UIDs and
   geometry a result references: no patient, study-description, date or device attribute survives.

Privacy: nothing in this module logs, and no message quotes a header value. pydicom and highdicom
report malformed values (a patient name among them) through warnings and their loggers; both are
silenced here, once, for the whole process.
"""

from __future__ import annotations

import copy
import io
import logging
import struct
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from xaiserve.clinical.windowing import (
    DicomDefaults,
    Window,
    apply_window,
    check_bits,
    check_window,
    invert,
    range_window,
)
from xaiserve.errors import InvalidArgument, ResourceExhausted, quote
from xaiserve.proto.explain.v1 import explainer_pb2 as pb

DICOM_CONTENT_TYPES = ("application/dicom",)
OTHER_CONTENT_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/tiff", "image/gif")
MAX_ALL_FRAMES_PIXELS = 1 << 30  # image.dicom.all_frames: frames x rows x columns (4096 frames of 512 x 512)
MAX_FRAMES = 65535  # Number of Frames is an IS of at most 2**16 - 1 in practice; beyond it the header lies
PRIVATE_GROUP, PRIVATE_CREATOR = 0x0009, "XAISERVE 1"  # the stored frame view: which frame of how many
CINE_GROUP = 0x7FDF  # the same block in a frame cut from a cine: the last group before the pixel data
# a cine file smaller than this is not cut into frames: re-reading it per frame costs about what
# cutting does (bench/bench_dicom.py part 4: equal at 0.2 MB, cutting 9x cheaper at 16 MB)
CINE_CUT_BYTES = 1 << 20
GREY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420", "PALETTE COLOR")

# pydicom and highdicom put offending values (a malformed Patient Name, say) in their warnings and
# log records; neither may reach our logs. Silenced for the process, not per call (catch_warnings
# is not thread-safe and decoding runs in a pool).
for _name in ("pydicom", "highdicom"):
    _lg = logging.getLogger(_name)
    _lg.addHandler(logging.NullHandler())
    _lg.propagate = False
    _lg.setLevel(logging.CRITICAL + 1)
warnings.filterwarnings("ignore", module=r"(pydicom|highdicom|xaiserve\.service\.dicom_(in|out))(\.|$)")


def _pydicom():
    import pydicom
    import pydicom.config

    # validation of values on read only produces the warnings silenced above; skip the work
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    return pydicom


# -- detection -------------------------------------------------------------------------------------
def has_preamble(data: bytes) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then "DICM" (PS3.10 7.1)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def is_dicom_image(image: pb.Image) -> bool:
    """Whether decode_image should take `image` as DICOM (explicit content type, else the preamble).
    InvalidArgument for a content type the server does not know."""
    ct = image.content_type.strip().lower()
    if ct:
        if ct in DICOM_CONTENT_TYPES:
            if image.WhichOneof("source") != "encoded":
                raise InvalidArgument(
                    "image.content_type is application/dicom but the image is a tensor; "
                    "send the .dcm file's bytes in image.encoded"
                )
            return True
        if ct not in OTHER_CONTENT_TYPES:
            raise InvalidArgument(
                f"image.content_type {quote(ct, 64)} is not supported; use "
                f"{', '.join(DICOM_CONTENT_TYPES + OTHER_CONTENT_TYPES)} or leave it empty to detect"
            )
        return False
    if image.HasField("dicom") and image.WhichOneof("source") == "encoded" and not has_preamble(image.encoded):
        raise InvalidArgument(
            "image.dicom options are set but image.encoded is not a DICOM Part 10 file (no 'DICM' at byte 128); "
            "send the .dcm file as stored, or set image.content_type = 'application/dicom' for a file without preamble"
        )
    return image.WhichOneof("source") == "encoded" and has_preamble(image.encoded)


# -- what a result references ----------------------------------------------------------------------
@dataclass(frozen=True)
class DicomSource:
    """What a DICOM result needs from its source image: a single-frame view of the header (no pixel
    data), the 1-based frame of the source instance, its number of frames, and what was applied."""

    header: Any  # pydicom Dataset: the frame view
    frame_number: int
    number_of_frames: int
    windows: tuple[Window, ...]
    window_source: str  # "request", "model", "file", "file VOI LUT", "image range", or "" (colour)

    @property
    def uids(self) -> dict[str, str]:
        h = self.header
        return {
            k: str(h.get(k, ""))
            for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")
        }


@dataclass(frozen=True)
class DecodedDicom:
    pixels: np.ndarray  # HWC float32 in [0, 1]
    source: DicomSource


# -- reading ---------------------------------------------------------------------------------------
def _read(data: bytes, force: bool):
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
        ds.get("PixelData")  # reading an element can fail on damaged files too
        _ = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    except InvalidDicomError:
        raise InvalidArgument(
            f"image.encoded ({len(data)} bytes) is not a DICOM Part 10 file it claims to be (no valid File Meta "
            "Information after the 'DICM' preamble); send the complete .dcm file as stored by the modality or PACS"
        ) from None
    except Exception as e:  # noqa: BLE001 - pydicom raises many built-ins on damaged files; never quote their text (values)
        raise InvalidArgument(
            f"image.encoded ({len(data)} bytes) starts like a DICOM file but could not be parsed ({e.__class__.__name__}); "
            "the file is truncated or damaged: send the complete .dcm file as stored by the modality or PACS"
        ) from None
    return ds


def _transfer_syntax(ds) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None:
        raise InvalidArgument(
            "the DICOM file has no Transfer Syntax UID (0002,0010) in its File Meta Information; "
            "send a Part 10 file written by a DICOM toolkit (e.g. `dcmconv in.dcm out.dcm`)"
        )
    return str(ts)


def _syntax_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return f"{uid} ({name})" if name and name != uid else uid


INSTALL_HINTS = {
    "JPEG 2000": "pip install pylibjpeg pylibjpeg-openjpeg",
    "JPEG-LS": "pip install pyjpegls (or pylibjpeg pylibjpeg-libjpeg)",
    "JPEG": "pip install pylibjpeg pylibjpeg-libjpeg",
    "RLE": "pip install pylibjpeg pylibjpeg-rle (pydicom's own RLE decoder needs numpy only)",
}


def _check_decoder(uid: str) -> None:
    """INVALID_ARGUMENT naming the syntax and what to install when no pixel decoder can read it."""
    from pydicom.pixels import get_decoder

    try:
        dec = get_decoder(uid)
    except NotImplementedError:
        raise InvalidArgument(
            f"transfer syntax {_syntax_name(uid)} is not supported: no DICOM pixel decoder exists for it in pydicom "
            "(video, JPEG XL and private syntaxes among them); transcode the file to Explicit VR Little Endian, "
            "JPEG, JPEG-LS, JPEG 2000 or RLE (e.g. `gdcmconv --raw in.dcm out.dcm` or `dcmdjpeg`), or send single frames"
        ) from None
    if not dec.is_available:
        from pydicom.uid import UID

        name = UID(uid).name or ""
        hint = next((v for k, v in INSTALL_HINTS.items() if k in name), "install a pydicom pixel data plugin for it")
        missing = "; ".join(str(m) for m in dec.missing_dependencies) or "no plugin installed"
        raise InvalidArgument(
            f"transfer syntax {_syntax_name(uid)} needs a decoder plugin this server lacks ({missing}): "
            f"the operator can `{hint}`, or send the file transcoded to Explicit VR Little Endian"
        )


def _first(value: Any) -> float:
    """The first value of a possibly multi-valued DS / IS element (Window Center may hold several)."""
    try:
        v = value if isinstance(value, (str, bytes, int, float)) else value[0]
        return float(v)
    except (TypeError, ValueError, IndexError):
        raise InvalidArgument(
            "a numeric header element (window or rescale) holds no number; fix the file, "
            "or send image.dicom.window_center / window_width"
        ) from None


# attributes a functional group macro carries, flattened to the top level of a frame view
_GROUPS = (
    ("PixelMeasuresSequence", ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices")),
    ("PlaneOrientationSequence", ("ImageOrientationPatient",)),
    ("PlanePositionSequence", ("ImagePositionPatient",)),
    ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept", "RescaleType")),
    ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
)


def frame_view(ds, index: int):
    """A copy of the header of `ds` (no pixel data) as a single-frame image of frame `index`: the
    Shared and Per-frame Functional Groups of that frame are flattened to top-level attributes
    (pixel spacing, orientation, position, rescale, window), Number of Frames is dropped."""
    from pydicom.dataset import Dataset

    view = Dataset()
    for elem in ds:
        if elem.tag in (0x7FE00010, 0x7FE00008, 0x7FE00009) or elem.keyword in (
            "NumberOfFrames",
            "SharedFunctionalGroupsSequence",
            "PerFrameFunctionalGroupsSequence",
            "FrameIncrementPointer",
            "ExtendedOffsetTable",
            "ExtendedOffsetTableLengths",
        ):
            continue
        view.add(copy.copy(elem))  # own elements: the flattening below must not write into `ds`
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta
    groups = []
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is not None and index < len(per):
        groups.append(per[index])
    for g in groups:  # per-frame after shared: per-frame wins
        for seq, keys in _GROUPS:
            if seq in g and len(g[seq]):
                item = g[seq][0]
                for k in keys:
                    if k in item:
                        setattr(view, k, item[k].value)
    return view


def _private(ds) -> tuple[int, int] | None:
    """(frame number, number of frames) of the source instance, in a stored frame view (group
    0009) or a frame cut from a cine (group 7FDF, written last before the pixel data: Cine)."""
    for group in (PRIVATE_GROUP, CINE_GROUP):
        try:
            block = ds.private_block(group, PRIVATE_CREATOR)
            return int(block[0x01].value), int(block[0x02].value)
        except (KeyError, ValueError, TypeError):
            continue
    return None


@dataclass(frozen=True)
class _Header:
    ds: Any
    rows: int
    columns: int
    samples: int
    frames: int
    index: int
    photometric: str
    syntax: str


def _options(image: pb.Image) -> pb.DicomOptions:
    return image.dicom if image.HasField("dicom") else pb.DicomOptions()


def _header(image: pb.Image, *, all_frames: bool = False) -> _Header:
    if _options(image).all_frames and not all_frames:
        raise InvalidArgument(
            "image.dicom.all_frames is for StreamExplain (one answer per frame); this call explains one frame: "
            "choose it with image.dicom.frame, or send the file on StreamExplain"
        )
    data = image.encoded
    if not data:
        raise InvalidArgument("image.encoded is empty: send the .dcm file's bytes")
    ds = _read(data, force=not has_preamble(data))
    meta = getattr(ds, "file_meta", None)
    if has_preamble(data) and (meta is None or "TransferSyntaxUID" not in meta):
        raise InvalidArgument(
            f"image.encoded ({len(data)} bytes) has the DICOM preamble ('DICM' at byte 128) but no File Meta "
            "Information (group 0002, with the Transfer Syntax UID) after it: it is not a DICOM Part 10 file; send the "
            "complete .dcm file as stored by the modality or PACS"
        )
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        sop = ds.get("SOPClassUID")
        what = f" (SOP Class {_syntax_name(str(sop))})" if sop else ""
        if other:
            raise InvalidArgument(
                f"the DICOM file{what} holds {other[0]} (floating-point pixels, e.g. a parametric map), "
                "which this server does not take as input; send an image with integer Pixel Data"
            )
        raise InvalidArgument(
            f"the DICOM file{what} has no Pixel Data (7FE0,0010): it is not an image (a structured report, a "
            "DICOMDIR, a plan or a waveform, say); send an image instance such as CT, MR, CR, DX, US or SC"
        )
    syntax = _transfer_syntax(ds)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1))
        bits_alloc, bits_stored = int(ds.BitsAllocated), int(ds.get("BitsStored", ds.BitsAllocated))
        high_bit = int(ds.get("HighBit", bits_stored - 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise InvalidArgument(
            "the DICOM file's Image Pixel Module is incomplete or malformed (Rows, Columns, Bits Allocated, Bits Stored, "
            "High Bit, Samples per Pixel or Number of Frames missing or not a number); re-export the image"
        ) from None
    check_bits(bits_alloc, bits_stored, high_bit, samples)
    from xaiserve.service.images import _check_size  # the same size limits as every other image

    _check_size(rows, cols)
    if not 1 <= frames <= MAX_FRAMES:
        raise ResourceExhausted(f"the DICOM header declares {frames} frames; at most {MAX_FRAMES} are accepted")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in GREY + COLOUR:
        raise InvalidArgument(
            f"Photometric Interpretation {quote(photometric, 32)} is not supported; send {', '.join(GREY + COLOUR)}"
        )
    if (photometric in GREY or photometric == "PALETTE COLOR") != (samples == 1):
        raise InvalidArgument(
            f"Photometric Interpretation {photometric} with {samples} samples per pixel is inconsistent; fix the file"
        )
    opts = _options(image)
    index = int(opts.frame) if opts.HasField("frame") else 0
    if not 0 <= index < frames:
        raise InvalidArgument(
            f"image.dicom.frame {index} is out of range: the file has {frames} frame{'s' if frames != 1 else ''} "
            f"(0..{frames - 1}, 0-based)"
        )
    if opts.HasField("window_width") != opts.HasField("window_center"):
        raise InvalidArgument("set image.dicom.window_center and image.dicom.window_width together")
    if opts.HasField("window_width"):
        check_window(
            opts.window_center, opts.window_width, str(ds.get("VOILUTFunction", "LINEAR")), what="image.dicom window"
        )
        if photometric not in GREY:
            raise InvalidArgument(
                f"image.dicom window_center / window_width apply to greyscale (MONOCHROME1/2) images; "
                f"this one is {photometric}: leave them unset"
            )
    _check_decoder(syntax)
    return _Header(ds, rows, cols, samples, frames, index, photometric, syntax)


def probe_all_frames(image: pb.Image) -> int:
    """The number of frames of a multi-frame DICOM sent with image.dicom.all_frames (StreamExplain
    answers each), from its header alone, before any frame is decoded: every frame fits the image
    limits (rows x columns), and frames x rows x columns is at most MAX_ALL_FRAMES_PIXELS (Cine)."""
    return Cine(image).frames


class Cine:
    """A multi-frame DICOM sent with image.dicom.all_frames (StreamExplain), read once per message.

    The file is parsed and checked once (probe_all_frames' limits, on the header, before any frame
    is decoded); then `image(k)` makes frame k's own request image, lazily, when that frame runs: a
    single-frame Part 10 file of frame_view(k) (every attribute of the source, the frame's
    functional groups flattened) holding only frame k's pixel data, as stored (still compressed for
    an encapsulated syntax), and the private block that makes its DicomSource reference frame k+1 of
    the source (as a job's stored frame does). Each frame then costs its header and its own pixels,
    not a copy, a parse and a digest of the whole file: frames were ~O(file) each before
    (bench/bench_dicom.py part 4). Without per-frame functional groups, in a little-endian syntax,
    the frame file's header is written once and each frame appends its block and pixels. A file
    under CINE_CUT_BYTES, or a layout this cannot cut (1-bit or YBR_FULL_422 native pixels, a
    deflated syntax, pixel data shorter than declared) falls back to the whole file with
    image.dicom.frame = k, decoded as a unary Explain of that frame."""

    def __init__(self, image: pb.Image):
        if not is_dicom_image(image):
            raise InvalidArgument(
                "image.dicom.all_frames is set but the image is not DICOM (no 'DICM' preamble, no content type "
                "application/dicom): send the multi-frame .dcm file"
            )
        if _options(image).HasField("frame"):
            raise InvalidArgument("set image.dicom.frame (one frame) or image.dicom.all_frames (every frame), not both")
        self._data = image.encoded  # one copy out of the message, for the fallback
        h = _header(image, all_frames=True)
        total = h.frames * h.rows * h.columns
        if total > MAX_ALL_FRAMES_PIXELS:
            raise ResourceExhausted(
                f"image.dicom.all_frames: the file holds {h.frames} frames of {h.rows} x {h.columns} ({total} pixels); "
                f"at most {MAX_ALL_FRAMES_PIXELS} pixels in all are explained per message: send the frames in several "
                "messages (image.dicom.frame) instead"
            )
        self.h, self.frames = h, h.frames
        self._options = pb.DicomOptions()
        self._options.CopyFrom(_options(image))
        self._options.ClearField("all_frames")
        self._lock = threading.Lock()
        self._fragments: list[bytes] | None = None
        self._frame_bytes = 0
        self._prefix: bytes | None = None  # the header shared by every frame (b"": none, each is written)
        self._implicit = False
        from pydicom.uid import UID

        ts = UID(h.syntax)
        bits = int(h.ds.BitsAllocated)
        self.cut = len(self._data) >= CINE_CUT_BYTES and not ts.is_deflated
        self.cut = self.cut and (ts.is_encapsulated or (bits % 8 == 0 and h.photometric != "YBR_FULL_422"))
        if self.cut and not ts.is_encapsulated:
            self._frame_bytes = h.rows * h.columns * h.samples * (bits // 8)
            self.cut = len(h.ds.PixelData) >= self._frame_bytes * h.frames
        self._encapsulated = ts.is_encapsulated

    def _frame_data(self, k: int) -> bytes:
        if not self._encapsulated:
            return self.h.ds.PixelData[k * self._frame_bytes : (k + 1) * self._frame_bytes]
        with self._lock:  # the fragments are split once, by the first frame that needs them
            if self._fragments is None:
                from pydicom.encaps import generate_frames

                self._fragments = list(generate_frames(self.h.ds.PixelData, number_of_frames=self.frames))
        if k >= len(self._fragments):
            raise InvalidArgument(
                f"the DICOM pixel data holds {len(self._fragments)} compressed frames, not the {self.frames} its header "
                "declares; re-export the image"
            )
        return self._fragments[k]

    def image(self, k: int) -> pb.Image:
        """Frame k's request image (0-based), made in the CPU pool when the frame runs."""
        if not self.cut:
            out = pb.Image(encoded=self._data, content_type=DICOM_CONTENT_TYPES[0])
            out.dicom.CopyFrom(self._options)
            out.dicom.frame = k
            return out
        with _guarded("header (cutting frame out of the cine)"):
            return self._image(k)

    def _image(self, k: int) -> pb.Image:
        data = self._frame_data(k)
        if self._prefix is None:
            with self._lock:
                if self._prefix is None:
                    self._prefix = self._make_prefix()
        if self._prefix:  # the same header for every frame: written once, frame number and pixels appended
            body = self._prefix + self._block(k) + self._pixels(data)
        else:
            body = self._write(k, data)
        out = pb.Image(encoded=body, content_type=DICOM_CONTENT_TYPES[0])
        out.dicom.CopyFrom(self._options)
        return out

    def _view(self, k: int):
        from pydicom.dataset import FileMetaDataset

        view = frame_view(self.h.ds, k)
        meta = FileMetaDataset()
        for elem in self.h.ds.file_meta:
            meta.add(copy.copy(elem))
        view.file_meta = meta
        return view

    def _make_prefix(self) -> bytes:
        """The file up to the frame block, when it is the same for every frame (no per-frame
        functional groups) and can be written in a little-endian syntax; b"" otherwise."""
        from pydicom.uid import UID

        ds = self.h.ds
        little = UID(self.h.syntax).is_little_endian
        if (
            "PerFrameFunctionalGroupsSequence" in ds
            or not little
            or any(e.tag.group >= CINE_GROUP for e in ds if e.tag < 0x7FE00010 and e.tag.group >= CINE_GROUP)
        ):
            return b""
        view = self._view(0)
        if any(int(e.tag) > 0x7FE00010 for e in view):
            return b""
        buf = io.BytesIO()
        view.save_as(buf, enforce_file_format=True)
        self._implicit = UID(self.h.syntax).is_implicit_VR
        return buf.getvalue()

    def _element(self, tag: int, vr: bytes, value: bytes, undefined: bool = False) -> bytes:
        if len(value) % 2:
            value += b" "
        length = 0xFFFFFFFF if undefined else len(value)
        head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        if self._implicit:
            return head + struct.pack("<I", length) + value
        if vr in (b"OB", b"OW"):
            return head + vr + struct.pack("<HI", 0, length) + value
        return head + vr + struct.pack("<H", len(value)) + value

    def _block(self, k: int) -> bytes:
        g = CINE_GROUP << 16
        return (
            self._element(g | 0x0010, b"LO", PRIVATE_CREATOR.encode())
            + self._element(g | 0x1001, b"IS", str(k + 1).encode())
            + self._element(g | 0x1002, b"IS", str(self.frames).encode())
        )

    def _pixels(self, data: bytes) -> bytes:
        if self._encapsulated:
            from pydicom.encaps import encapsulate

            value = encapsulate([data]) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
            return self._element(0x7FE00010, b"OB", value, undefined=True)
        return self._element(0x7FE00010, b"OB" if int(self.h.ds.BitsAllocated) <= 8 else b"OW", data)

    def _write(self, k: int, data: bytes) -> bytes:
        view = self._view(k)
        if self._encapsulated:
            from pydicom.encaps import encapsulate

            view.add_new(0x7FE00010, "OB", encapsulate([data]))
            view["PixelData"].is_undefined_length = True
        else:
            view.add_new(0x7FE00010, "OB" if int(self.h.ds.BitsAllocated) <= 8 else "OW", data)
        block = view.private_block(CINE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(0x01, "IS", k + 1)
        block.add_new(0x02, "IS", self.frames)
        buf = io.BytesIO()
        view.save_as(buf, enforce_file_format=True)
        return buf.getvalue()


def probe_dicom(image: pb.Image) -> tuple[int, int, int]:
    """(height, width, channels) of the decoded frame, from the header alone: the admission step."""
    h = _header(image)
    return h.rows, h.columns, 1 if h.photometric in GREY else 3


def _frame_pixels(h: _Header) -> np.ndarray:
    """The chosen frame's pixels as pydicom decodes them (colour converted to RGB)."""
    from pydicom.pixels import pixel_array

    try:
        arr = pixel_array(h.ds, index=h.index if h.frames > 1 else None)
    except InvalidArgument:
        raise
    except Exception as e:  # noqa: BLE001 - decoder plugins raise anything on damaged streams; never quote their text
        raise InvalidArgument(
            f"the DICOM pixel data (transfer syntax {_syntax_name(h.syntax)}) could not be decoded ({e.__class__.__name__}): "
            "it is truncated or damaged, or its header does not match it; re-export the image"
        ) from None
    if arr.ndim == 3 and h.samples == 1 and arr.shape[0] == 1:
        arr = arr[0]
    want = (h.rows, h.columns) if h.samples == 1 else (h.rows, h.columns, 3)
    if arr.shape != want:
        raise InvalidArgument(
            f"the DICOM pixel data decoded to shape {list(arr.shape)}, not the {list(want)} its header declares"
        )
    return arr


def _file_voi(view, stored_min: float | None = None) -> tuple[Window | None, Any]:
    """The file's own VOI: (window, None), (None, VOI LUT item), or (None, None)."""
    seq = view.get("VOILUTSequence")
    if seq is not None and len(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]:
        return None, seq[0]
    if (
        "WindowCenter" in view
        and "WindowWidth" in view
        and view.WindowCenter is not None
        and view.WindowWidth is not None
    ):
        fn = str(view.get("VOILUTFunction", "LINEAR") or "LINEAR")
        c, w = _first(view.WindowCenter), _first(view.WindowWidth)
        try:
            return check_window(c, w, fn, what="the file's Window Center / Width"), None
        except InvalidArgument as e:
            raise InvalidArgument(f"{e}; or override it with image.dicom.window_center / window_width") from None
    return None, None


def _grey(
    h: _Header, view, arr: np.ndarray, image: pb.Image, defaults: DicomDefaults | None, channels: int
) -> tuple[np.ndarray, tuple[Window, ...], str]:
    opts = _options(image)
    mono1 = h.photometric == "MONOCHROME1"
    if "ModalityLUTSequence" in view and len(view.ModalityLUTSequence):
        from pydicom.pixels import apply_modality_lut

        values, slope, intercept = np.asarray(apply_modality_lut(arr, view), dtype=np.float32), 1.0, 0.0
    else:
        values = arr
        slope = _first(view.RescaleSlope) if view.get("RescaleSlope") is not None else 1.0
        intercept = _first(view.RescaleIntercept) if view.get("RescaleIntercept") is not None else 0.0
    stack = defaults is not None and defaults.grey_to_channels == "window_stack"
    if opts.HasField("window_width"):
        if stack:
            raise InvalidArgument(
                f"this model builds its {channels} channels from its own window stack "
                f"({defaults.describe()}); a single request window cannot replace it: leave image.dicom window unset"
            )
        fn = str(view.get("VOILUTFunction", "LINEAR") or "LINEAR")
        windows, source = (
            (check_window(opts.window_center, opts.window_width, fn, what="image.dicom window"),),
            "request",
        )
    elif defaults is not None and defaults.windows:
        windows, source = defaults.windows, "model"
    else:
        win, lut = _file_voi(view)
        if lut is not None:
            from pydicom.pixels import apply_voi

            modality = values if slope == 1.0 and intercept == 0.0 else values.astype(np.float32) * slope + intercept
            bits = int(lut.LUTDescriptor[2])
            shown = np.asarray(apply_voi(modality, view, index=0), dtype=np.float32) / np.float32(2**bits - 1)
            shown = np.clip(shown, 0.0, 1.0)
            return (invert(shown) if mono1 else shown)[:, :, None], (), "file VOI LUT"
        if win is not None:
            windows, source = (win,), "file"
        else:
            modality = values.astype(np.float32) * np.float32(slope) + np.float32(intercept)
            windows, source, values, slope, intercept = (range_window(modality),), "image range", modality, 1.0, 0.0
    chans = [apply_window(values, w, slope=slope, intercept=intercept) for w in windows]
    if mono1:
        chans = [invert(c) for c in chans]
    out = np.stack(chans, axis=2) if len(chans) > 1 else chans[0][:, :, None]
    return out, tuple(windows), source


def _guarded(what: str):
    """Turn anything pydicom raises while applying a file's LUTs or writing a dataset into an
    INVALID_ARGUMENT that names the step, never its text (which may quote header values)."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except InvalidArgument:
            raise
        except Exception as e:  # noqa: BLE001 - malformed LUTs and headers raise many built-ins
            raise InvalidArgument(
                f"the DICOM file's {what} could not be applied ({e.__class__.__name__}): the header "
                "is inconsistent with its pixel data; fix or re-export the image"
            ) from None

    return guard()


def decode_dicom(image: pb.Image, defaults: DicomDefaults | None = None, channels: int = 1) -> DecodedDicom:
    """Decode the chosen frame of a DICOM image to HWC float32 in [0, 1] (see the module docstring)."""
    with _guarded("Modality LUT, VOI LUT or palette"):
        return _decode_dicom(image, defaults, channels)


def _decode_dicom(image: pb.Image, defaults: DicomDefaults | None, channels: int) -> DecodedDicom:
    h = _header(image)
    arr = _frame_pixels(h)
    view = frame_view(h.ds, h.index)
    stored = _private(h.ds)
    frame_number, n_frames = stored if stored is not None else (h.index + 1, h.frames)
    if h.photometric in GREY:
        pixels, windows, source = _grey(h, view, arr, image, defaults, channels)
    else:
        if h.photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            rgb = np.asarray(apply_color_lut(arr, view))
            top = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else 1.0
        else:
            rgb = arr
            top = float(2 ** int(view.get("BitsStored", 8)) - 1)
        pixels, windows, source = (rgb.astype(np.float32) / np.float32(top)).clip(0.0, 1.0), (), ""
    src = DicomSource(view, frame_number, n_frames, windows, source)
    return DecodedDicom(np.ascontiguousarray(pixels, dtype=np.float32), src)


# -- what a job stores -----------------------------------------------------------------------------
# Everything a stored frame view keeps: the references a result needs (UIDs, modality, geometry)
# and what decoding and windowing read. Nothing else: no Patient, Study description, dates, times,
# physicians, institution or device attributes, accession numbers, free text or private elements.
STORE_KEEP = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PatientOrientation",
)
LUT_KEEP = ("LUTDescriptor", "LUTData", "ModalityLUTType")


def reduced_file(image: pb.Image) -> bytes:
    """A minimal DICOM Part 10 file of the chosen frame: STORE_KEEP attributes of its frame view,
    the frame's pixels uncompressed (colour as RGB), and a private block with the frame number and
    frame count of the source instance, so a result still references the right frame."""
    with _guarded("header (rewriting the frame for the job store)"):
        return _reduced_file(image)


def _reduced_file(image: pb.Image) -> bytes:
    pydicom = _pydicom()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    h = _header(image)
    arr = _frame_pixels(h)
    view = frame_view(h.ds, h.index)
    stored = _private(h.ds)
    frame_number, n_frames = stored if stored is not None else (h.index + 1, h.frames)
    out = Dataset()
    for k in STORE_KEEP:
        if k in view and view[k].value is not None:
            out.add(view[k])
    for seq_name in ("ModalityLUTSequence", "VOILUTSequence"):
        if seq_name in view and len(view[seq_name]):
            item = Dataset()
            for k in LUT_KEEP:
                if k in view[seq_name][0]:
                    item.add(view[seq_name][0][k])
            setattr(out, seq_name, Sequence([item]))
    if h.photometric in GREY:
        a = np.asarray(arr)
        if a.dtype.itemsize == 1 and int(view.BitsAllocated) == 1:
            a = a.astype(np.uint8)
        out.BitsAllocated = a.dtype.itemsize * 8
        out.PixelRepresentation = 1 if a.dtype.kind == "i" else 0
    else:
        if h.photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            a = np.asarray(apply_color_lut(arr, view))
            bits = a.dtype.itemsize * 8
            out.BitsStored, out.HighBit = bits, bits - 1
        else:
            a = np.asarray(arr)
        out.PhotometricInterpretation, out.SamplesPerPixel, out.PlanarConfiguration = "RGB", 3, 0
        out.BitsAllocated = a.dtype.itemsize * 8
        out.PixelRepresentation = 0
    out.Rows, out.Columns = int(a.shape[0]), int(a.shape[1])
    out.PixelData = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"))).tobytes()
    block = out.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "IS", frame_number)
    block.add_new(0x02, "IS", n_frames)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = view.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = view.get("SOPInstanceUID", "2.25.0")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    out.file_meta = meta
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def image_for_storage(image: pb.Image) -> pb.Image:
    """`image` itself unless it is DICOM; else the same options over the reduced file (frame 0)."""
    if not image.ByteSize() or not is_dicom_image(image):
        return image
    out = pb.Image()
    out.CopyFrom(image)
    out.encoded = reduced_file(image)
    out.content_type = DICOM_CONTENT_TYPES[0]
    if out.HasField("dicom"):
        out.dicom.ClearField("frame")
    return out


def job_request_for_storage(request: pb.JobRequest) -> pb.JobRequest:
    """The request as the job store keeps it: every DICOM image (the image, an ablation baseline)
    replaced by its reduced file, so no patient data is ever written to the store."""
    image = image_for_storage(request.image) if request.HasField("image") else None
    base = None
    if request.WhichOneof("params") == "ablation" and request.ablation.HasField("baseline"):
        base = image_for_storage(request.ablation.baseline)
    if (image is None or image is request.image) and (base is None or base is request.ablation.baseline):
        return request
    out = pb.JobRequest()
    out.CopyFrom(request)
    if image is not None:
        out.image.CopyFrom(image)
    if base is not None:
        out.ablation.baseline.CopyFrom(base)
    return out
