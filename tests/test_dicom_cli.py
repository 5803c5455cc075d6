"""The clinical round trip from the command line: `xaiserve explain scan.dcm --out result.seg.dcm`
and `xaiserve jobs submit scan.dcm ... --watch --out DIR` against a real server."""

from __future__ import annotations

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


@pytest.mark.slow
def test_explain_writes_a_segmentation(address, tmp_path, capsys):
    scan = tmp_path / "CT_small.dcm"
    scan.write_bytes(sample("CT_small.dcm"))
    out = tmp_path / "result.seg.dcm"
    assert (
        cli.main(
            ["explain", str(scan), "--model", "lesions-nemt", "--out", str(out), "--overlay", "--address", address]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    src = pydicom.dcmread(scan)
    seg = hd.seg.segread(out)
    assert seg.get_source_image_uids() == [(src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)]
    assert summary["references"] == [src.SOPInstanceUID] and summary["sop_class"] == "Segmentation Storage"
    assert (
        pydicom.dcmread(summary["dicom_overlay"]).SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    )


@pytest.mark.slow
def test_explain_frame_window_and_pmap(address, tmp_path, capsys):
    hu, _, _ = phantom_slice(64, seed=2)
    scan = tmp_path / "cine.dcm"
    scan.write_bytes(phantom_dicom(hu, frames=3))
    out = tmp_path / "r.pmap.dcm"
    assert (
        cli.main(
            [
                "explain",
                str(scan),
                "--model",
                "lesions-nemt",
                "--format",
                "dicom-pmap",
                "--frame",
                "2",
                "--window",
                "40,400",
                "--out",
                str(out),
                "--address",
                address,
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["referenced_frames"] == [3]
    pm = pydicom.dcmread(out)
    made_by = [e for e in pm.ContributingEquipmentSequence if e.get("ManufacturerModelName") == "lesions-nemt:1"]
    assert made_by and "input_window=C=40 W=400 (request)" in made_by[0].ContributionDescription
    assert "method=nemt" in made_by[0].ContributionDescription


@pytest.mark.slow
def test_jobs_submit_writes_dicom_with_the_patient_restored(address, tmp_path):
    scan = tmp_path / "scan.dcm"
    scan.write_bytes(with_phi(sample("CT_small.dcm")))
    out = tmp_path / "res"
    rc = cli_jobs.main(
        [
            "submit",
            str(scan),
            "--method",
            "relax",
            "--model",
            "scenes-simclr",
            "--param",
            "num_masks=64",
            "--param",
            "batch_size=32",
            "--format",
            "dicom-pmap",
            "--overlay",
            "--watch",
            "--out",
            str(out),
            "--address",
            address,
        ]
    )
    assert rc == 0
    pm = pydicom.dcmread(out / "relax.pmap.dcm")
    src = pydicom.dcmread(scan)
    # the server stored and returned no patient data; the CLI copied it from the local file
    assert pm.PatientID == src.PatientID and str(pm.PatientName) == str(src.PatientName)
    assert pm.StudyInstanceUID == src.StudyInstanceUID
    labels = (
        [m.LUTLabel for m in pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence]
        if "RealWorldValueMappingSequence" in pm.SharedFunctionalGroupsSequence[0]
        else [m.LUTLabel for g in pm.PerFrameFunctionalGroupsSequence for m in g.RealWorldValueMappingSequence]
    )
    assert set(labels) == {"importance", "uncertainty"}
    assert len(pm.FloatPixelData) == 128 * 128 * 4 * 2  # two channels at the source's 128 x 128
    sc = pydicom.dcmread(out / "relax.overlay.dcm")
    assert sc.PatientID == src.PatientID and sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    made_by = [e for e in pm.ContributingEquipmentSequence if e.get("ManufacturerModelName") == "scenes-simclr:1"]
    assert made_by and "method=relax" in made_by[0].ContributionDescription


def test_explain_all_frames_writes_one_result_per_frame(address, tmp_path, capsys):
    """`xaiserve explain cine.dcm --all-frames --out DIR`: the file once over StreamExplain, a SEG
    per frame (frame_NNNN.seg.dcm, 0-based) referencing that frame of the source."""
    hu, _, _ = phantom_slice(64, seed=6)
    scan = tmp_path / "cine.dcm"
    scan.write_bytes(phantom_dicom(hu, frames=3))
    out = tmp_path / "frames"
    argv = ["explain", str(scan), "--model", "ct-phantoms-classifier", "--method", "saliency"]
    assert cli.main([*argv, "--all-frames", "--out", str(out), "--address", address]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 3 and summary["failed"] == [] and summary["method"] == "saliency"
    src = pydicom.dcmread(scan)
    for k in range(3):
        seg = hd.seg.segread(out / f"frame_{k:04d}.seg.dcm")
        assert seg.get_source_image_uids() == [(src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)]
        ref = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
        assert int(ref.ReferencedFrameNumber) == k + 1
    with pytest.raises(SystemExit, match="leave out --frame"):
        cli.main([*argv, "--all-frames", "--frame", "1", "--out", str(out), "--address", address])


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, params, fmt",
    [
        ("sift_rise", ["num_masks=32", "batch_size=32"], "dicom-pmap"),
        ("sift_ablation", ["max_iterations=2", "num_slices=4"], "dicom-seg"),
    ],
)
def test_jobs_submit_sift_writes_dicom(address, tmp_path, method, params, fmt):
    """A SIFT job (both methods) with a DICOM source and DICOM output: the Voronoi and band-pass
    heatmaps as two maps at the source's resolution, referencing the source, the patient restored."""
    scan = tmp_path / "scan.dcm"
    scan.write_bytes(with_phi(sample("CT_small.dcm")))
    out = tmp_path / "res"
    args = ["submit", str(scan), "--method", method, "--model", "lesions-classifier"]
    for p in params:
        args += ["--param", p]
    args += ["--format", fmt, "--overlay", "--watch", "--out", str(out), "--address", address]
    assert cli_jobs.main(args) == 0
    src = pydicom.dcmread(scan)
    kind = "pmap" if fmt == "dicom-pmap" else "seg"
    obj = pydicom.dcmread(out / f"sift.{kind}.dcm")
    assert obj.PatientID == src.PatientID and obj.StudyInstanceUID == src.StudyInstanceUID
    if kind == "pmap":
        g = obj.SharedFunctionalGroupsSequence[0]
        labels = (
            [m.LUTLabel for m in g.RealWorldValueMappingSequence]
            if "RealWorldValueMappingSequence" in g
            else [m.LUTLabel for f in obj.PerFrameFunctionalGroupsSequence for m in f.RealWorldValueMappingSequence]
        )
        assert set(labels) == {"voronoi", "bandpass"}
        assert len(obj.FloatPixelData) == 128 * 128 * 4 * 2  # two channels at the source's 128 x 128
    else:
        seg = hd.seg.segread(out / "sift.seg.dcm")
        assert seg.get_source_image_uids() == [(src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)]
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["voronoi", "bandpass"]
        assert (seg.Rows, seg.Columns) == (128, 128)
    sc = pydicom.dcmread(out / "sift.overlay.dcm")
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    made_by = [e for e in obj.ContributingEquipmentSequence if e.get("ManufacturerModelName") == "lesions-classifier:1"]
    assert made_by and f"method={method}" in made_by[0].ContributionDescription


def test_models_table_marks_the_default_method(address, capsys):
    """`xaiserve models` shows which method Explain runs when a request names none (the manifest's
    default_method, advertised by ListModels)."""
    assert cli.main(["models", "--address", address]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "saliency (default)" in rows["ct-phantoms-classifier:1"]
    assert "(default)" not in rows["lesions-classifier:1"]
