"""No patient data in logs, metrics, error messages or job records.

A real `xaiserve serve` process (debug logging) gets DICOM files whose Patient Name, Patient ID,
Birth Date, Other Patient IDs, Accession Number, Referring Physician, Institution and Study
Description hold unique marker strings: successful Explain calls (SEG, Parametric Map, overlay),
failing ones, a RELAX job, an ablation-path job and a SIFT job (sift_rise, Voronoi and band-pass
heatmaps as a Segmentation with an overlay) with DICOM results, and a failed job. Then every
log line, the /metrics page, every error message, the jobs as GetJob returns them and the raw bytes
of the job database are searched for the markers. The stored request must keep only the frame,
the attributes decoding needs and the UIDs a result references.
"""

from __future__ import annotations

import io
import sqlite3
import time
import urllib.request

import grpc
import pydicom
import pytest

from tests.dicomutil import edited, marker_strings, sample, unsupported_syntax, with_phi
from tests.serverutil import ROOT, server_process
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.dicom_in import PRIVATE_GROUP, STORE_KEEP
from xaiserve.training.datasets.phantoms import phantom_dicom, phantom_slice

pytestmark = pytest.mark.slow


def wait(stub, job_id: str, timeout: float = 240) -> pb.Job:
    end = time.time() + timeout
    while time.time() < end:
        job = stub.GetJob(pb.JobRef(id=job_id, include_result=True), timeout=30)
        if job.state in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED, pb.EXPIRED):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def test_no_phi_anywhere(tmp_path):
    markers = marker_strings()
    ct = with_phi(sample("CT_small.dcm"))
    hu, _, _ = phantom_slice(64, seed=11)
    phantom = with_phi(phantom_dicom(hu, frames=2))
    bad = [  # each fails at a different step, every one with the markers in its header
        (with_phi(edited("CT_small.dcm", BitsStored=17, HighBit=16)), None),
        (ct, pb.DicomOptions(frame=4)),
        (ct, pb.DicomOptions(window_center=40, window_width=0)),
        (with_phi(edited("CT_small.dcm", PixelData=None)), None),
        (with_phi(unsupported_syntax()), None),
        (ct[:900], None),  # truncated in the middle of the header
    ]
    assert all(m.encode() in ct for m in markers)  # the markers are really there to be found
    errors: list[str] = []
    state = tmp_path / "state"
    with server_process(
        ROOT / "model_store", state_dir=str(state), load_models="lazy", log_level="DEBUG", max_delay_ms=1
    ) as srv:
        stub = srv.stub()
        for fmt, overlay in (("dicom-seg", True), ("dicom-pmap", False)):
            r = stub.Explain(
                pb.ExplainRequest(
                    model="lesions-nemt",
                    image=pb.Image(encoded=ct),
                    options=pb.ExplainOptions(output_format=fmt, dicom_overlay=overlay),
                ),
                timeout=120,
            )
            assert r.dicom
        for data, opts in bad:
            img = pb.Image(encoded=data)
            if opts is not None:
                img.dicom.CopyFrom(opts)
            with pytest.raises(grpc.RpcError) as e:
                stub.Explain(pb.ExplainRequest(model="lesions-nemt", image=img), timeout=60)
            assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
            errors.append(e.value.details())
        with pytest.raises(grpc.RpcError) as e:  # refused at SubmitJob
            stub.SubmitJob(
                pb.JobRequest(
                    method="relax",
                    model="scenes-simclr",
                    image=pb.Image(encoded=bad[0][0]),
                    relax=pb.RelaxParams(num_masks=32),
                ),
                timeout=60,
            )
        errors.append(e.value.details())
        jobs = [
            stub.SubmitJob(
                pb.JobRequest(
                    method="relax",
                    model="scenes-simclr",
                    image=pb.Image(encoded=ct),
                    relax=pb.RelaxParams(num_masks=64, batch_size=32),
                    output_format="dicom-pmap",
                    dicom_overlay=True,
                    idempotency_key="phi-test",
                ),
                timeout=60,
            ),
            stub.SubmitJob(
                pb.JobRequest(
                    method="ablation_path",
                    model="ct-phantoms-classifier",
                    image=pb.Image(encoded=phantom, dicom=pb.DicomOptions(frame=1)),
                    ablation=pb.AblationParams(max_iterations=2, num_slices=4),
                    output_format="dicom-seg",
                ),
                timeout=60,
            ),
            stub.SubmitJob(
                pb.JobRequest(
                    method="sift_rise",
                    model="lesions-classifier",
                    image=pb.Image(encoded=ct),
                    sift=pb.SiftParams(num_masks=32, batch_size=32, seed=3),
                    output_format="dicom-seg",
                    dicom_overlay=True,
                ),
                timeout=60,
            ),
        ]
        again = stub.SubmitJob(
            pb.JobRequest(
                method="relax",
                model="scenes-simclr",
                image=pb.Image(encoded=ct),
                relax=pb.RelaxParams(num_masks=64, batch_size=32),
                output_format="dicom-pmap",
                dicom_overlay=True,
                idempotency_key="phi-test",
            ),
            timeout=60,
        )
        assert again.id == jobs[0].id  # the stored (reduced) request is deterministic: idempotency still works
        done = [wait(stub, j.id) for j in jobs]
        for j in done:
            assert j.state == pb.SUCCEEDED, j.error
            assert j.result.dicom
        metrics = urllib.request.urlopen(srv.metrics_url, timeout=10).read()
    logs = srv.log_path.read_bytes()
    db = b"".join(p.read_bytes() for p in state.glob("jobs.sqlite*"))

    # the job's DICOM result: empty patient module, the source's UIDs and frame
    pm = pydicom.dcmread(io.BytesIO(done[0].result.dicom))
    src = pydicom.dcmread(io.BytesIO(ct))
    assert pm.StudyInstanceUID == src.StudyInstanceUID and str(pm.PatientName) == "" and pm.PatientID == ""
    seg = pydicom.dcmread(io.BytesIO(done[1].result.dicom))
    ref = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert (
        int(ref.ReferencedFrameNumber) == 2
        and ref.ReferencedSOPInstanceUID == pydicom.dcmread(io.BytesIO(phantom)).SOPInstanceUID
    )

    sift = pydicom.dcmread(io.BytesIO(done[2].result.dicom))  # the SIFT job's SEG: its two heatmaps, no patient
    assert [x.SegmentLabel for x in sift.SegmentSequence] == ["voronoi", "bandpass"]
    assert sift.StudyInstanceUID == src.StudyInstanceUID and str(sift.PatientName) == "" and sift.PatientID == ""
    assert done[2].result.dicom_overlay and done[2].result.WhichOneof("result") == "sift"

    assert len(logs) > 1000 and len(metrics) > 1000 and len(db) > 10000  # the places searched are not empty
    for m in markers:
        for where, blob in (("logs", logs), ("metrics", metrics), ("job database", db)):
            assert m.encode() not in blob, f"{m!r} found in the {where}"
        for e in errors:
            assert m not in e, f"{m!r} in an error message: {e}"
        for j in done:
            assert m.encode() not in j.SerializeToString(), f"{m!r} in job {j.id}"
            assert m.encode() not in j.result.dicom and m.encode() not in j.result.dicom_overlay

    # what the store holds: the reduced frame view (STORE_KEEP + the frame reference), nothing else
    con = sqlite3.connect(str(state / "jobs.sqlite"))
    rows = con.execute("SELECT request FROM jobs").fetchall()
    con.close()
    assert len(rows) == 3
    for (blob,) in rows:
        req = pb.JobRequest.FromString(blob)
        ds = pydicom.dcmread(io.BytesIO(req.image.encoded))
        public = {e.keyword for e in ds if e.tag.group != PRIVATE_GROUP}
        assert public <= set(STORE_KEEP) | {"PixelData", "PlanarConfiguration"}, public - set(STORE_KEEP)
        assert "StudyInstanceUID" in public and "SOPInstanceUID" in public and "PatientName" not in ds
        assert not req.image.dicom.HasField("frame")
