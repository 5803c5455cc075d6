"""`xaiserve` command line: serve, worker, explain, denoise, jobs, models, train, export, evaluate, bench."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path

TRAIN_TARGETS = {
    "encoder": "xaiserve.training.cli_nem",
    "classifier": "xaiserve.training.cli_nem",
    "nem-u": "xaiserve.training.cli_nem",
    "nemt": "xaiserve.training.cli_nem",
    "zoo": "xaiserve.training.cli_nem",
    "denoiser": "xaiserve.training.cli_denoise",
}
EXPORT_TARGETS = {**TRAIN_TARGETS, "torchserve": "xaiserve.service.torchserve"}
EVALUATE_TARGETS = {
    "explanations": "xaiserve.training.cli_eval",
    "nem": "xaiserve.training.cli_eval",
    "denoiser": "xaiserve.training.cli_denoise",
    "invariance": "xaiserve.training.evaluate_invariance",
}


def _serve_parser(sub) -> None:
    from xaiserve.service.config import ServerConfig, describe, flag_name

    p = sub.add_parser(
        "serve",
        help="run the gRPC server on the model store",
        description="Settings: defaults < --config file < XAISERVE_* environment < flags.",
    )
    p.add_argument("--config", help="YAML or JSON file of settings")
    p.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
    # Every flag is taken as text and read by config.parse_setting, the parser of the file and the
    # environment too, so that a value is accepted or refused the same way whatever its source.
    hints = typing.get_type_hints(ServerConfig)
    for name, default, comment in describe():
        if hints[name] is bool:
            # a bare flag (`--allow-volatile-queue`) means true
            p.add_argument(
                flag_name(name),
                dest=name,
                default=None,
                metavar="BOOL",
                nargs="?",
                const="true",
                help=f"{comment} (true/false, yes/no, on/off, 1/0; default {str(default).lower()})",
            )
        else:
            p.add_argument(flag_name(name), dest=name, default=None, help=f"{comment} (default {default!r})")


def _serve(args) -> int:
    from xaiserve.service.config import ServerConfig, load_config

    flags = {f.name: getattr(args, f.name) for f in fields(ServerConfig)}
    try:
        cfg = load_config(args.config, flags=flags)
    except ValueError as e:
        print(f"xaiserve serve: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps({f.name: getattr(cfg, f.name) for f in fields(cfg)}, indent=2))
        return 0
    from xaiserve.service.logs import setup_logging

    setup_logging(cfg.log_level, cfg.log_json)
    if cfg.process_count > 1:  # a supervisor and N server processes on the same ports (service/supervisor.py)
        from xaiserve.service.supervisor import run_supervisor

        # (before the server's modules: their metrics would open files in PROMETHEUS_MULTIPROC_DIR,
        # which the supervisor creates and empties first)
        return run_supervisor(cfg)
    from xaiserve.devices import DeviceUnavailable
    from xaiserve.service.jobs.factory import VolatileQueue
    from xaiserve.service.registry import ManifestError
    from xaiserve.service.server import serve_forever

    try:
        asyncio.run(serve_forever(cfg))
    except (VolatileQueue, ManifestError, DeviceUnavailable) as e:
        print(f"xaiserve serve: {e}", file=sys.stderr)
        return 2
    return 0


def _client(args):
    from xaiserve.service.client import ExplainerClient

    return ExplainerClient(args.address, token=args.token, ca_file=args.ca, cert_file=args.cert, key_file=args.key)


def _add_client_flags(p) -> None:
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--token", default=None, help="bearer token")
    p.add_argument("--ca", default=None, help="CA certificate (TLS)")
    p.add_argument("--cert", default=None, help="client certificate (mutual TLS)")
    p.add_argument("--key", default=None, help="client key (mutual TLS)")
    p.add_argument("--timeout", type=float, default=30.0)


def _explain(args) -> int:
    import numpy as np

    from xaiserve.service import cli_dicom
    from xaiserve.service.images import encode_png

    if args.all_frames:  # a multi-frame DICOM, every frame over one StreamExplain call
        with _client(args) as c:
            print(json.dumps(cli_dicom.explain_all_frames(c, args), indent=2))
        return 0
    fmt = cli_dicom.output_format(args)  # DICOM image + .dcm out: a DICOM Segmentation (or --format)
    with _client(args) as c:
        r = c.explain(
            args.image,
            args.model,
            method=args.method,
            return_output=args.output,
            fidelity=args.fidelity,
            return_png=not fmt,
            target_label=args.target_label,
            timeout=args.timeout,
            output_format=fmt,
            dicom_overlay=args.overlay,
            dicom=cli_dicom.dicom_options(args),
        )
    if fmt:
        summary = {
            "model": r.model,
            "method": args.method or "mask model",
            **cli_dicom.write_explain(r, args, fmt),
            "shape": list(r.mask.shape),
            "mask_mean": round(float(r.mask.mean()), 4),
            "target_label": r.target_label,
            "server_ms": round(r.timing.total_ms, 3),
        }
        print(json.dumps(summary, indent=2))
        return 0
    out = Path(args.out or Path(args.image).with_suffix(".mask.png").name)
    out.write_bytes(encode_png(r.mask))
    ov = out.with_name(out.stem.removesuffix(".mask") + ".overlay.png")
    ov.write_bytes(r.overlay_png)
    summary = {
        "model": r.model,
        "method": args.method or "mask model",
        "mask": str(out),
        "overlay": str(ov),
        "shape": list(r.mask.shape),
        "mask_mean": round(float(r.mask.mean()), 4),
        "mask_max_at": [int(v) for v in np.unravel_index(int(r.mask.argmax()), r.mask.shape)],
        "target_label": r.target_label,
        "fidelity": r.fidelity,
        "server_ms": round(r.timing.total_ms, 3),
        "inference_ms": round(r.timing.inference_ms, 3),
    }
    if r.output is not None:
        summary["output"] = [round(float(v), 5) for v in r.output.ravel()[:16]]
    print(json.dumps(summary, indent=2))
    return 0


def _models(args) -> int:
    with _client(args) as c:
        ms = c.models(args.kind)
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps([{k: v for k, v in MessageToDict(m).items() if k != "card"} for m in ms], indent=2))
        return 0
    print(f"{'model':28} {'kind':11} {'input':12} {'explains':20} methods")
    for m in ms:
        # the manifest's default_method (what Explain runs when a request names none) is marked
        methods = ", ".join(f"{x} (default)" if x == m.default_method else x for x in m.methods)
        served = methods if m.available else f"UNAVAILABLE: {m.unavailable_reason}"
        print(
            f"{m.name + ':' + m.version:28} {m.kind:11} {f'{m.input.channels}x{m.input.height}x{m.input.width}':12} "
            f"{m.explains or '-':20} {served}"
        )
    return 0


def _denoise(args) -> int:
    from xaiserve.handlers.denoise.client_io import read_stack, write_stack

    stack = read_stack(args.stack)
    with _client(args) as c:
        den = c.denoise(stack, model=args.model, timeout=args.timeout)
    out = Path(args.out or Path(args.stack).with_suffix(".denoised.mrcs").name)
    write_stack(out, den)
    print(
        json.dumps({"model": args.model, "particles": int(den.shape[0]), "shape": list(den.shape[1:]), "out": str(out)})
    )
    return 0


def _dispatch(table: dict[str, str], fn: str, argv: list[str], what: str) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in table:
        print(f"usage: xaiserve {what} TARGET [options]; targets: {', '.join(sorted(table))}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    mod = importlib.import_module(table[argv[0]])
    return int(getattr(mod, fn)(argv[0], argv[1:]) or 0)


def _bench(argv: list[str]) -> int:
    # The benchmarks are scripts of the source checkout (bench/), not part of the installed package.
    from xaiserve.paths import find_checkout

    root = find_checkout()
    if root is None or not (root / "bench").is_dir():
        print(
            "xaiserve bench: the benchmarks are the scripts in bench/ of a source checkout, which an installed "
            "package does not include; clone the repository, `pip install -e .` in it, and run `xaiserve bench` "
            "from inside it",
            file=sys.stderr,
        )
        return 2
    names = sorted(p.stem.removeprefix("bench_") for p in (root / "bench").glob("bench_*.py"))
    if not argv or argv[0] not in names:
        print(
            f"usage: xaiserve bench NAME [options]; benchmarks ({root / 'bench'}): {', '.join(names)}", file=sys.stderr
        )
        return 2
    return subprocess.call([sys.executable, str(root / "bench" / f"bench_{argv[0]}.py"), *argv[1:]])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # subcommands with their own parsers
    passthrough = {
        "train": lambda a: _dispatch(TRAIN_TARGETS, "train_main", a, "train"),
        "export": lambda a: _dispatch(EXPORT_TARGETS, "export_main", a, "export"),
        "evaluate": lambda a: _dispatch(EVALUATE_TARGETS, "evaluate_main", a, "evaluate"),
        "worker": lambda a: int(importlib.import_module("xaiserve.service.worker").main(a) or 0),
        "jobs": lambda a: int(importlib.import_module("xaiserve.service.cli_jobs").main(a) or 0),
        "bench": _bench,
    }
    if argv and argv[0] in passthrough:
        return passthrough[argv[0]](argv[1:])
    if argv and argv[0] == "models":  # add|list|show|remove|schema work on a store; otherwise ask a server
        from xaiserve.service import cli_models

        if cli_models.is_store_command(argv[1:]):
            return cli_models.main(argv[1:])

    parser = argparse.ArgumentParser(prog="xaiserve", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    _serve_parser(sub)
    p = sub.add_parser("explain", help="explain one image through a running server")
    p.add_argument("image")
    p.add_argument("--model", required=True)
    p.add_argument("--out", help="mask PNG path (the overlay goes beside it); a .dcm path for a DICOM result")
    p.add_argument("--method", default="", help="'' (masking network) or a gradient baseline")
    p.add_argument("--target-label", type=int, default=None)
    p.add_argument("--fidelity", action="store_true")
    p.add_argument("--output", action="store_true", help="print the model output")
    importlib.import_module("xaiserve.service.cli_dicom").add_flags(p)
    _add_client_flags(p)
    p = sub.add_parser(
        "models",
        help="list the models a running server serves (`xaiserve models add|list|show|remove "
        "--store DIR` manage a store: see `xaiserve models add --help`)",
    )
    p.add_argument("action", nargs="?", choices=["list"], help="list (the default) with --address: ask that server")
    p.add_argument("--kind", default="")
    p.add_argument("--json", action="store_true")
    _add_client_flags(p)
    p = sub.add_parser("denoise", help="denoise an MRC particle stack through a running server")
    p.add_argument("stack")
    p.add_argument("--model", default="cryoem-spiral")
    p.add_argument("--out")
    _add_client_flags(p)
    for name in passthrough:
        sub.add_parser(name, help=f"see `xaiserve {name} --help`")
    args = parser.parse_args(argv)
    import grpc

    try:
        return {"serve": _serve, "explain": _explain, "models": _models, "denoise": _denoise}[args.cmd](args)
    except grpc.RpcError as e:
        print(f"xaiserve {args.cmd}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError) as e:
        print(f"xaiserve {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
