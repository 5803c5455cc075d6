"""The clinical round trip from the command line: `xaiserve explain scan.dcm --out result.seg.dcm`
and `xaiserve jobs submit scan.dcm ... --watch --out DIR` against a real server."""
from __future__ import annotations

import io
import json

import highdicom as hd
import pydicom
import pytest

from tests.dicomutil import sample, with_phi
from tests.serverutil import ROOT, running_server
from xaiserve.service import cli, cli_jobs
from xaiserve.training.datasets.phantoms import phantom_dicom, phantom_slice


@pytest.fixture(scope="module")
def address():
    with running_server(store=ROOT / "model_store", load_models="lazy", max_delay_ms=1) as srv:
        yield srv.address


def test_explain_writes_a_segmentation(address, tmp_path, capsys):
    scan = tmp_path / "CT_small.dcm"
    scan.write_bytes(sample("CT_small.dcm"))
    out = tmp_path / "result.seg.dcm"
    assert cli.main(["explain", str(scan), "--model", "lesions-nemt", "--out", str(out), "--overlay", "--address", address]) == 0
    summary = json.loads(capsys.readouterr().out)
    src = pydicom.dcmread(scan)
    seg = hd.seg.segread(out)
    assert seg.get_source_image_uids() == [(src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)]
    assert summary["references"] == [src.SOPInstanceUID] and summary["sop_class"] == "Segmentation Storage"
    assert pydicom.dcmread(summary["dicom_overlay"]).SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID


def test_explain_frame_window_and_pmap(address, tmp_path, capsys):
    hu, _, _ = phantom_slice(64, seed=2)
    scan = tmp_path / "cine.dcm"
    scan.write_bytes(phantom_dicom(hu, frames=3))
    out = tmp_path / "r.pmap.dcm"
    assert cli.main(["explain", str(scan), "--model", "lesions-nemt", "--format", "dicom-pmap", "--frame", "2",
                     "--window", "40,400", "--out", str(out), "--address", address]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["referenced_frames"] == [3]
    pm = pydicom.dcmread(out)
    made_by = [e for e in pm.ContributingEquipmentSequence if e.get("ManufacturerModelName") == "lesions-nemt:1"]
    assert made_by and "input_window=C=40 W=400 (request)" in made_by[0].ContributionDescription
    assert "method=nemt" in made_by[0].ContributionDescription
