"""Result templates keyed by header structure (service/dicom_template.py) never carry one patient's
attributes into another's object.

Two PHI-laden files of one structure (CT_small.dcm, and the same with every patient, study, series,
instance, frame-of-reference, date, position and spacing value changed): the second's result is
built from the first's template, and must equal, element by element, what highdicom builds for it
uncached; no value of the first file may appear in the second's bytes (nor in any template); the
same through a real server over gRPC.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from tests.dicomutil import MARKERS, sample, with_phi
from tests.serverutil import ROOT, dicom_elements, running_server
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service import dicom_out, dicom_template
from xaiserve.service.images import decode_image_source


def other_patient(data: bytes, tag: str) -> bytes:
    """`data` with every source-specific value changed (same attributes, same multiplicities):
    markers suffixed with `tag`, new UIDs, dates, age, position, spacing and slice location."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(io.BytesIO(data))
    for k, v in MARKERS.items():
        setattr(ds, k, f"{v.swapcase()}{tag}" if k != "PatientBirthDate" else "19560203")  # no substring of v
    for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        setattr(ds, k, generate_uid())
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyDate, ds.SeriesDate, ds.StudyTime, ds.StudyID = "20230911", "20230911", "101112.5", f"S{tag}77"
    ds.PatientAge, ds.PatientWeight = "063Y", "58.5"
    ds.ImagePositionPatient = ["-121.5", "-98.25", "-33.125"]
    ds.PixelSpacing = ["0.7421875", "0.7421875"]
    ds.SliceLocation = "-33.125"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


flat = dicom_elements


def text_values(ds) -> set[str]:
    """Every text value of `ds` (top level and nested), as written."""
    out = set()
    for e in ds.iterall():
        if e.VR in dicom_template.TEXT_VRS and e.value not in (None, ""):
            for v in e.value if e.VM > 1 else [e.value]:
                out.add(str(v))
    return out


def static_bytes(pieces) -> bytes:
    out = b""
    for p in pieces:
        if isinstance(p, bytes):
            out += p
        elif isinstance(p, dicom_template.Seq):
            out += b"".join(static_bytes(q) for _, q in p.items)
    return out


@pytest.fixture()
def two_sources():
    first = with_phi(sample("CT_small.dcm"))
    second = other_patient(first, "B")
    a = pydicom.dcmread(io.BytesIO(first))
    b = pydicom.dcmread(io.BytesIO(second))
    # the values of the first file the second must not show (long enough not to occur by chance)
    leak = {v for v in text_values(a) - text_values(b) if len(v) >= 6}
    assert {"Zzphimarkname", a.PatientID, a.StudyInstanceUID, a.SOPInstanceUID, a.FrameOfReferenceUID} <= leak
    return first, second, leak


@pytest.mark.parametrize("fn", [dicom_out.segmentation, dicom_out.parametric_map])
def test_the_second_patient_gets_exactly_what_highdicom_builds_for_it(two_sources, fn):
    first, second, leak = two_sources
    dicom_template.clear()
    rng = np.random.default_rng(1)
    algo = dicom_out.Algorithm("m", "1", "saliency")
    sources = [decode_image_source(pb.Image(encoded=d))[1] for d in (first, second)]
    v = rng.random((128, 128), dtype=np.float32)
    maps = [dicom_out.Map("importance", v, "t"), dicom_out.Map("uncertainty", v * 0.5, "t")]
    fn(sources[0], maps, algo)  # builds the structure's template
    assert len(dicom_template._templates) == 1
    template = next(iter(dicom_template._templates.values()))
    assert template is not None, "CT_small's structure must be templatable"
    made = fn(sources[1], maps, algo)  # a hit: the second file's values spliced into the template
    assert len(dicom_template._templates) == 1
    ref = fn(sources[1], maps, algo, cache=False)  # highdicom from the second file itself
    a, b = pydicom.dcmread(io.BytesIO(made)), pydicom.dcmread(io.BytesIO(ref))
    assert flat(a) == flat(b) and flat(a.file_meta) == flat(b.file_meta)
    assert len(made) == len(ref)  # same encoding, not only the same values
    src = pydicom.dcmread(io.BytesIO(second))
    assert a.StudyInstanceUID == src.StudyInstanceUID and str(a.PatientName) == str(src.PatientName)
    for value in leak:
        assert value.encode() not in made, f"{value!r} of the first file is in the second's result"
    # the template itself holds no value of either file
    kept = static_bytes(template.meta) + static_bytes(template.body)
    for value in leak | {v for v in text_values(src) - text_values(pydicom.dcmread(io.BytesIO(first))) if len(v) >= 6}:
        assert value.encode() not in kept, f"{value!r} is in the template"


def test_a_value_that_cannot_be_spliced_exactly_is_built_uncached(two_sources):
    """A DS value pydicom would reformat (longer than 16 characters) is not spliced: the call falls
    back to highdicom from the source, and the result is still exactly highdicom's."""
    first, second, _ = two_sources
    algo = dicom_out.Algorithm("m", "1", "saliency")
    s1 = decode_image_source(pb.Image(encoded=first))[1]
    ds = pydicom.dcmread(io.BytesIO(second))
    ds.PatientWeight = "58.50000000000001"  # 17 characters: invalid DS
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    s2 = decode_image_source(pb.Image(encoded=buf.getvalue()))[1]
    maps = [dicom_out.Map("mask", np.full((128, 128), 0.25, np.float32), "t")]
    dicom_out.segmentation(s1, maps, algo)
    a = pydicom.dcmread(io.BytesIO(dicom_out.segmentation(s2, maps, algo)))
    b = pydicom.dcmread(io.BytesIO(dicom_out.segmentation(s2, maps, algo, cache=False)))
    assert flat(a) == flat(b)


def test_two_patients_through_the_server(two_sources):
    """Over gRPC: SEGs (and Parametric Maps) for the two files one after the other; each references
    its own study and instance, carries its own patient, and none of the other file's values."""
    import hashlib

    first, second, leak = two_sources
    back = {v for v in text_values(pydicom.dcmread(io.BytesIO(second))) if len(v) >= 6} - text_values(
        pydicom.dcmread(io.BytesIO(first))
    )
    with running_server(store=ROOT / "model_store", load_models="lazy", max_delay_ms=1) as srv:
        stub = srv.stub()
        for fmt in ("dicom-seg", "dicom-pmap"):
            out = []
            for data in (first, second, first):
                r = stub.Explain(
                    pb.ExplainRequest(
                        model="lesions-nemt", image=pb.Image(encoded=data), options=pb.ExplainOptions(output_format=fmt)
                    ),
                    timeout=120,
                )
                out.append(r.dicom)
            for data, res in zip((first, second, first), out):
                src, ds = pydicom.dcmread(io.BytesIO(data)), pydicom.dcmread(io.BytesIO(res))
                assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
                assert str(ds.PatientName) == str(src.PatientName) and ds.AccessionNumber == src.AccessionNumber
                assert src.SOPInstanceUID.encode() in res and src.FrameOfReferenceUID.encode() in res
            for value in leak:
                assert value.encode() not in out[1], f"{value!r} of the first file in the second's {fmt}"
            for value in back:
                assert value.encode() not in out[2], f"{value!r} of the second file in the first's {fmt} after it"
            assert hashlib.sha256(out[0]).digest() != hashlib.sha256(out[2]).digest()  # new instances
