"""Command-line DICOM helpers for `xaiserve explain` and `xaiserve jobs`.

    xaiserve explain scan.dcm --model ct-phantoms-nemt --out result.seg.dcm     # a DICOM Segmentation
    xaiserve explain scan.dcm --model ct-phantoms-nemt --format dicom-pmap --overlay --frame 3 --window 40,400
    xaiserve jobs submit scan.dcm --method relax --model ... --watch --out res/   # res/relax.seg.dcm

A job's DICOM result comes back without patient and study attributes (the job store keeps none);
the CLI copies them from the local source file (the submitted image, or `--source FILE` for
`jobs get` / `jobs watch`) before writing it, so the result files into the source's study.
Nothing here prints a header value other than UIDs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from xaiserve.proto.explain.v1 import explainer_pb2 as pb

SUFFIX = {"dicom-seg": "seg", "dicom-pmap": "pmap"}


def add_flags(p: argparse.ArgumentParser, *, jobs: bool = False) -> None:
    g = p.add_argument_group("DICOM")
    g.add_argument(
        "--format",
        choices=tuple(SUFFIX),
        default=None,
        help="return the result as DICOM (default for a DICOM image: dicom-seg"
        + (")" if jobs else " when --out ends in .dcm)"),
    )
    g.add_argument("--overlay", action="store_true", help="also a Secondary Capture of the result over the image")
    g.add_argument("--frame", type=int, default=None, help="multi-frame: the frame to explain (0-based)")
    g.add_argument("--window", default=None, metavar="C,W", help="greyscale window centre,width (e.g. 40,400)")
    if not jobs:
        g.add_argument(
            "--all-frames",
            action="store_true",
            help="multi-frame (cine): explain every frame over one StreamExplain call; --out is a directory "
            "that gets frame_NNNN.<seg|pmap>.dcm per frame (0-based)",
        )


def is_dicom_file(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM" or str(path).lower().endswith(".dcm")


def dicom_options(args: argparse.Namespace) -> pb.DicomOptions | None:
    """The image.dicom options of --frame / --window (None when neither is given)."""
    if args.frame is None and args.window is None:
        return None
    o = pb.DicomOptions()
    if args.frame is not None:
        o.frame = args.frame
    if args.window is not None:
        try:
            c, w = (float(v) for v in args.window.split(","))
        except ValueError:
            raise SystemExit(f"--window {args.window!r}: give centre,width, e.g. 40,400") from None
        o.window_center, o.window_width = c, w
    return o


def output_format(args: argparse.Namespace, *, jobs: bool = False) -> str:
    """--format, else dicom-seg for a DICOM image whose result goes to a .dcm file (explain) or a
    directory (jobs); '' otherwise."""
    if args.format:
        return args.format
    if not is_dicom_file(args.image):
        return ""
    if jobs:
        return "dicom-seg" if getattr(args, "out", None) else ""
    return "dicom-seg" if (args.out or "").lower().endswith(".dcm") else ""


def summary_of(data: bytes) -> dict[str, Any]:
    """What a result references (UIDs and frame only: never a patient attribute)."""
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    refs = []
    for series in ds.get("ReferencedSeriesSequence", []):
        for inst in series.get("ReferencedInstanceSequence", []):
            refs.append(str(inst.ReferencedSOPInstanceUID))
    frames = sorted(
        {
            int(i.ReferencedFrameNumber)
            for g in ds.get("PerFrameFunctionalGroupsSequence", [])
            for d in g.get("DerivationImageSequence", [])
            for i in d.get("SourceImageSequence", [])
            if "ReferencedFrameNumber" in i
        }
    )
    out = {"sop_class": ds.SOPClassUID.name, "study_instance_uid": str(ds.StudyInstanceUID), "references": refs}
    if frames:
        out["referenced_frames"] = frames
    return out


def write_explain(r, args: argparse.Namespace, fmt: str) -> dict[str, Any]:
    out = Path(args.out or Path(args.image).with_suffix(f".{SUFFIX[fmt]}.dcm").name)
    out.write_bytes(r.dicom)
    res: dict[str, Any] = {"dicom": str(out), **summary_of(r.dicom)}
    if r.dicom_overlay:
        ov = out.with_name(out.name.removesuffix(".dcm") + ".overlay.dcm")
        ov.write_bytes(r.dicom_overlay)
        res["dicom_overlay"] = str(ov)
    return res


def explain_all_frames(client, args: argparse.Namespace) -> dict[str, Any]:
    """`xaiserve explain cine.dcm --all-frames --out DIR`: the file once, on StreamExplain with
    image.dicom.all_frames (policy ALL), one DICOM result per frame written as it arrives. A frame
    that failed is listed with its status; the call fails (SystemExit) only when the stream does."""
    import grpc

    from xaiserve.service.client import image_message

    if args.frame is not None:
        raise SystemExit("--all-frames explains every frame: leave out --frame")
    if not args.out:
        raise SystemExit("--all-frames needs --out DIR (one DICOM file per frame goes there)")
    fmt = args.format or "dicom-seg"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    img = image_message(args.image)
    o = dicom_options(args) or pb.DicomOptions()
    o.all_frames = True
    img.dicom.CopyFrom(o)
    opts = pb.ExplainOptions(method=args.method, output_format=fmt, dicom_overlay=args.overlay)
    if args.target_label is not None:
        opts.target_label = args.target_label
    msg = pb.ExplainFrame(frame_id=0, image=img, model=args.model, options=opts, policy=pb.ALL)
    written, failed, method = [], [], ""
    try:
        for a in client.stub.StreamExplain(iter([msg]), timeout=args.timeout, metadata=client.metadata):
            if not a.HasField("dicom_frame") and not a.HasField("status"):
                continue  # a drain notice
            k = a.dicom_frame if a.HasField("dicom_frame") else None
            if a.HasField("status") and a.status.code != 0:
                failed.append({"frame": k, "code": _code(a.status.code).name, "message": a.status.message})
                continue
            method = a.result.method or method
            path = out / f"frame_{k:04d}.{SUFFIX[fmt]}.dcm"
            path.write_bytes(a.result.dicom)
            entry = {"frame": k, "dicom": str(path)}
            if a.result.dicom_overlay:
                ov = path.with_name(path.name.removesuffix(".dcm") + ".overlay.dcm")
                ov.write_bytes(a.result.dicom_overlay)
                entry["dicom_overlay"] = str(ov)
            written.append(entry)
    except grpc.RpcError as e:
        raise SystemExit(f"StreamExplain failed: {e.code().name}: {e.details()}") from None
    return {"model": args.model, "method": method, "frames": len(written), "written": written, "failed": failed}


def _code(number: int):
    import grpc

    return next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN)


def write_job_dicom(result: pb.JobResult, out: Path, source: Path | None, fmt_hint: str = "") -> list[Path]:
    """result.dicom (+ overlay) as <method>.<seg|pmap>.dcm in `out`, patient data restored from `source`."""
    from xaiserve.service.dicom_out import restore_patient

    written = []
    which = result.WhichOneof("result") or "result"
    src = source.read_bytes() if source is not None and source.is_file() else None
    for data, name in ((result.dicom, "dicom"), (result.dicom_overlay, "overlay")):
        if not data:
            continue
        if src is not None:
            data = restore_patient(data, src)
        kind = "overlay" if name == "overlay" else SUFFIX.get(fmt_hint, "")
        if not kind:
            import io

            import pydicom

            uid = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPClassUID)
            kind = "seg" if uid == "1.2.840.10008.5.1.4.1.1.66.4" else "pmap"
        p = out / f"{which}.{kind}.dcm"
        p.write_bytes(data)
        written.append(p)
    return written
