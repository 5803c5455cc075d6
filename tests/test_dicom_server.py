"""DICOM in and DICOM out through a real server over gRPC, on pydicom's bundled sample files.

The default store's models: lesions-nemt (3 channels, no DICOM defaults: a grey image is windowed
by the file / request and replicated) and the DICOM demo ct-phantoms-classifier (window stack lung /
soft tissue / bone as channels, manifest input.dicom), explained with saliency.
"""

from __future__ import annotations

import io

import grpc
import highdicom as hd
import numpy as np
import pydicom
import pytest

from tests.dicomutil import edited, sample, unsupported_syntax
from tests.serverutil import DICOM_PER_RESULT, ROOT, dicom_elements, running_server
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.mask_wire import decode_mask
from xaiserve.training.datasets.phantoms import phantom_dicom, phantom_slice

MODEL = "lesions-nemt"
DEMO = "ct-phantoms-classifier"  # the DICOM demo (window stack as channels), explained with saliency


@pytest.fixture(scope="module")
def stub():
    with running_server(store=ROOT / "model_store", load_models="lazy", max_delay_ms=1) as srv:
        yield srv.stub()


def explain(
    stub, data: bytes, model: str = MODEL, *, dicom: pb.DicomOptions | None = None, **opts
) -> pb.ExplainResponse:
    img = pb.Image(encoded=data)
    if dicom is not None:
        img.dicom.CopyFrom(dicom)
    return stub.Explain(pb.ExplainRequest(model=model, image=img, options=pb.ExplainOptions(**opts)), timeout=120)


def refused(stub, data: bytes, model: str = MODEL, *, dicom=None, **opts) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        explain(stub, data, model, dicom=dicom, **opts)
    return e.value


# -- DICOM out --------------------------------------------------------------------------------------
def test_segmentation_references_the_source_and_holds_the_mask(stub):
    data = sample("CT_small.dcm")
    src = pydicom.dcmread(io.BytesIO(data))
    r = explain(stub, data, output_format="dicom-seg")
    mask = decode_mask(r)
    assert mask.shape == (src.Rows, src.Columns)
    seg = hd.seg.segread(io.BytesIO(r.dicom))
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    assert seg.get_source_image_uids() == [(src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)]
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.SeriesInstanceUID != src.SeriesInstanceUID
    desc = seg.get_segment_description(1)
    algo = desc.algorithm_identification
    assert algo[0].AlgorithmName == "lesions-nemt" and algo[0].AlgorithmVersion == "1"
    assert "method=nemt" in algo[0].AlgorithmParameters
    stored = seg.get_pixels_by_source_instance([src.SOPInstanceUID], segment_numbers=[1], rescale_fractional=True)
    np.testing.assert_allclose(stored[0, :, :, 0], mask, atol=0.5 / 255 + 1e-6)
    # the patient module comes from the caller's own file (Explain stores nothing)
    assert seg.PatientID == src.PatientID


def test_parametric_map_holds_the_float_mask(stub):
    data = sample("MR_small.dcm")
    src = pydicom.dcmread(io.BytesIO(data))
    r = explain(stub, data, output_format="dicom-pmap", dicom_overlay=True)
    pm = pydicom.dcmread(io.BytesIO(r.dicom))
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    values = np.frombuffer(pm.FloatPixelData, "<f4").reshape(src.Rows, src.Columns)
    np.testing.assert_array_equal(values, decode_mask(r))
    refs = pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert refs.ReferencedSOPInstanceUID == src.SOPInstanceUID and refs.ReferencedSOPClassUID == src.SOPClassUID
    sc = pydicom.dcmread(io.BytesIO(r.dicom_overlay))
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.StudyInstanceUID == src.StudyInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert sc.pixel_array.shape == (src.Rows, src.Columns, 3)


def test_multiframe_uses_the_chosen_frame_and_references_it(stub):
    hu, _, _ = phantom_slice(64, seed=3)
    data = phantom_dicom(hu, frames=4)  # frame k = the slice + k HU
    one = phantom_dicom(hu + 2)
    r2 = explain(stub, data, DEMO, dicom=pb.DicomOptions(frame=2), output_format="dicom-seg", method="saliency")
    r_single = explain(stub, one, DEMO, method="saliency")
    np.testing.assert_allclose(decode_mask(r2), decode_mask(r_single), atol=1e-6)  # frame 2 and nothing else
    seg = pydicom.dcmread(io.BytesIO(r2.dicom))
    src = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert int(src.ReferencedFrameNumber) == 3  # 1-based
    assert src.ReferencedSOPInstanceUID == pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID


def test_monochrome1_is_inverted():
    """The same stored values labelled MONOCHROME1 display inverted, after the Modality LUT and the
    window (the model's window stack, and the file's window alike)."""
    from xaiserve.service.images import decode_image
    from xaiserve.service.registry import read_manifest

    spec = next(e.input for e in read_manifest(ROOT / "model_store") if e.name == DEMO)
    hu, _, _ = phantom_slice(64, seed=5)
    m2, m1 = pb.Image(encoded=phantom_dicom(hu)), pb.Image(encoded=phantom_dicom(hu, photometric="MONOCHROME1"))
    np.testing.assert_allclose(decode_image(m1, spec), 1.0 - decode_image(m2, spec), atol=1e-6)
    np.testing.assert_allclose(decode_image(m1), 1.0 - decode_image(m2), atol=1e-6)
    assert decode_image(m2, spec).shape == (64, 64, 3) and decode_image(m2).shape == (64, 64, 1)


def test_request_window_overrides_the_file(stub):
    data = sample("CT_small.dcm")
    base = decode_mask(explain(stub, data))
    narrow = decode_mask(explain(stub, data, dicom=pb.DicomOptions(window_center=40, window_width=80)))
    assert np.abs(base - narrow).max() > 1e-3


# -- DICOM in: every transfer syntax with a plugin --------------------------------------------------
def test_lossless_syntaxes_decode_to_the_same_mask(stub):
    ref = decode_mask(explain(stub, sample("MR_small.dcm")))
    for name in (
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ):
        np.testing.assert_array_equal(decode_mask(explain(stub, sample(name))), ref, err_msg=name)


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_jpeg_dcmtk.dcm",
        "SC_rgb_jpeg_gdcm.dcm",
        "JPGExtended.dcm",
        "693_J2KI.dcm",
        "GDCMJ2K_TextGBR.dcm",
        "SC_rgb_jls_lossy_line.dcm",
        "JPEGLSNearLossless_16.dcm",
        "examples_palette.dcm",
        "SC_ybr_full_422_uncompressed.dcm",
    ],
)
def test_compressed_and_colour_files_decode(stub, name):
    ds = pydicom.dcmread(get_file(name), stop_before_pixels=True)
    if not all(
        k in ds for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    ):  # a bare pixel sample (the JPEG-LS ones): decodes, but a result cannot reference it
        assert decode_mask(explain(stub, sample(name))).shape == (ds.Rows, ds.Columns)
        e = refused(stub, sample(name), output_format="dicom-seg")
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "no StudyInstanceUID" in e.details()
        return
    r = explain(stub, sample(name), output_format="dicom-seg")
    assert decode_mask(r).shape == (ds.Rows, ds.Columns)
    assert hd.seg.segread(io.BytesIO(r.dicom)).get_source_image_uids()[0][2] == ds.SOPInstanceUID


def get_file(name: str):
    from pydicom.data import get_testdata_file

    return get_testdata_file(name)


def test_stream_explain_takes_dicom_frames(stub):
    hu, _, _ = phantom_slice(64, seed=1)
    data = phantom_dicom(hu, frames=3)

    def frames():
        for k in range(3):
            f = pb.ExplainFrame(frame_id=k, image=pb.Image(encoded=data, dicom=pb.DicomOptions(frame=k)))
            if k == 0:
                f.model, f.policy = DEMO, pb.ALL
                f.options.CopyFrom(pb.ExplainOptions(output_format="dicom-seg", method="saliency"))
            yield f

    out = [a for a in stub.StreamExplain(frames(), timeout=120) if a.HasField("result")]
    assert [a.frame_id for a in out] == [0, 1, 2]
    numbers = [
        int(
            pydicom.dcmread(io.BytesIO(a.result.dicom))
            .PerFrameFunctionalGroupsSequence[0]
            .DerivationImageSequence[0]
            .SourceImageSequence[0]
            .ReferencedFrameNumber
        )
        for a in out
    ]
    assert numbers == [1, 2, 3]


def _ref_frame(data: bytes) -> int:
    seg = pydicom.dcmread(io.BytesIO(data))
    return int(
        seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber
    )


def test_stream_explains_every_frame_of_a_cine(stub):
    """One message carrying a multi-frame file with image.dicom.all_frames: one answer per frame, in
    frame order, each with dicom_frame and a SEG referencing that frame; the masks are those of
    explaining each frame on its own; the next message of the stream is answered after them."""
    hu, _, _ = phantom_slice(64, seed=4)
    data = phantom_dicom(hu, frames=4)  # frame k = the slice + k HU
    opts = pb.ExplainOptions(output_format="dicom-seg", method="saliency", mask_encoding=pb.MASK_FLOAT32)
    msgs = [
        pb.ExplainFrame(
            frame_id=5, model=DEMO, options=opts, image=pb.Image(encoded=data, dicom=pb.DicomOptions(all_frames=True))
        ),
        pb.ExplainFrame(frame_id=6, image=pb.Image(encoded=data, dicom=pb.DicomOptions(frame=1))),
    ]
    out = [a for a in stub.StreamExplain(iter(msgs), timeout=120) if a.frame_id or a.HasField("result")]
    assert [(a.frame_id, a.dicom_frame if a.HasField("dicom_frame") else None) for a in out] == [
        (5, 0),
        (5, 1),
        (5, 2),
        (5, 3),
        (6, None),
    ]
    assert all(not a.HasField("status") or a.status.code == 0 for a in out)
    assert [_ref_frame(a.result.dicom) for a in out] == [1, 2, 3, 4, 2]
    for k in range(4):
        single = explain(stub, data, DEMO, dicom=pb.DicomOptions(frame=k), method="saliency")
        np.testing.assert_allclose(decode_mask(out[k].result), decode_mask(single), atol=1e-6)
    np.testing.assert_array_equal(decode_mask(out[4].result), decode_mask(out[1].result))


def test_stream_all_frames_of_a_jpeg_cine_under_latest(stub):
    """The 30-frame ultrasound cine (JPEG baseline, YBR) in one message under policy LATEST: no
    frame of it is dropped, answers 0..29 in order."""
    data = sample("examples_ybr_color.dcm")
    msg = pb.ExplainFrame(
        frame_id=1,
        model=MODEL,
        policy=pb.LATEST,
        options=pb.ExplainOptions(output_format="dicom-seg"),
        image=pb.Image(encoded=data, dicom=pb.DicomOptions(all_frames=True)),
    )
    out = [a for a in stub.StreamExplain(iter([msg]), timeout=300) if a.HasField("result")]
    assert [a.dicom_frame for a in out] == list(range(30))
    assert out[-1].dropped_total == 0
    assert [_ref_frame(a.result.dicom) for a in (out[0], out[29])] == [1, 30]


@pytest.mark.parametrize("name", ["phantom", "examples_ybr_color.dcm"])
def test_cine_frames_cut_from_one_read_give_the_unary_results(stub, monkeypatch, name):
    """image.dicom.all_frames reads the file once and cuts each frame's own single-frame image
    (dicom_in.Cine; forced here for small files): per frame, in order, the mask and the SEG equal
    those of a unary Explain of that frame of the whole file, element by element (per-result UIDs
    and times aside), the SEG referencing the source instance and frame."""
    from xaiserve.service import dicom_in

    monkeypatch.setattr(dicom_in, "CINE_CUT_BYTES", 0)  # the server runs in this process
    if name == "phantom":
        hu, _, _ = phantom_slice(64, seed=6)
        data, model, opts = phantom_dicom(hu, frames=3), DEMO, {"method": "saliency"}
    else:
        data, model, opts = sample(name), MODEL, {}
    n = int(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).NumberOfFrames)
    msg = pb.ExplainFrame(
        frame_id=1,
        model=model,
        policy=pb.ALL,
        max_queue=64,
        options=pb.ExplainOptions(output_format="dicom-seg", mask_encoding=pb.MASK_FLOAT32, **opts),
        image=pb.Image(encoded=data, dicom=pb.DicomOptions(all_frames=True)),
    )
    assert dicom_in.Cine(msg.image).cut
    out = [a for a in stub.StreamExplain(iter([msg]), timeout=300) if a.HasField("result")]
    assert [a.dicom_frame for a in out] == list(range(n))
    skip = {"SOPInstanceUID", "SeriesInstanceUID", "MediaStorageSOPInstanceUID", "InstanceCreationDate"}
    skip |= {"InstanceCreationTime", "ContentDate", "ContentTime", "ContributionDateTime"}

    def flat(ds):
        return dicom_elements(ds, skip)

    for k in sorted({0, n // 2, n - 1}):
        single = explain(
            stub,
            data,
            model,
            dicom=pb.DicomOptions(frame=k),
            output_format="dicom-seg",
            mask_encoding=pb.MASK_FLOAT32,
            **opts,
        )
        np.testing.assert_array_equal(decode_mask(out[k].result), decode_mask(single))
        a, b = pydicom.dcmread(io.BytesIO(out[k].result.dicom)), pydicom.dcmread(io.BytesIO(single.dicom))
        assert flat(a) == flat(b) and _ref_frame(out[k].result.dicom) == k + 1


def test_all_frames_refusals(stub, monkeypatch):
    """all_frames is refused on Explain; on a stream a message that cannot be split (frame set as
    well, not DICOM, frames x rows x columns over the limit, checked on the header before decoding)
    is one failed answer with its status, and the stream goes on."""
    from xaiserve.service import dicom_in

    hu, _, _ = phantom_slice(64, seed=5)
    data = phantom_dicom(hu, frames=3)
    e = refused(stub, data, DEMO, dicom=pb.DicomOptions(all_frames=True), method="saliency")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "StreamExplain" in e.details()
    monkeypatch.setattr(dicom_in, "MAX_ALL_FRAMES_PIXELS", 2 * 64 * 64)  # the server runs in this process
    images = [
        pb.Image(encoded=data, dicom=pb.DicomOptions(all_frames=True, frame=1)),
        pb.Image(encoded=data, dicom=pb.DicomOptions(all_frames=True)),  # 3 x 64 x 64 > the limit
        pb.Image(encoded=data, dicom=pb.DicomOptions(frame=2)),
    ]
    msgs = [pb.ExplainFrame(frame_id=i + 1, image=img) for i, img in enumerate(images)]
    msgs[0].model, msgs[0].options.method, msgs[0].policy = DEMO, "saliency", pb.ALL
    out = [a for a in stub.StreamExplain(iter(msgs), timeout=120) if a.frame_id]
    assert [a.frame_id for a in out] == [1, 2, 3]
    assert out[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "not both" in out[0].status.message
    assert out[1].status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "3 frames of 64 x 64" in out[1].status.message and "several messages" in out[1].status.message
    assert out[2].HasField("result") and not out[2].HasField("dicom_frame")


# -- bad input: each INVALID_ARGUMENT (or RESOURCE_EXHAUSTED) with what to do -----------------------
def test_preamble_without_dicom(stub):
    e = refused(stub, b"\0" * 128 + b"DICM" + b"this is not DICOM at all" * 20)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a DICOM Part 10 file" in e.details() and "complete .dcm file" in e.details()


def test_no_pixel_data(stub):
    e = refused(stub, sample("rtplan.dcm"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no Pixel Data" in e.details() and "send an image instance" in e.details()


def test_unsupported_transfer_syntax(stub):
    e = refused(stub, unsupported_syntax())  # MPEG-4 AVC/H.264: pydicom has no decoder
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1.2.840.10008.1.2.4.102" in e.details() and "transcode" in e.details()


def test_frame_out_of_range(stub):
    e = refused(stub, sample("CT_small.dcm"), dicom=pb.DicomOptions(frame=1))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "frame 1 is out of range" in e.details() and "1 frame" in e.details()
    e = refused(stub, sample("examples_ybr_color.dcm"), dicom=pb.DicomOptions(frame=30))
    assert "30 frames (0..29" in e.details()


@pytest.mark.parametrize("width", [0.0, -400.0])
def test_window_width_not_positive(stub, width):
    e = refused(stub, sample("CT_small.dcm"), dicom=pb.DicomOptions(window_center=40, window_width=width))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "window width must be > 0" in e.details() and "e.g. centre 40 width 400" in e.details()


def test_bits_stored_above_16(stub):
    e = refused(stub, edited("CT_small.dcm", BitsStored=17, HighBit=16))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Bits Stored is 17" in e.details() and "at most 16 bits" in e.details()


def test_header_larger_than_the_limits_is_refused_before_decoding(stub):
    e = refused(stub, edited("CT_small.dcm", Rows=20000, Columns=20000))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "20000 x 20000" in e.details()


def test_output_format_needs_dicom_input_and_a_known_format(stub):
    from xaiserve.service.images import encode_png

    png = encode_png(np.zeros((32, 32, 3), np.float32))
    e = refused(stub, png, output_format="dicom-seg")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "DICOM source image" in e.details()
    e = refused(stub, sample("CT_small.dcm"), output_format="nifti")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "'dicom-seg'" in e.details()
    e = refused(stub, sample("SC_rgb_jpeg_dcmtk.dcm"), output_format="dicom-pmap")  # no Frame of Reference
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "dicom-seg' instead" in e.details()


def test_window_on_colour_and_on_a_window_stack_model(stub):
    e = refused(stub, sample("SC_rgb_jpeg_dcmtk.dcm"), dicom=pb.DicomOptions(window_center=40, window_width=400))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "greyscale" in e.details()
    e = refused(
        stub, sample("CT_small.dcm"), DEMO, dicom=pb.DicomOptions(window_center=40, window_width=400), method="saliency"
    )
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "window stack" in e.details()


def test_content_type(stub):
    data = sample("CT_small.dcm")
    r = stub.Explain(
        pb.ExplainRequest(model=MODEL, image=pb.Image(encoded=data, content_type="application/dicom")), timeout=60
    )
    assert decode_mask(r).shape == (128, 128)
    with pytest.raises(grpc.RpcError) as e:
        stub.Explain(pb.ExplainRequest(model=MODEL, image=pb.Image(encoded=data, content_type="video/mp4")), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "application/dicom" in e.value.details()


@pytest.mark.slow
def test_objects_validate_with_dciodvfy(stub, tmp_path):
    """dciodvfy (dicom3tools) finds no error in a SEG, a Parametric Map and a Secondary Capture, from
    a single-frame CT and from frame 4 of a multi-frame ultrasound cine."""
    import shutil
    import subprocess

    # scripts/setup.sh installs it: a machine without it is set up wrong, not a reason to skip
    assert shutil.which("dciodvfy"), "dciodvfy is missing: install the Debian package dicom3tools (scripts/setup.sh)"
    made = []
    r = explain(stub, sample("CT_small.dcm"), output_format="dicom-pmap", dicom_overlay=True)
    made += [("ct.pmap.dcm", r.dicom), ("ct.sc.dcm", r.dicom_overlay)]
    made.append(("ct.seg.dcm", explain(stub, sample("CT_small.dcm"), output_format="dicom-seg").dicom))
    # the same file again: built from the cached template (dicom_out), a new instance of its own
    made.append(("ct.seg2.dcm", explain(stub, sample("CT_small.dcm"), output_format="dicom-seg").dicom))
    a, b = (pydicom.dcmread(io.BytesIO(d)) for _, d in made[-2:])
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    assert b.file_meta.MediaStorageSOPInstanceUID == b.SOPInstanceUID
    assert hd.seg.segread(io.BytesIO(made[-1][1])).get_source_image_uids() == [
        (
            a.StudyInstanceUID,
            a.ReferencedSeriesSequence[0].SeriesInstanceUID,
            a.SourceImageSequence[0].ReferencedSOPInstanceUID,
        )
    ]
    r = explain(
        stub,
        sample("examples_ybr_color.dcm"),
        dicom=pb.DicomOptions(frame=3),
        output_format="dicom-seg",
        dicom_overlay=True,
    )
    made += [("us.seg.dcm", r.dicom), ("us.sc.dcm", r.dicom_overlay)]
    for name, data in made:
        path = tmp_path / name
        path.write_bytes(data)
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{name}: {errors}"


@pytest.mark.parametrize(
    "name,frame",
    [
        ("CT_small.dcm", None),
        ("examples_ybr_color.dcm", 7),
        ("examples_palette.dcm", None),
        ("MR_small_jp2klossless.dcm", None),
        ("SC_rgb_rle_16bit_2frame.dcm", 1),
        ("6154", None),
    ],
)
def test_the_stored_frame_view_decodes_like_the_original(name, frame):
    """What a job stores (service.dicom_in.reduced_file) decodes to the same pixels and references
    the same instance and frame as the file it came from, and holds no patient attribute."""
    from xaiserve.service.dicom_in import STORE_KEEP, image_for_storage
    from xaiserve.service.images import decode_image_source

    img = pb.Image(encoded=sample(name))
    if frame is not None:
        img.dicom.frame = frame
    stored = image_for_storage(img)
    a, src_a = decode_image_source(img)
    b, src_b = decode_image_source(stored)
    np.testing.assert_array_equal(a, b)
    assert (src_a.frame_number, src_a.number_of_frames, src_a.uids) == (
        src_b.frame_number,
        src_b.number_of_frames,
        src_b.uids,
    )
    ds = pydicom.dcmread(io.BytesIO(stored.encoded))
    assert {e.keyword for e in ds if e.tag.group != 0x0009} <= set(STORE_KEEP) | {"PixelData", "PlanarConfiguration"}
    assert not stored.dicom.HasField("frame") and image_for_storage(stored).encoded == stored.encoded


def test_a_cached_template_gives_the_object_highdicom_builds():
    """dicom_out builds a result once per source frame with placeholder pixels and splices the
    per-result elements in afterwards: the object equals one built without the cache (a source
    without a digest), element by element, except the per-result UIDs and times; the pixels are
    highdicom's (round(v * 255)) and the Parametric Map's value ranges and window follow the values."""
    from xaiserve.service import dicom_out
    from xaiserve.service.images import decode_image_source

    _, source = decode_image_source(pb.Image(encoded=sample("CT_small.dcm")))
    rng = np.random.default_rng(0)

    def flat(ds):
        return dicom_elements(ds, DICOM_PER_RESULT)

    algo = dicom_out.Algorithm("m", "1", "saliency")
    for fn in (dicom_out.segmentation, dicom_out.parametric_map):
        for k in range(3):  # a miss, then hits with new values each time
            v = rng.random((source.header.Rows, source.header.Columns), dtype=np.float32) * (3 if k else 1) - k
            maps = [dicom_out.Map("importance", v, "test"), dicom_out.Map("uncertainty", v * 0.5, "test")]
            a = pydicom.dcmread(io.BytesIO(fn(source, maps, algo)))
            b = pydicom.dcmread(io.BytesIO(fn(source, maps, algo, cache=False)))
            assert flat(a) == flat(b) and flat(a.file_meta) == flat(b.file_meta)
            assert a.SOPInstanceUID != b.SOPInstanceUID
        if fn is dicom_out.segmentation:
            unit = (v - v.min()) / (v.max() - v.min())
            np.testing.assert_array_equal(a.pixel_array[0], np.around(unit * np.float32(255)).astype(np.uint8))
            assert "min-max scaled" in a.SegmentSequence[0].SegmentDescription
        else:
            frame = a.PerFrameFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
            assert frame.DoubleFloatRealWorldValueFirstValueMapped == float(v.min())
            voi = a.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
            assert abs(float(voi.WindowWidth) - (float(v.max()) - float(v.min()))) < 1e-12


def test_the_demo_explains_with_its_default_method(stub):
    """ct-phantoms-classifier's manifest default_method (saliency) is used when a request names no
    method, and ListModels advertises it; a bad default_method is refused by the manifest check."""
    from xaiserve.service.manifest_schema import entry_problems

    r = explain(stub, sample("CT_small.dcm"), DEMO, output_format="dicom-seg")
    assert r.method == "saliency" and r.dicom
    info = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert info[DEMO].default_method == "saliency" and info[MODEL].default_method == ""
    base = {
        "name": "x",
        "version": "1",
        "kind": "classifier",
        "files": {"onnx": "x.onnx"},
        "input": {"height": 8, "width": 8},
    }
    assert entry_problems({**base, "default_method": "saliency"}) == []
    assert any("default_method" in p for p in entry_problems({**base, "default_method": "nosuch"}))
    assert any(
        "does not apply" in p for p in entry_problems({**base, "kind": "denoiser", "default_method": "saliency"})
    )
