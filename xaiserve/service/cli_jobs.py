"""`xaiserve jobs`: submit, watch, fetch and cancel slow explanation jobs on a running server.

    xaiserve jobs submit cat.png --method relax --model scenes-simclr --param num_masks=2000 --watch --out res/
    xaiserve jobs watch ID            # progress bar until the job ends (exit 0 only if it succeeded)
    xaiserve jobs get ID --out DIR    # the job as JSON; result tensors as .npy, renderings as .png
    xaiserve jobs cancel ID

`submit` prints the job id alone on stdout (so `ID=$(xaiserve jobs submit ...)` works); everything
meant for a person goes to stderr. gRPC errors print "error: CODE: message" and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from xaiserve.methods import JOB_METHODS, METHODS
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service import cli_dicom

# Which JobRequest.params field a method's --param values go to: the field whose message is the
# method's parameters message in the methods table.
_PARAM_FIELDS = {f.message_type.name: f.name for f in pb.JobRequest.DESCRIPTOR.oneofs_by_name["params"].fields}
PARAMS_FIELD = {
    name: _PARAM_FIELDS[METHODS[name].params] for name in JOB_METHODS if METHODS[name].params in _PARAM_FIELDS
}


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    # Same flags as the other client commands of service/cli.py.
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--token", default=None, help="bearer token")
    p.add_argument("--ca", default=None, help="CA certificate (TLS)")
    p.add_argument("--cert", default=None, help="client certificate (mutual TLS)")
    p.add_argument("--key", default=None, help="client key (mutual TLS)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per unary call")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xaiserve jobs", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    s = sub.add_parser("submit", help="submit a job; prints its id")
    s.add_argument("image", help="image file (PNG, JPEG, ...)")
    s.add_argument("--method", required=True, help=" or ".join(JOB_METHODS))
    s.add_argument("--model", required=True, help="model name or name:version")
    s.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="a RelaxParams / AblationParams field, e.g. num_masks=2000 (repeatable)",
    )
    s.add_argument(
        "--params",
        choices=sorted(set(PARAMS_FIELD.values())),
        default=None,
        help="which parameter message --param fills (default: from --method)",
    )
    s.add_argument("--priority", type=int, default=0, help="higher runs first")
    s.add_argument("--deadline", type=float, default=0.0, help="seconds; past it the job ends EXPIRED")
    s.add_argument("--idempotency-key", default="", help="a retry with the same key returns the same job")
    s.add_argument("--watch", action="store_true", help="then watch it with a progress bar")
    s.add_argument("--out", default=None, help="with --watch: write the result here")
    cli_dicom.add_flags(s, jobs=True)
    _add_client_flags(s)
    w = sub.add_parser("watch", help="progress bar until the job ends")
    w.add_argument("id")
    w.add_argument("--out", default=None, help="write the result here when it succeeds")
    w.add_argument("--source", default=None, help="the submitted .dcm file: its patient data completes a DICOM result")
    _add_client_flags(w)
    g = sub.add_parser("get", help="print the job; --out writes the result files")
    g.add_argument("id")
    g.add_argument("--out", default=None)
    g.add_argument("--source", default=None, help="the submitted .dcm file: its patient data completes a DICOM result")
    _add_client_flags(g)
    c = sub.add_parser("cancel", help="cancel a queued or running job")
    c.add_argument("id")
    _add_client_flags(c)
    return p


class UsageError(Exception):
    pass


def _convert(field: FieldDescriptor, raw: str) -> Any:
    t = field.type
    try:
        if t in (
            FieldDescriptor.TYPE_INT32,
            FieldDescriptor.TYPE_INT64,
            FieldDescriptor.TYPE_UINT32,
            FieldDescriptor.TYPE_UINT64,
            FieldDescriptor.TYPE_SINT32,
            FieldDescriptor.TYPE_SINT64,
        ):
            return int(raw)
        if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            return float(raw)
        if t == FieldDescriptor.TYPE_BOOL:
            v = raw.strip().lower()
            if v in ("1", "true", "yes", "on"):
                return True
            if v in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if t == FieldDescriptor.TYPE_STRING:
            return raw
    except ValueError:
        raise UsageError(f"--param {field.name}={raw}: not a valid {_type_name(field)}") from None
    if t == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name == "explain.v1.Image":
        path = Path(raw)
        if not path.is_file():
            raise UsageError(f"--param {field.name}={raw}: no such image file")
        return pb.Image(encoded=path.read_bytes())
    raise UsageError(f"--param {field.name}: fields of this type cannot be set from the command line")


def _type_name(field: FieldDescriptor) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return "image file" if field.message_type.full_name == "explain.v1.Image" else field.message_type.name
    return {
        FieldDescriptor.TYPE_FLOAT: "float",
        FieldDescriptor.TYPE_DOUBLE: "float",
        FieldDescriptor.TYPE_BOOL: "bool",
        FieldDescriptor.TYPE_STRING: "string",
    }.get(field.type, "int")


def build_request(args: argparse.Namespace) -> pb.JobRequest:
    image = Path(args.image)
    if not image.is_file():
        raise UsageError(f"image {args.image!r} is not a file")
    req = pb.JobRequest(
        method=args.method,
        model=args.model,
        image=pb.Image(encoded=image.read_bytes()),
        priority=args.priority,
        deadline_seconds=args.deadline,
        idempotency_key=args.idempotency_key,
    )
    req.output_format, req.dicom_overlay = cli_dicom.output_format(args, jobs=True), args.overlay
    dicom = cli_dicom.dicom_options(args)
    if dicom is not None:
        req.image.dicom.CopyFrom(dicom)
    which = args.params or PARAMS_FIELD.get(args.method)
    if args.param and which is None:
        raise UsageError(f"method {args.method!r}: say which parameters --param sets with --params relax|ablation")
    if which is None:
        return req
    msg = getattr(req, which)
    msg.SetInParent()  # an empty RelaxParams / AblationParams still selects the oneof: defaults apply
    fields = msg.DESCRIPTOR.fields_by_name
    for item in args.param:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--param {item!r}: write it as key=value")
        field = fields.get(key)
        if field is None:
            names = ", ".join(f"{n} ({_type_name(f)})" for n, f in fields.items())
            raise UsageError(f"--param {key}: {msg.DESCRIPTOR.name} has no such field; fields: {names}")
        value = _convert(field, raw)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(msg, key).CopyFrom(value)
        else:
            setattr(msg, key, value)
    return req


def job_summary(job: pb.Job) -> dict[str, Any]:
    """The job as a dict for printing: the (large) result is summarised, not dumped."""
    d = json_format.MessageToDict(job, preserving_proto_field_name=True)
    if "result" in d:
        d["result"] = {"kind": job.result.WhichOneof("result") or "", "timings": dict(job.result.timings)}
    d["state"] = pb.JobState.Name(job.state)
    return d


def write_result(job: pb.Job, out: Path, source: Path | None = None) -> list[Path]:
    """Write result tensors as <field>.npy, PNG renderings as <field>.png, the rest as result.json."""
    import numpy as np

    from xaiserve.service.tensors import from_tensor

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    which = job.result.WhichOneof("result")
    meta: dict[str, Any] = {"job": job_summary(job), "timings": dict(job.result.timings)}
    if job.result.parameters_json:
        meta["parameters"] = json.loads(job.result.parameters_json)
    if which:
        res = getattr(job.result, which)
        scalars: dict[str, Any] = {}
        for field, value in res.ListFields():
            if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name == "explain.v1.Tensor":
                p = out / f"{field.name}.npy"
                np.save(p, from_tensor(value, what=field.name))
                written.append(p)
            elif field.type == FieldDescriptor.TYPE_BYTES:
                if field.name.endswith("_png"):
                    name = f"{field.name[:-4]}.png"  # strip_png -> strip.png
                elif field.name == "png":
                    name = f"{which}.png"  # RelaxResult.png -> relax.png
                else:
                    name = f"{field.name}.bin"
                p = out / name
                p.write_bytes(value)
                written.append(p)
            elif field.is_repeated:  # repeated messages (SiftResult.keypoints) as JSON objects
                scalars[field.name] = (
                    [json_format.MessageToDict(v) for v in value]
                    if field.type == FieldDescriptor.TYPE_MESSAGE
                    else list(value)
                )
            else:
                scalars[field.name] = value
        meta[which] = scalars
    if job.result.dicom:  # <method>.seg.dcm / .pmap.dcm, patient data restored from the local source
        written += cli_dicom.write_job_dicom(job.result, out, source)
        if source is None:
            print(
                "note: the DICOM result has empty patient and study attributes (the server stores none); "
                "pass --source scan.dcm to copy them from the submitted file",
                file=sys.stderr,
            )
    p = out / "result.json"
    p.write_text(json.dumps(meta, indent=2, default=str))
    written.append(p)
    return written


def watch(client, job_id: str, out: str | None, source: Path | None = None) -> int:
    from tqdm import tqdm

    final: pb.Job | None = None
    bar = tqdm(
        total=100,
        desc=job_id[:12],
        unit="%",
        file=sys.stderr,
        dynamic_ncols=True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} {postfix}",
    )
    try:
        for ev in client.stub.WatchJob(pb.JobRef(id=job_id), metadata=client.metadata):
            bar.update(max(0, int(round(ev.progress * 100)) - bar.n))
            post: dict[str, Any] = {"state": pb.JobEventType.Name(ev.type).removeprefix("EVENT_").lower()}
            if ev.type == pb.EVENT_QUEUED and ev.job.queue_position:
                post["ahead"] = ev.job.queue_position
            if ev.HasField("score"):
                post["score"] = f"{ev.score:.4g}"
            for k, v in list(ev.metrics.items())[:3]:
                post[k] = f"{v:.4g}"
            bar.set_postfix(post, refresh=True)
            if ev.message and ev.type != pb.EVENT_PROGRESS and ev.message != "current state":
                bar.write(f"{pb.JobEventType.Name(ev.type)}: {ev.message}", file=sys.stderr)
            if ev.HasField("job") and ev.job.state in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED, pb.EXPIRED):
                final = ev.job
    finally:
        bar.close()
    if final is None:
        print(
            f"error: the watch of job {job_id} ended before the job did; run `xaiserve jobs watch {job_id}` again",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(job_summary(final)))
    if final.state == pb.SUCCEEDED and out:
        for p in write_result(final, Path(out), source):
            print(f"wrote {p}", file=sys.stderr)
    return 0 if final.state == pb.SUCCEEDED else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from xaiserve.service.client import ExplainerClient

    try:
        with ExplainerClient(
            args.address, token=args.token, ca_file=args.ca, cert_file=args.cert, key_file=args.key
        ) as client:
            md, timeout = client.metadata, args.timeout
            if args.cmd == "submit":
                job = client.stub.SubmitJob(build_request(args), timeout=timeout, metadata=md)
                print(job.id, flush=True)
                print(
                    f"job {job.id}: {pb.JobState.Name(job.state)}"
                    + (f", {job.queue_position} ahead" if job.state == pb.QUEUED else ""),
                    file=sys.stderr,
                )
                return watch(client, job.id, args.out, Path(args.image)) if args.watch else 0
            if args.cmd == "watch":
                return watch(client, args.id, args.out, Path(args.source) if args.source else None)
            if args.cmd == "get":
                job = client.stub.GetJob(
                    pb.JobRef(id=args.id, include_result=bool(args.out)), timeout=timeout, metadata=md
                )
                print(json.dumps(job_summary(job)))
                if args.out:
                    if job.state != pb.SUCCEEDED:
                        print(f"job {job.id} is {pb.JobState.Name(job.state)}: no result to write", file=sys.stderr)
                        return 1
                    for p in write_result(job, Path(args.out), Path(args.source) if args.source else None):
                        print(f"wrote {p}", file=sys.stderr)
                return 0
            if args.cmd == "cancel":
                job = client.stub.CancelJob(pb.JobRef(id=args.id), timeout=timeout, metadata=md)
                print(json.dumps(job_summary(job)))
                return 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
