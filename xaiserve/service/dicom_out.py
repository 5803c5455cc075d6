"""DICOM results out: masks and heatmaps as a DICOM Segmentation (FRACTIONAL) or a Parametric Map,
optionally a Secondary Capture of the mask over the image, written with highdicom.

Every object references its source (service.dicom_in.DicomSource): the Study Instance UID (the
result joins the source's study), the source series and SOP Instance (Common Instance Reference,
Derivation / Source Image Sequences) and, for a multi-frame source, the frame (Referenced Frame
Number). The algorithm identification names the model (name, version) and the method; the maps are
at the source frame's resolution.

Segment and quantity codes: an explanation map has no code in SNOMED CT or DCM, so they are local
codes of the private coding scheme "99XAISERVE" (PS3.3 8.2: designators starting with "99" are
local), defined in CODES below.

Patient and study attributes of a result are those of the header it was made from: the caller's
own file for Explain (nothing is stored), the PHI-free stored frame view for a job, whose result a
client completes with `restore_patient` from its local copy of the source.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from xaiserve.errors import InvalidArgument, quote
from xaiserve.service import dicom_in  # noqa: F401 - silences pydicom / highdicom warnings and loggers
from xaiserve.service.dicom_in import DicomSource

FORMATS = ("dicom-seg", "dicom-pmap")
SCHEME = "99XAISERVE"
MANUFACTURER = "xaiserve"
SERIES_NUMBER = {"dicom-seg": 9101, "dicom-pmap": 9102, "overlay": 9103}
# the attributes restore_patient copies back: the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1)
PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "OtherPatientIDsSequence",
    "EthnicGroup",
    "PatientComments",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
)


@dataclass(frozen=True)
class Algorithm:
    """Who made a result: model name and version, the method, and parameters worth recording."""

    model: str
    version: str
    method: str
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Map:
    """One result map over the source frame: values [H, W] and what they are."""

    label: str  # short, <= 16 characters for the Parametric Map's LUT Label
    values: np.ndarray
    meaning: str  # a sentence: what a value means


def check_output_format(fmt: str, overlay: bool = False, *, what: str = "options.output_format") -> str:
    """The normalised output format ("" or one of FORMATS); InvalidArgument otherwise."""
    f = fmt.strip().lower()
    if f and f not in FORMATS:
        raise InvalidArgument(
            f"{what} {quote(fmt, 64)} is unknown; use '' (tensors only), {' or '.join(repr(x) for x in FORMATS)}"
        )
    if overlay and not f:
        raise InvalidArgument(f"dicom_overlay needs {what} set to {' or '.join(repr(x) for x in FORMATS)}")
    return f


def require_source(source: DicomSource | None, what: str = "options.output_format") -> DicomSource:
    if source is None:
        raise InvalidArgument(
            f"{what} asks for a DICOM result, which must reference a DICOM source image: send the image as DICOM "
            "(image.encoded = the .dcm file), or leave the output format empty"
        )
    return source


def bound(height: int, width: int, maps: int, fmt: str, overlay: bool) -> int:
    """Largest size of the DICOM result(s) of `maps` maps over an height x width frame (admission)."""
    if not fmt:
        return 0
    per = 1 if fmt == "dicom-seg" else 4  # 8-bit fractional vs float32
    n = height * width * per * maps + 64 * 1024  # header, functional groups, references
    if overlay:
        n += height * width * 3 + 32 * 1024
    return n


def _code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, SCHEME, meaning)


CODES = {  # value -> meaning, the private scheme's whole vocabulary
    "EXPLANATION": "Model explanation",
    "MASK": "Explanation mask",
    "IMPORTANCE": "Pixel importance",
    "UNCERTAINTY": "Importance uncertainty",
    "HEATMAP": "Ablation path heatmap",
}


def _type_code(label: str):
    key = {"importance": "IMPORTANCE", "uncertainty": "UNCERTAINTY", "u_relax": "IMPORTANCE", "heatmap": "HEATMAP"}.get(
        label, "MASK"
    )
    return _code(key, CODES[key])


def _algorithm(algo: Algorithm):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    params = {"method": algo.method, "model": f"{algo.model}:{algo.version}", **algo.parameters}
    return hd.AlgorithmIdentificationSequence(
        name=algo.model[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=str(algo.version)[:64],
        source=MANUFACTURER,
        parameters={k: str(v)[:256] for k, v in params.items()},
    )


def _equipment(algo: Algorithm):
    """The explanation as Contributing Equipment (PS3.3 C.7.5.1: purpose "Processing Equipment"):
    model name:version as the model name, the method and its parameters as the contribution. The
    Parametric Map has no Algorithm Identification of its own; this is where its model is named."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    params = "; ".join(f"{k}={v}" for k, v in {"method": algo.method, **algo.parameters}.items())
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=f"{algo.model}:{algo.version}"[:64],
        software_versions=_software(),
        contribution_description=params[:1024],
    )


def _software() -> str:
    from xaiserve.service.server import VERSION

    return f"xaiserve {VERSION}"


def _unit_range(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """(values in [0, 1], whether they had to be min-max scaled to get there)."""
    v = np.asarray(values, dtype=np.float32)
    if not np.isfinite(v).all():
        v = np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(v.min()), float(v.max())
    if lo >= 0.0 and hi <= 1.0:
        return v, False
    return ((v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)), True


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _single_frame_header(source: DicomSource):
    """The header highdicom builds from: a copy of the frame view, made acceptable to it.

    highdicom decides "multi-frame" by the SOP class and then wants the whole multi-frame layout; a
    result of ONE frame is built from the frame view under a single-frame stand-in class instead (CT
    Image when the view has patient geometry, else Secondary Capture), and `_fix_references` puts the
    real class and the frame number back. Type 2 attributes it copies are added empty when absent."""
    import copy

    from highdicom._standard_utils import is_multiframe_image
    from pydicom.dataset import Dataset

    h = source.header
    out = Dataset()
    for elem in h:
        if not elem.tag.is_private:  # highdicom copies no private element; templates have none either
            out.add(copy.copy(elem))  # own elements: setting a value below must not change the source header
    if "PixelSpacing" in h and "SliceThickness" not in h:
        # highdicom copies Pixel Spacing into a Pixel Measures Sequence that then lacks Slice Thickness
        # (type 1 there) and refuses to read its own object back: such a source (SC, CR, NM ...) gets a
        # result without pixel measures rather than an invented thickness
        del out.PixelSpacing
    for k in TYPE2_COPIED:  # highdicom reads these from the source: absent (not only empty) in some files
        if k not in out:
            setattr(out, k, "")
    if "FrameOfReferenceUID" not in h:
        # no Frame of Reference: the result cannot be placed in patient space, so none of the plane
        # geometry is copied, and a class whose IOD requires one (CT, MR ...) is built as Secondary Capture
        for k in ("ImageOrientationPatient", "ImagePositionPatient"):
            if k in out:
                delattr(out, k)
        out.SOPClassUID = SECONDARY_CAPTURE
    elif is_multiframe_image(h):
        geometry = all(k in h for k in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"))
        out.SOPClassUID = CT_IMAGE if geometry else SECONDARY_CAPTURE
    return out


def _fix_references(ds, source: DicomSource) -> None:
    """Every reference of the source instance names its real SOP class and, for a multi-frame
    source, the frame the result was made from (Referenced Frame Number, PS3.3 C.10.5 Image SOP
    Instance Reference Macro)."""
    import copy

    uid, sop = source.uids["SOPInstanceUID"], source.uids["SOPClassUID"]
    image_refs = ("SourceImageSequence", "ReferencedImageSequence")  # Image SOP Instance Reference Macro

    def walk(d) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for i, item in enumerate(elem.value):
                    if item.get("ReferencedSOPInstanceUID") == uid:
                        item = copy.deepcopy(item)  # highdicom shares items between sequences
                        elem.value[i] = item
                        item.ReferencedSOPClassUID = sop
                        if source.number_of_frames > 1 and elem.keyword in image_refs:
                            item.ReferencedFrameNumber = source.frame_number
                        elif "ReferencedFrameNumber" in item:
                            del item.ReferencedFrameNumber
                    walk(item)

    walk(ds)


def check_source(fmt: str, source: DicomSource) -> None:
    """What a format needs of its source, checked before any model work."""
    missing = [
        k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID") if not source.uids[k]
    ]
    if missing:
        raise InvalidArgument(
            f"the DICOM image has no {', '.join(missing)}: a DICOM result must reference its source instance, so it "
            "cannot be made for this file; send a complete image instance, or leave the output format empty"
        )
    geometry = ("FrameOfReferenceUID", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")
    if fmt == "dicom-pmap" and not all(k in source.header for k in geometry):
        sop = source.uids["SOPClassUID"]
        raise InvalidArgument(
            f"a Parametric Map needs a source image with a Frame of Reference and its plane geometry (PS3.3 A.75: "
            f"Frame of Reference UID, Image Orientation / Position (Patient), Pixel Spacing); this one (SOP Class {sop}) lacks "
            "them: ask for output_format 'dicom-seg' instead"
        )


def _finish(ds, source: DicomSource) -> None:
    """What dciodvfy asks of every object that highdicom leaves out: the local coding scheme declared
    (PS3.3 C.12.1.1.5), Patient Orientation when there is no patient geometry (General Image, type 2C)
    and Laterality (General Series, type 2C: copied, or empty = unknown)."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator, item.CodingSchemeName = SCHEME, "xaiserve explanation codes"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    ds.CodingSchemeIdentificationSequence = [item]
    if "FrameOfReferenceUID" not in source.header and "PatientOrientation" not in ds:
        ds.PatientOrientation = source.header.get("PatientOrientation", "")
    if "Laterality" not in ds and ds.SOPClassUID != "1.2.840.10008.5.1.4.1.1.66.4":  # (highdicom's SEG decides it)
        ds.Laterality = source.header.get("Laterality", "")


def _save(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _check_shape(source: DicomSource, maps: Sequence[Map]) -> tuple[int, int]:
    rows, cols = int(source.header.Rows), int(source.header.Columns)
    for m in maps:
        if m.values.shape != (rows, cols):
            raise ValueError(f"map {m.label} is {list(m.values.shape)}, the source frame {rows} x {cols}")
    return rows, cols


def _description(source: DicomSource, algo: Algorithm) -> str:
    frame = f"; frame {source.frame_number} of {source.number_of_frames}" if source.number_of_frames > 1 else ""
    return f"{algo.method} explanation by {algo.model}:{algo.version}{frame}"[:64]  # LO


def _with_input(algo: Algorithm, source: DicomSource) -> Algorithm:
    """The algorithm identification records how the image became the model's input (the window)."""
    if not source.windows and not source.window_source:
        return algo
    win = ", ".join(w.describe() for w in source.windows) or source.window_source
    extra = {"input_window": f"{win} ({source.window_source})" if source.windows else win}
    if source.number_of_frames > 1:
        extra["frame"] = str(source.frame_number)
    return Algorithm(algo.model, algo.version, algo.method, {**algo.parameters, **extra})


# -- templates: what does not depend on the pixels nor on the source's values -----------------------
# service/dicom_template.py: a result is built by highdicom once per (format, source header
# STRUCTURE, algorithm, map labels, frame size) from two stand-in headers whose values are
# sentinels, compiled into encoded pieces and slots, and every call splices the source's values and
# the per-result elements (the instance's UIDs, creation / content date and time, the pixel data,
# the Contribution DateTime, a Parametric Map's value ranges and window) into it. Templates hold no
# value of any real source (module docstring there); a structure whose stand-in builds differ
# outside the slots is built by highdicom on every call, as is a source with a value that cannot be
# spliced byte-exactly (an invalid DS).
EXPLICIT_LE = "1.2.840.10008.1.2.1"
_PER_RESULT = {  # tag -> (VR, name) of the top-level elements every result sets afresh
    0x00020003: ("UI", "sop"),  # Media Storage SOP Instance UID
    0x00080012: ("DA", "date"),  # Instance Creation Date
    0x00080013: ("TM", "time"),  # Instance Creation Time
    0x00080018: ("UI", "sop"),  # SOP Instance UID
    0x00080023: ("DA", "date"),  # Content Date
    0x00080033: ("TM", "time"),  # Content Time
    0x0020000E: ("UI", "series"),  # Series Instance UID
}
PIXEL_DATA, FLOAT_PIXEL_DATA = 0x7FE00010, 0x7FE00008
SHARED_GROUPS, PER_FRAME_GROUPS, CONTRIBUTING = 0x52009229, 0x52009230, 0x0018A001
CONTRIBUTION_DATETIME, FRAME_VOI_LUT = 0x0018A002, 0x00289132
RWV_FIRST, RWV_LAST, WINDOW_CENTER, WINDOW_WIDTH = 0x00409214, 0x00409213, 0x00281050, 0x00281051


_iod_lookup_cached = False


def _cache_iod_lookups() -> None:
    """Memoise highdicom's `is_attribute_in_iod`: a pure function of its standard tables that
    walks every attribute of every module of the IOD on each call, and highdicom calls it 8 times
    per object (~25 % of a template build). Rebound where highdicom imported it by name."""
    global _iod_lookup_cached
    if _iod_lookup_cached:
        return
    import functools

    import highdicom._standard_utils as su
    import highdicom.base
    import highdicom.sr.content

    original = su.is_attribute_in_iod

    @functools.lru_cache(maxsize=4096)
    def cached(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
        return original(attribute, sop_class_uid, list(exclude) if exclude is not None else None)

    def is_attribute_in_iod(attribute, sop_class_uid, exclude_path_elements=None):
        exclude = tuple(exclude_path_elements) if exclude_path_elements is not None else None
        return cached(str(attribute), str(sop_class_uid), exclude)

    for module in (su, highdicom.base, highdicom.sr.content):
        if getattr(module, "is_attribute_in_iod", None) is original:
            module.is_attribute_in_iod = is_attribute_in_iod  # type: ignore[attr-defined]
    _iod_lookup_cached = True


def _slot_of(tag: int, path: tuple) -> tuple[str, int] | None:
    """Which per-result value an element of a built object is (dicom_template.compile_template)."""
    if not path:
        if tag in _PER_RESULT:
            return _PER_RESULT[tag][1], 0
        return ("pixels", 0) if tag in (PIXEL_DATA, FLOAT_PIXEL_DATA) else None
    if tag == CONTRIBUTION_DATETIME:
        return "datetime", 0
    if tag in (RWV_FIRST, RWV_LAST):
        return ("rwv_first" if tag == RWV_FIRST else "rwv_last"), path[0][1] if path[0][0] == PER_FRAME_GROUPS else 0
    if (
        tag in (WINDOW_CENTER, WINDOW_WIDTH)
        and path[0][0] == SHARED_GROUPS
        and any(t == FRAME_VOI_LUT for t, _ in path)
    ):
        return ("window_center" if tag == WINDOW_CENTER else "window_width"), 0
    return None


def _encoded_result(
    kind: str,
    source: DicomSource,
    algo: Algorithm,
    labels: tuple,
    shape: tuple,
    build,
    pixels: bytes,
    ranges: list[tuple[float, float]] | None = None,
    cache: bool = True,
) -> bytes:
    """The result: its template (built by `build(source, algo)` from stand-ins on a miss, or from
    `source` itself when it cannot be templated or cache=False) with this call's values spliced in."""
    import dataclasses
    import datetime

    from pydicom.uid import generate_uid
    from pydicom.valuerep import DSfloat

    from xaiserve.service import dicom_template as dt

    template, values = None, None
    if cache:
        si = dt.stand_ins(source.header, ("frame",), copies=False)
        params = tuple(sorted((k, v) for k, v in algo.parameters.items() if k != "frame"))
        key: tuple = (kind, si.key, source.number_of_frames, algo.model, algo.version, algo.method, params)
        key += ("frame" in algo.parameters, labels, shape)

        def make():
            full = dt.stand_ins(source.header, ("frame",))
            built = []
            for s, header in ((1, full.a), (2, full.b)):
                frame = dt.extra_sentinel(full, "frame", s)
                p = dict(algo.parameters)
                if "frame" in p:
                    p["frame"] = str(frame)
                stand_in = dataclasses.replace(source, header=header, frame_number=frame)
                built.append(build(stand_in, dataclasses.replace(algo, parameters=p)))
            return dt.compile_template(built[0], built[1], full, _slot_of)

        def safe():
            try:
                return make()
            except Exception:  # noqa: BLE001 - stand-ins highdicom refuses, or builds that differ: not templatable
                return None

        template = dt.cached(key, safe)
        if template is not None:
            values = dt.source_values(source.header, template.paths, {"frame": source.frame_number})
    if template is None or values is None:  # highdicom from the source itself, every call
        data = build(source, algo)
        template = dt.compile_template(data, data, dt.StandIns(None, None, "", [], ({}, {}), ({}, {})), _slot_of)
        values = []

    now = datetime.datetime.now()
    date, time_ = now.strftime("%Y%m%d").encode(), now.strftime("%H%M%S.%f").encode()
    fresh = {
        "sop": generate_uid().encode(),
        "series": generate_uid().encode(),
        "date": date,
        "time": time_,
        "datetime": now.strftime("%Y%m%d%H%M%S.%f").encode(),
    }

    def result(slot) -> bytes:
        if slot.result == "pixels":
            return dt._leaf_bytes(slot.tag, slot.vr, pixels)
        if slot.result in fresh:
            return dt._leaf_bytes(slot.tag, slot.vr, fresh[slot.result])
        assert ranges is not None  # value ranges are slots of a Parametric Map only
        lo, hi = ranges[slot.index] if slot.result.startswith("rwv") else ranges[0]
        if slot.result == "rwv_first":
            return dt._leaf_bytes(slot.tag, slot.vr, struct.pack("<d", lo))
        if slot.result == "rwv_last":
            return dt._leaf_bytes(slot.tag, slot.vr, struct.pack("<d", hi if hi > lo else lo + 1.0))
        v = (lo + hi) / 2.0 if slot.result == "window_center" else max(hi - lo, 1e-6)
        return dt._leaf_bytes(slot.tag, slot.vr, str(DSfloat(v, auto_format=True)).encode())

    return template.render(values, result)


def segmentation(source: DicomSource, maps: Sequence[Map], algo: Algorithm, *, cache: bool = True) -> bytes:
    """A FRACTIONAL (PROBABILITY) DICOM Segmentation, one segment per map (values scaled to [0, 1]
    when they are not already; the segment description says so). 8 bits per value (Maximum
    Fractional Value 255, the cheapest FRACTIONAL encoding), uncompressed Explicit VR Little Endian;
    frames in segment order, each value round(v * 255) as highdicom computes it. cache=False: built
    by highdicom from this source (the reference the tests compare templates with)."""
    shape = _check_shape(source, maps)
    units = [_unit_range(m.values) for m in maps]
    labels = tuple((m.label, m.meaning, scaled) for m, (_, scaled) in zip(maps, units))
    pixels = b"".join(np.around(v * np.float32(255.0)).astype(np.uint8).tobytes() for v, _ in units)
    scaled = [s for _, s in units]

    def build(src: DicomSource, a: Algorithm) -> bytes:
        return _segmentation_template(src, maps, scaled, a)

    return _encoded_result("dicom-seg", source, algo, labels, shape, build, pixels, cache=cache)


def _segmentation_template(source: DicomSource, maps: Sequence[Map], scaled: list[bool], algo: Algorithm) -> bytes:
    """The SEG with all-zero placeholder pixels (boolean: highdicom's cheapest value check)."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    _cache_iod_lookups()
    algo_seq = _algorithm(algo)
    descs = []
    for i, (m, sc) in enumerate(zip(maps, scaled)):
        d = hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=m.label[:64],
            segmented_property_category=_code("EXPLANATION", CODES["EXPLANATION"]),
            segmented_property_type=_type_code(m.label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo_seq,
        )
        d.SegmentDescription = (m.meaning + (" (min-max scaled to [0, 1])" if sc else ""))[:64]
        descs.append(d)
    rows, cols = int(source.header.Rows), int(source.header.Columns)
    seg = hd.seg.Segmentation(
        source_images=[_single_frame_header(source)],
        pixel_array=np.zeros((1, rows, cols, len(maps)), dtype=bool),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=descs,
        series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBER["dicom-seg"],
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=_software(),
        device_serial_number="0",
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        content_description=_description(source, algo),
        content_label="XAI",
        omit_empty_frames=False,
        series_description=f"xaiserve {algo.method} {algo.model}"[:64],
        contributing_equipment=[_equipment(algo)],
        transfer_syntax_uid=EXPLICIT_LE,
    )
    if len(maps) > 1:  # what highdicom infers for several truly fractional segments (its check saw zeros)
        seg.SegmentsOverlap = "UNDEFINED"
    _fix_references(seg, source)
    _finish(seg, source)
    return _save(seg)


def _pm_values(maps: Sequence[Map]) -> tuple[np.ndarray, list[tuple[float, float]]]:
    values = np.stack([np.nan_to_num(np.asarray(m.values, np.float32)) for m in maps], axis=-1)
    ranges = [(float(values[..., i].min()), float(values[..., i].max())) for i in range(len(maps))]
    return values, ranges


def parametric_map(source: DicomSource, maps: Sequence[Map], algo: Algorithm, *, cache: bool = True) -> bytes:
    """A Parametric Map of float32 values, one channel per map, with a real world value mapping
    (identity, no units) and a local quantity code each; the window of the first map's range.
    Uncompressed Explicit VR Little Endian, frames in map order. cache=False as for segmentation."""
    shape = _check_shape(source, maps)
    values, ranges = _pm_values(maps)
    labels = tuple((m.label, m.meaning) for m in maps)

    def build(src: DicomSource, a: Algorithm) -> bytes:
        return _parametric_map_template(src, maps, values, ranges, a)

    pixels = np.ascontiguousarray(np.moveaxis(values, -1, 0)).tobytes()  # one frame per map
    return _encoded_result("dicom-pmap", source, algo, labels, shape, build, pixels, ranges, cache=cache)


def _parametric_map_template(
    source: DicomSource, maps: Sequence[Map], values: np.ndarray, ranges: list[tuple[float, float]], algo: Algorithm
) -> bytes:
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    _cache_iod_lookups()
    mappings = []
    for m, (lo, hi) in zip(maps, ranges):
        mappings.append(
            [
                hd.pm.RealWorldValueMapping(
                    lut_label=m.label[:16],
                    lut_explanation=m.meaning[:64],
                    unit=codes.UCUM.NoUnits,
                    value_range=(lo, hi if hi > lo else lo + 1.0),
                    slope=1.0,
                    intercept=0.0,
                    quantity_definition=_type_code(m.label),
                )
            ]
        )
    lo, hi = ranges[0]
    placeholder = np.zeros((1, *values.shape), np.float32)
    pm = hd.pm.ParametricMap(
        source_images=[_single_frame_header(source)],
        pixel_array=placeholder if len(maps) > 1 else placeholder[..., 0],
        series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBER["dicom-pmap"],
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=_software(),
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=mappings if len(maps) > 1 else mappings[0],
        voi_lut_transformations=[
            hd.VOILUTTransformation(
                window_center=(lo + hi) / 2.0, window_width=max(hi - lo, 1e-6), voi_lut_function="LINEAR_EXACT"
            )
        ],
        content_description=_description(source, algo),
        content_label="XAI",
        series_description=f"xaiserve {algo.method} {algo.model}"[:64],
        contributing_equipment=[_equipment(algo)],
        transfer_syntax_uid=EXPLICIT_LE,
    )
    _fix_references(pm, source)
    _finish(pm, source)
    return _save(pm)


def secondary_capture(source: DicomSource, image: np.ndarray, heat: np.ndarray, algo: Algorithm) -> bytes:
    """An RGB Secondary Capture of `heat` over `image` (both at the source frame's size), for
    viewers without Segmentation support; it references the source image it was derived from."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    from xaiserve.service.images import overlay, to_uint8

    rgb = to_uint8(overlay(image, np.clip(heat, 0.0, 1.0)))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=_single_frame_header(source),
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=generate_uid(),
        series_number=SERIES_NUMBER["overlay"],
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "P"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.uids["SOPClassUID"]
    ref.ReferencedSOPInstanceUID = source.uids["SOPInstanceUID"]
    sc.SourceImageSequence = [ref]
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = _description(source, algo)
    sc.SeriesDescription = f"xaiserve overlay {algo.method} {algo.model}"[:64]
    sc.BurnedInAnnotation = "NO"
    _fix_references(sc, source)
    _finish(sc, source)
    return _save(sc)


def encode(
    fmt: str,
    source: DicomSource,
    maps: Sequence[Map],
    algo: Algorithm,
    *,
    overlay_image: np.ndarray | None = None,
    overlay_map: np.ndarray | None = None,
) -> tuple[bytes, bytes]:
    """(result, overlay or b"") in the requested format."""
    check_source(fmt, source)
    algo = _with_input(algo, source)
    what = "Segmentation" if fmt == "dicom-seg" else "Parametric Map"
    try:
        body = segmentation(source, maps, algo) if fmt == "dicom-seg" else parametric_map(source, maps, algo)
        over = b""
        if overlay_image is not None:
            what = "Secondary Capture overlay"
            heat = overlay_map if overlay_map is not None else _unit_range(maps[0].values)[0]
            over = secondary_capture(source, overlay_image, heat, algo)
    except InvalidArgument:
        raise
    except Exception as e:  # noqa: BLE001 - highdicom refuses headers it cannot build from; never quoted (values)
        raise InvalidArgument(
            f"a DICOM {what} could not be built for this source image (SOP Class {source.uids['SOPClassUID']}; "
            f"{e.__class__.__name__}): its header lacks what the object must copy or reference; "
            + (
                "try output_format 'dicom-seg'"
                if fmt == "dicom-pmap"
                else "leave dicom_overlay off, or the output format empty"
            )
        ) from None
    return body, over


def restore_patient(result: bytes, source: bytes) -> bytes:
    """`result` with the Patient and General Study attributes of `source` (a client's local copy
    of the image a job result references; the job store keeps neither). Refuses a source whose
    Study Instance UID is not the result's."""
    import pydicom

    res = pydicom.dcmread(io.BytesIO(result))
    src = pydicom.dcmread(io.BytesIO(source), stop_before_pixels=True, force=not dicom_in.has_preamble(source))
    if str(src.get("StudyInstanceUID", "")) != str(res.get("StudyInstanceUID", "")):
        raise InvalidArgument(
            "the source file is not of the result's study (Study Instance UIDs differ); "
            "pass the .dcm file the job was submitted with"
        )
    for k in PATIENT_STUDY:
        if k in src:
            res[k] = src[k]
    return _save(res)


def explain_result(
    fmt: str,
    source: DicomSource,
    image: np.ndarray,
    mask: np.ndarray,
    entry,
    method: str,
    target_label: int,
    overlay: bool,
) -> tuple[bytes, bytes]:
    """The DICOM result of an Explain call: the mask (model grid) mapped back over the source frame
    as the response's mask is (images.to_input_geometry undoes the model's resize), then encoded."""
    from xaiserve.service.images import to_input_geometry

    h, w = image.shape[:2]
    full = to_input_geometry(np.asarray(mask, np.float32), entry.input, h, w)
    label = ""
    labels = getattr(entry, "labels", ())
    if target_label >= 0:
        label = labels[target_label] if target_label < len(labels) else str(target_label)
    params = {"target_label": f"{target_label} ({label})" if label else str(target_label)} if target_label >= 0 else {}
    algo = Algorithm(entry.name, entry.version, method, params)
    meaning = f"{method} mask" + (f" for '{label}'" if label else "") + ", 1 = kept by the explanation"
    return encode(
        fmt, source, [Map("mask", full, meaning)], algo, overlay_image=image if overlay else None, overlay_map=full
    )


# -- jobs ------------------------------------------------------------------------------------------
def prepare_job_request(request):
    """At SubmitJob, after the method validated it: the output format checked against the input
    (a DICOM result needs a DICOM image with what the format references), then the request as the
    job store keeps it: every DICOM image reduced to the frame's pixels, the attributes decoding
    needs and the UIDs a result references (service.dicom_in.job_request_for_storage)."""
    from xaiserve.service.dicom_in import decode_dicom, is_dicom_image, job_request_for_storage

    fmt = check_output_format(request.output_format, request.dicom_overlay, what="output_format")
    if fmt:
        if not request.HasField("image") or not is_dicom_image(request.image):
            require_source(None, "output_format")
        check_source(fmt, decode_dicom(request.image).source)
    return job_request_for_storage(request)


def job_maps(request, result, spec, height: int, width: int) -> tuple[list[Map], np.ndarray]:
    """The maps of a job result over the source frame (RELAX: importance and uncertainty, eq. 12-13
    of [RELAX]; ablation path: the heatmap, [THESIS] ch. 2; sift_ablation / sift_rise: the Voronoi
    and band-pass heatmaps, [THESIS] sec. 4.3) and the one an overlay shows."""
    from xaiserve.service.images import to_input_geometry
    from xaiserve.service.tensors import from_tensor

    which = result.WhichOneof("result")
    if which == "relax":
        r = result.relax
        pairs = [
            ("importance", r.importance, "RELAX importance R (mean similarity under masking, [RELAX] eq. 12)"),
            ("uncertainty", r.uncertainty, "RELAX uncertainty U (variance of the similarity, [RELAX] eq. 13)"),
        ]
    elif which == "ablation":
        pairs = [
            (
                "heatmap",
                result.ablation.heatmap,
                f"ablation path heatmap ([THESIS] ch. 2), label {result.ablation.target_label}",
            )
        ]
    elif which == "sift":
        # Both SIFT methods carry the same two maps ([THESIS] sec. 4.3, eq. 4.46-4.48), already at the
        # source image's resolution (jobs/sift.py maps them back before storing): used as they are.
        s, how = result.sift, f"{request.method}, label {result.sift.target_label}"
        maps = []
        for label, t, meaning in (
            ("voronoi", s.heatmap_voronoi, f"SIFT Voronoi heatmap ([THESIS] eq. 4.46-4.47), {how}"),
            ("bandpass", s.heatmap_bandpass, f"SIFT band-pass heatmap ([THESIS] eq. 4.48), {how}"),
        ):
            v = np.asarray(from_tensor(t, what=label), dtype=np.float32)
            if v.shape != (height, width):  # an older result at the model's input size
                v = to_input_geometry(v, spec, height, width, clip=False)
            maps.append(Map(label, v, meaning))
        return maps, _unit_range(maps[0].values)[0]
    else:
        raise InvalidArgument(f"job results of kind {which!r} have no DICOM form")
    maps = [
        Map(label, to_input_geometry(from_tensor(t, what=label), spec, height, width, clip=False), meaning)
        for label, t, meaning in pairs
    ]
    return maps, _unit_range(maps[0].values)[0]


def add_job_dicom(request, result, registry) -> None:
    """Fill result.dicom (and dicom_overlay) of a finished job whose request asked for DICOM,
    from the stored (reduced) source image: in the worker, after the method ran."""
    from xaiserve.service.images import decode_image_source

    fmt = check_output_format(request.output_format, request.dicom_overlay, what="output_format")
    entry = registry.resolve(request.model)
    image, source = decode_image_source(request.image, entry.input)
    source = require_source(source, "output_format")
    h, w = image.shape[:2]
    maps, heat = job_maps(request, result, entry.input, h, w)
    params = {}
    if result.parameters_json:
        import json

        p = json.loads(result.parameters_json)
        params = {
            k: str(p[k])
            for k in ("num_masks", "masking", "estimator", "score", "reduction", "target_label", "num_keypoints")
            if k in p
        }
    algo = Algorithm(entry.name, entry.version, request.method, params)
    result.dicom, result.dicom_overlay = encode(
        fmt, source, maps, algo, overlay_image=image if request.dicom_overlay else None, overlay_map=heat
    )
