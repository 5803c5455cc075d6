"""DICOM test files: pydicom's bundled samples, and variants of them made with pydicom."""

from __future__ import annotations

import io

import pydicom
from pydicom.data import get_testdata_file

MARKERS = {
    "PatientName": "Zzphimarkname",
    "OtherPatientNames": "Qqphimarkother^Given",
    "PatientID": "PHIMARKID8841",
    "PatientBirthDate": "19230417",
    "OtherPatientIDs": "PHIMARKOTHER5521",
    "AccessionNumber": "PHIMARKACC301",
    "ReferringPhysicianName": "Phimarkdoctor^Yy",
    "InstitutionName": "PHIMARK INSTITUTE",
    "StudyDescription": "PHIMARK STUDY",
}


def sample(name: str) -> bytes:
    with open(get_testdata_file(name), "rb") as f:
        return f.read()


def edited(name: str, **changes) -> bytes:
    """A bundled sample with header elements changed (keyword=value; value None deletes it);
    `transfer_syntax=` changes the File Meta's Transfer Syntax UID."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ts = changes.pop("transfer_syntax", None)
    for k, v in changes.items():
        if v is None:
            if k in ds:
                del ds[k]
        else:
            setattr(ds, k, v)
    if ts is not None:
        ds.file_meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def with_phi(data: bytes) -> bytes:
    """`data` with every MARKERS attribute set to its marker (strings no real header holds)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    for k, v in MARKERS.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def marker_strings() -> list[str]:
    """What must never appear anywhere: each marker, and the name's parts."""
    out = set(MARKERS.values())
    out |= {p for v in MARKERS.values() for p in v.split("^") if len(p) >= 8}
    return sorted(out)


def unsupported_syntax(name: str = "CT_small.dcm", uid: str = "1.2.840.10008.1.2.4.102") -> bytes:
    """A sample re-labelled with a transfer syntax pydicom has no decoder for (default MPEG-4 AVC/H.264),
    its pixel data encapsulated as that syntax requires."""
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(get_testdata_file(name))
    ds.file_meta.TransferSyntaxUID = uid
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].is_undefined_length = True
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
