"""`xaiserve models add|list|show|remove|schema`: manage a model store without a server.

    xaiserve models add NAME FILE [--torch FILE] --kind classifier|encoder [--input 3x224x224]
                        [--mean M M M | --mean imagenet] [--std S S S] [--labels labels.txt]
                        [--resize stretch|letterbox|center-crop] [--io image=NAME,output=NAME]
                        [--version V] [--description TEXT] [--store DIR]
    xaiserve models list   [--store DIR] [--json]
    xaiserve models show   NAME[:VERSION] [--store DIR]
    xaiserve models remove NAME[:VERSION] [--store DIR] [--force]
    xaiserve models schema                      the JSON Schema of a manifest entry

FILE is an ONNX graph (.onnx), a TorchScript file (torch.jit.save) or a torch.export ExportedProgram
(.pt2, torch.export.save). `add` inspects it (input shape, output size, tensor names), loads it the
way the server will, runs it on a test image, checks that its ONNX and torch forms agree, measures its
latency, copies the files to DIR/NAME/VERSION/, writes a model card and a validated manifest entry.
A model given only as TorchScript / ExportedProgram is exported to ONNX (the fast path runs ONNX
Runtime); one given only as ONNX is converted to torch with onnx2torch (checked against ONNX Runtime,
saved as a .pt2 when torch.export can capture it, else converted again at load), so it gets the
gradient methods too; when it does not convert (or --no-convert) it serves the methods that need no
gradients (RELAX, fidelity), and the card says which file to add for the others. A running server picks the change up within a
second (service/reload.py). Exit codes: 0 done, 2 bad usage or a model that does not load.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xaiserve.errors import XaiError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SUBCOMMANDS = ("add", "list", "show", "remove", "schema")
TORCH_SUFFIXES = {
    ".pt2": "exported_program",
    ".ts": "torchscript",
    ".jit": "torchscript",
    ".pt": "torchscript",
    ".pth": "torchscript",
    ".torchscript": "torchscript",
}
STORED_NAMES = {"onnx": "model.onnx", "torchscript": "model.ts", "exported_program": "model.pt2"}
PARITY_TOL = 1e-3  # max |onnx - torch| relative to 1 + max |output| on the test inputs


class UsageError(Exception):
    """Bad arguments or a model that does not load: printed, exit code 2."""


# -- files and inspection ---------------------------------------------------------------------------
def file_form(path: Path) -> str:
    """ "onnx", "torchscript" or "exported_program" from the file's bytes (extension as a hint)."""
    if not path.is_file():
        raise UsageError(f"{path} does not exist or is not a file")
    head = path.read_bytes()[:4]
    if path.suffix.lower() == ".onnx" or not head.startswith(b"PK"):
        return "onnx"  # protobuf bytes; a torch file is a zip archive
    if path.suffix.lower() in TORCH_SUFFIXES:
        return TORCH_SUFFIXES[path.suffix.lower()]
    import zipfile

    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return (
        "exported_program"
        if any("serialized_exported_program" in n or n.endswith("models/model.json") for n in names)
        else "torchscript"
    )


def onnx_signature(path: Path) -> tuple[list[tuple[str, str, list]], list[tuple[str, list]]]:
    """(inputs (name, type, shape), outputs (name, shape)) of an ONNX graph, via ONNX Runtime."""
    import onnxruntime as ort

    try:
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own types on a bad file
        raise UsageError(
            f"{path.name} is not an ONNX graph ONNX Runtime can load ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None
    return (
        [(i.name, i.type, list(i.shape)) for i in s.get_inputs()],
        [(o.name, list(o.shape)) for o in s.get_outputs()],
    )


def exported_input_shape(path: Path) -> list[int | None] | None:
    """C, H, W of an ExportedProgram's image input where static (None for symbolic dims)."""
    import torch

    try:
        ep = torch.export.load(str(path))
    except Exception:  # noqa: BLE001 - reported later by the loader with the reason
        return None
    for n in ep.graph.nodes:
        if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs:
            v = n.meta.get("val")
            if v is not None and v.ndim == 4:
                return [int(d) if isinstance(d, int) else None for d in v.shape]
    return None


def parse_input(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--input {text!r} must be CxHxW, e.g. 3x224x224") from None
    if c not in (1, 3) or not (1 <= h <= 4096 and 1 <= w <= 4096):
        raise UsageError(f"--input {text!r}: channels must be 1 or 3 and sides 1..4096")
    return c, h, w


def test_image(height: int, width: int) -> np.ndarray:
    """A deterministic RGB test picture (gradients, a disc, stripes), 3/2 the model's size and not
    square, so the resize mode is exercised: HWC float32 in [0, 1]."""
    h, w = max(8, height * 3 // 2), max(8, width * 3 // 2 + width // 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = xx / w
    g = yy / h
    b = 0.5 + 0.5 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
    disc = ((yy - h * 0.45) ** 2 + (xx - w * 0.55) ** 2) < (min(h, w) * 0.22) ** 2
    img = np.stack([r, g, b], axis=2)
    img[disc] = (0.9, 0.2, 0.1)
    return np.clip(img, 0.0, 1.0)


def _median_ms(fn, reps: int = 20) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1e3, 3)


def next_version(store: Path, name: str) -> str:
    from xaiserve.service.registry import _version_key

    path = store / "manifest.json"
    if not path.exists():
        return "1"
    versions = [str(m.get("version")) for m in json.loads(path.read_text()).get("models", []) if m.get("name") == name]
    nums = [int(v) for v in versions if v.isdigit()]
    if versions and not nums:
        return str(max(versions, key=_version_key)) + ".1"
    return str(max(nums) + 1) if nums else "1"


# -- add ---------------------------------------------------------------------------------------------
def add_model(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `models add` does; returns the manifest entry written."""
    import re

    import torch

    from xaiserve.handlers.nets.forms import export_onnx, first_tensor, load_torch_form
    from xaiserve.methods import supported_methods
    from xaiserve.service.images import InputSpec, to_model_input
    from xaiserve.service.manifest_schema import NAME_PATTERN
    from xaiserve.service.modelstore import add_entry
    from xaiserve.service.registry import ModelEntry, OnnxModel, _check_outputs, io_map

    store = Path(args.store)
    name = args.name
    if not re.match(NAME_PATTERN, name):
        raise UsageError(f"model name {name!r} must be letters, digits, '.', '_' or '-' (at most 64, no ':' or '/')")
    src = Path(args.file)
    forms = {file_form(src): src}
    if args.torch:
        tpath = Path(args.torch)
        tform = file_form(tpath)
        if tform == "onnx":
            raise UsageError(f"--torch {tpath} is an ONNX graph; give a TorchScript or torch.export (.pt2) file")
        if tform in forms:
            raise UsageError(f"FILE and --torch are both {tform} files; give one ONNX graph and one torch file")
        forms[tform] = tpath
    torch_key = next((k for k in ("exported_program", "torchscript") if k in forms), None)

    # input size: the flag, else the ONNX graph's static dims, else the ExportedProgram's
    shape: list[int | None] | None = None
    if "onnx" in forms:
        ins, _ = onnx_signature(forms["onnx"])
        images = [sh for _, t, sh in ins if "float" in t and len(sh) == 4]
        if len(images) == 1:
            shape = [d if isinstance(d, int) else None for d in images[0][1:]]
    elif torch_key == "exported_program":
        got = exported_input_shape(forms["exported_program"])
        shape = got[1:] if got else None
    if args.input:
        c, h, w = parse_input(args.input)
        if shape and any(s is not None and s != v for s, v in zip(shape, (c, h, w))):
            raise UsageError(f"--input {args.input} does not match the model's input {shape} (C, H, W)")
    elif shape and all(isinstance(v, int) for v in shape):
        c, h, w = shape  # type: ignore[misc]
    else:
        raise UsageError(f"cannot read the input size from {src.name} (dims {shape or 'unknown'}); give --input CxHxW")
    if c not in (1, 3):
        raise UsageError(f"the model takes {c} channels; xaiserve serves 1 (gray) or 3 (RGB) channel models")

    mean = _floats(args.mean, c, "--mean", IMAGENET_MEAN) if args.mean else [0.0] * c
    std = _floats(args.std, c, "--std", IMAGENET_STD) if args.std else [1.0] * c
    if any(v <= 0 for v in std):
        raise UsageError("--std values must be positive")
    spec = InputSpec(h, w, c, tuple(mean), tuple(std), args.resize)

    labels: list[str] = []
    if args.labels:
        lp = Path(args.labels)
        if not lp.is_file():
            raise UsageError(f"--labels {lp} does not exist")
        try:
            labels = [ln.strip() for ln in lp.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError:
            raise UsageError(f"--labels {lp} is not a UTF-8 text file (one label per line, in output order)") from None
    if labels and args.kind != "classifier":
        raise UsageError("--labels applies to classifiers")

    version = args.version or next_version(store, name)
    rel = Path(name) / version
    out = store / rel
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UsageError(f"{out} already holds files; choose another --version, or --force to replace it")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    notes: list[str] = []
    try:
        # the torch form, loaded as the server will (TorchScript is converted to a graph here)
        module = None
        if torch_key:
            dst = out / STORED_NAMES[torch_key]
            shutil.copyfile(forms[torch_key], dst)
            files[torch_key] = str(rel / dst.name)
            module = load_torch_form(dst, torch_key, channels=c, height=h, width=w)
            if getattr(module, "opaque", False):
                notes.append(
                    f"the TorchScript could not be converted to a graph ({module.reason}): gradcam and "
                    "guided_backprop are refused; add a torch.export .pt2 file for them"
                )
        onnx_dst = out / STORED_NAMES["onnx"]
        io: dict[str, str] = dict(_parse_io(args.io))
        if "onnx" in forms:
            shutil.copyfile(forms["onnx"], onnx_dst)
        else:
            from xaiserve.handlers.nets.forms import example_input

            export_onnx(module, onnx_dst, example_input(c, h, w))
            notes.append(f"ONNX graph exported from the {torch_key.replace('_', ' ')} for the fast path")
            io = {}
        files["onnx"] = str(rel / onnx_dst.name)

        # the ONNX graph as the server loads it: names mapped, warm-up, output shapes
        ins, outs = onnx_signature(onnx_dst)
        try:
            ins_map, outs_map = io_map(args.kind, ins, [n for n, _ in outs], io, what=onnx_dst.name)
        except XaiError as e:
            raise UsageError(f"{e}") from None
        io = {k: v for k, v in {**ins_map, **outs_map}.items() if k != v}
        torch_form: dict[str, Any] | None = None
        if module is None and not args.no_convert:
            module, torch_form = _convert(onnx_dst, out, rel, files, notes, c, h, w, io)
            if torch_form and torch_form["stored"] == "exported_program":
                torch_key = "exported_program"
        session = OnnxModel(onnx_dst, intra_op_threads=1, prefer_cuda=False, kind=args.kind, io=io)
        x = to_model_input(test_image(h, w), spec)[None]
        y = session.run({"image": x})["output"]
        dim = int(y.shape[1])
        if args.kind == "classifier" and labels and len(labels) != dim:
            raise UsageError(f"{len(labels)} labels in {args.labels} for {dim} classifier outputs")
        probe = {
            "name": name,
            "version": version,
            "kind": args.kind,
            "files": files,
            "input": {"height": h, "width": w, "channels": c, "mean": mean, "std": std},
            "labels": labels,
            "output_dim": dim,
        }
        try:
            _check_outputs(ModelEntry.from_dict(probe), session.run({"image": np.concatenate([x, x])}))
        except XaiError as e:
            raise UsageError(f"{onnx_dst.name}: {e}") from None

        metrics: dict[str, Any] = {"onnx_latency_ms_b1": _median_ms(lambda: session.run({"image": x}))}
        if module is not None:
            xt = torch.from_numpy(x)
            rng = torch.Generator().manual_seed(0)
            batch = torch.cat([xt, torch.randn((2, c, h, w), generator=rng)])
            with torch.no_grad():
                ref = first_tensor(module(batch)).numpy()
                metrics["torch_latency_ms_b1"] = _median_ms(lambda: module(xt))
            got = session.run({"image": batch.numpy()})["output"]
            diff = float(np.abs(got.astype(np.float64) - ref).max())
            metrics["onnx_torch_max_abs_diff"] = float(f"{diff:.3g}")
            if not diff <= PARITY_TOL * (1.0 + float(np.abs(ref).max())):
                raise UsageError(
                    f"the ONNX graph and the {(torch_key or 'converted torch form').replace('_', ' ')} disagree (max |difference| {diff:.3g} on the test "
                    f"inputs); they must be the same model, or gradient explanations would explain another network"
                )
        test = {"output_dim": dim, "output_norm": round(float(np.linalg.norm(y[0])), 4)}
        if args.kind == "classifier":
            k = int(y[0].argmax())
            test["predicted"] = labels[k] if labels else k

        forms_have = {"onnx"} | ({"torch"} if module is not None else set())
        methods = supported_methods(args.kind, forms_have)
        entry: dict[str, Any] = {
            "name": name,
            "version": version,
            "kind": args.kind,
            "description": args.description or f"user {args.kind} added from {src.name}",
            "files": {**files, "card": str(rel / "card.md")},
            "input": {"height": h, "width": w, "channels": c, "mean": mean, "std": std, "resize": args.resize},
            "labels": labels,
            "output_dim": dim,
            "metrics": metrics,
            "added": {
                "from": [str(p.name) for p in forms.values()],
                "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "test_image": test,
            },
        }
        if io:
            entry["io"] = io
        if torch_form:
            entry["torch_form"] = torch_form
        card_form = torch_key or ("onnx2torch" if torch_form else None)
        (out / "card.md").write_text(render_card(entry, methods, notes, ins, outs, card_form))
        add_entry(store, entry)
    except BaseException:
        if created and not args.keep_on_error:
            shutil.rmtree(out, ignore_errors=True)
            if out.parent.is_dir() and not any(out.parent.iterdir()):
                out.parent.rmdir()
        raise
    entry["_methods"] = methods
    entry["_notes"] = notes
    return entry


def _convert(onnx_dst: Path, out: Path, rel: Path, files: dict[str, str], notes: list[str], c: int, h: int, w: int, io):
    """An ONNX-only model's torch form (handlers/nets/onnx_torch.py): converted with onnx2torch and
    checked against ONNX Runtime, then saved as model.pt2 (a torch.export program: the server loads it
    like a user's own .pt2) or, when it cannot be exported, converted again at load. Returns
    (the module as the server will load it, the manifest's `torch_form`), or (None, None) with a note
    when there is no converter or the graph does not convert: the model then serves the methods that
    need no gradients."""
    from xaiserve.handlers.nets.forms import load_torch_form
    from xaiserve.handlers.nets.onnx_torch import (
        CONVERTER,
        PARITY_RTOL,
        convert_onnx,
        converter_version,
        export_program,
    )

    try:
        module = convert_onnx(onnx_dst, channels=c, height=h, width=w, io=io)
    except XaiError as e:
        notes.append(f"no torch form, so no gradient methods or masking-network training: {e}")
        return None, None
    form = {
        "from": "onnx",
        "converter": f"{CONVERTER} {converter_version()}".strip(),
        "max_abs_diff": float(f"{module.parity_max_abs_diff:.3g}"),
        "rtol": PARITY_RTOL,
    }
    pt2 = out / STORED_NAMES["exported_program"]
    why = export_program(module, pt2, channels=c, height=h, width=w)
    if why is None:
        files["exported_program"] = str(rel / pt2.name)
        form["stored"] = "exported_program"
        notes.append(
            f"torch form converted from the ONNX graph by {form['converter']} (max |difference| to ONNX Runtime "
            f"{form['max_abs_diff']}) and saved as {pt2.name}"
        )
        return load_torch_form(pt2, "exported_program", channels=c, height=h, width=w), form
    form["stored"] = "converted at load"
    notes.append(
        f"torch form converted from the ONNX graph by {form['converter']} (max |difference| to ONNX Runtime "
        f"{form['max_abs_diff']}); it could not be saved as a .pt2 ({why}), so the server converts the graph "
        f"again when it loads the model ({CONVERTER} must be installed there)"
    )
    return module, form


def _floats(values: Sequence[str], n: int, flag: str, imagenet: tuple[float, ...]) -> list[float]:
    if len(values) == 1 and values[0].lower() == "imagenet":
        if n != 3:
            raise UsageError(f"{flag} imagenet is for 3-channel models")
        return list(imagenet)
    try:
        out = [float(v) for v in values]
    except ValueError:
        raise UsageError(f"{flag} takes {n} numbers (or 'imagenet'), got {' '.join(values)!r}") from None
    if len(out) == 1:
        out = out * n
    if len(out) != n:
        raise UsageError(f"{flag} takes {n} numbers for a {n}-channel model, got {len(out)}")
    return out


def _parse_io(text: str | None) -> list[tuple[str, str]]:
    if not text:
        return []
    pairs = []
    for part in text.split(","):
        k, sep, v = part.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise UsageError(f"--io {text!r} must be KIND_NAME=GRAPH_NAME pairs, e.g. image=input,output=logits")
        pairs.append((k.strip(), v.strip()))
    return pairs


def render_card(entry: dict[str, Any], methods: list[str], notes: list[str], ins, outs, torch_key: str | None) -> str:
    inp = entry["input"]
    lines = [
        f"# {entry['name']}:{entry['version']} ({entry['kind']})",
        "",
        entry["description"],
        "",
        "Added with `xaiserve models add`: a user model, not trained by xaiserve.",
        "",
        "## Input",
        "",
        f"- {inp['channels']} x {inp['height']} x {inp['width']}, normalised (x - mean) / std with mean {inp['mean']}, std {inp['std']}"
        + (
            ""
            if inp["mean"] != [0.0] * inp["channels"] or inp["std"] != [1.0] * inp["channels"]
            else " (no --mean/--std given: the model receives pixel values in [0, 1])"
        ),
        f'- images of another size or aspect ratio: `{inp["resize"]}` (docs/MODEL_STORE.md, "Preprocessing"); '
        "explanations come back at the image's own size",
        "",
        "## Graph",
        "",
        f"- ONNX inputs: {', '.join(f'`{n}` {t} {s}' for n, t, s in ins)}",
        f"- ONNX outputs: {', '.join(f'`{n}` {s}' for n, s in outs)}",
    ]
    if entry.get("io"):
        lines.append(f"- tensor names mapped by the manifest's `io`: {entry['io']}")
    lines.append(
        f"- output: {entry['output_dim']} values"
        + (f" ({len(entry['labels'])} labels: {', '.join(entry['labels'])})" if entry.get("labels") else "")
    )
    lines += ["", "## Forms and methods", ""]
    tf = entry.get("torch_form")
    if tf:
        label = f"converted from the ONNX graph by {tf['converter']}, max |difference| to ONNX Runtime " + (
            f"{tf['max_abs_diff']} (allowed {tf['rtol']} x (1 + max |output|)); "
            + ("saved as a torch.export .pt2" if tf["stored"] == "exported_program" else "converted again at load")
        )
    else:
        label = torch_key.replace("_", " ") if torch_key else "none"
    lines.append(f"- torch form: {label}")
    lines.append(f"- methods served: {', '.join(methods)}")
    if not torch_key:
        lines.append(
            "- gradient methods (saliency family, gradcam) and ablation paths need a torch form: "
            f"`xaiserve models add {entry['name']} model.onnx --torch model.pt2 --kind {entry['kind']}` "
            "(a torch.export .pt2 or TorchScript file of the same network)"
        )
    lines += [f"- note: {n}" for n in notes]
    m = entry["metrics"]
    lines += [
        "",
        "## Checks at add time",
        "",
        f"- test image: {entry['added']['test_image']}",
        f"- ONNX Runtime latency, batch 1, one thread: {m['onnx_latency_ms_b1']} ms",
    ]
    if "torch_latency_ms_b1" in m:
        lines += [
            f"- torch forward latency, batch 1: {m['torch_latency_ms_b1']} ms",
            f"- ONNX vs torch form, max |difference| on the test inputs: {m['onnx_torch_max_abs_diff']}",
        ]
    train = "nemt --classifier" if entry["kind"] == "classifier" else "nem-u --encoder"
    lines += [
        "",
        "## Masking network",
        "",
        f"Train one on a folder of its images: `xaiserve train {train} {entry['name']}:{entry['version']} --images DIR`"
        + (" (class subfolders or --labels labels.csv give the labels)" if entry["kind"] == "classifier" else "")
        + (
            ""
            if torch_key
            else "; the decoder reads the model's inner feature maps, which needs the torch form "
            "(add it first, as above)"
        ),
        "",
        f"Files: {', '.join(f'`{v}`' for v in entry['files'].values())}",
        "",
    ]
    return "\n".join(lines)


# -- list / show / remove ---------------------------------------------------------------------------
def list_store(store: Path) -> list[dict[str, Any]]:
    from xaiserve.service.registry import scan_manifest

    good, bad = scan_manifest(store)
    rows = [
        {
            "model": e.id,
            "kind": e.kind,
            "input": f"{e.input.channels}x{e.input.height}x{e.input.width}",
            "explains": e.explains,
            "available": True,
            "reason": "",
        }
        for e in good
    ]
    rows += [
        {
            "model": b.id,
            "kind": b.kind,
            "input": "",
            "explains": str(b.raw.get("explains", "")),
            "available": False,
            "reason": b.reason,
        }
        for b in bad
    ]
    return sorted(rows, key=lambda r: r["model"])


def _find(store: Path, model: str) -> list[dict[str, Any]]:
    path = store / "manifest.json"
    if not path.exists():
        raise UsageError(f"no manifest at {path}")
    name, _, version = model.partition(":")
    hits = [
        m
        for m in json.loads(path.read_text()).get("models", [])
        if m.get("name") == name and (not version or str(m.get("version")) == version)
    ]
    if not hits:
        raise UsageError(f"{model} is not in {path}")
    return hits


def remove_model(store: Path, model: str, force: bool = False) -> list[str]:
    from xaiserve.service.modelstore import remove_entry

    hits = _find(store, model)
    ids = {f"{m['name']}:{m['version']}" for m in hits} | {m["name"] for m in hits}
    others = json.loads((store / "manifest.json").read_text()).get("models", [])
    deps = sorted(
        f"{m['name']}:{m['version']}"
        for m in others
        if m.get("explains") in ids and f"{m['name']}:{m['version']}" not in ids
    )
    if deps and not force:
        raise UsageError(f"{', '.join(deps)} explain {model}; remove them first, or --force")
    name, _, version = model.partition(":")
    removed = remove_entry(store, name, version or None)
    root = store.resolve()
    for m in removed:
        folder = (store / m["name"] / str(m["version"])).resolve()
        if root in folder.parents and folder.is_dir():  # only the entry's own NAME/VERSION folder
            shutil.rmtree(folder)
            parent = folder.parent
            if parent != root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
    return [f"{m['name']}:{m['version']}" for m in removed]


# -- command line -----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from xaiserve.paths import default_model_store
    from xaiserve.service.images import RESIZE_MODES

    p = argparse.ArgumentParser(
        prog="xaiserve models", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    store_help = "the model store (default: $XAISERVE_MODEL_STORE or ./model_store)"
    a = sub.add_parser("add", help="add a model file to the store")
    a.add_argument("name")
    a.add_argument("file", help="model.onnx, a TorchScript file, or a torch.export .pt2")
    a.add_argument("--torch", help="the same network as TorchScript or .pt2, when FILE is ONNX (gradient methods)")
    a.add_argument("--kind", required=True, choices=("classifier", "encoder"))
    a.add_argument("--input", help="CxHxW, e.g. 3x224x224 (default: read from the file)")
    a.add_argument("--mean", nargs="+", help="per-channel mean the model was trained with, or 'imagenet' (default 0)")
    a.add_argument("--std", nargs="+", help="per-channel std, or 'imagenet' (default 1)")
    a.add_argument("--labels", help="classifier: a text file with one label per line, in output order")
    a.add_argument(
        "--resize", choices=RESIZE_MODES, default="stretch", help="fitting other image sizes (default stretch)"
    )
    a.add_argument("--io", help="the graph's tensor names when they cannot be inferred: image=NAME,output=NAME")
    a.add_argument("--version", help="default: the next integer version of NAME")
    a.add_argument("--description", default="")
    a.add_argument(
        "--no-convert",
        action="store_true",
        help="FILE is ONNX and no --torch: do not convert it to torch (onnx2torch); gradient methods are then refused",
    )
    a.add_argument("--force", action="store_true", help="replace files already in NAME/VERSION/")
    a.add_argument("--keep-on-error", action="store_true", help=argparse.SUPPRESS)
    a.add_argument("--store", type=Path, default=None, help=store_help)
    for cmd, hlp in (
        ("list", "list the store's models, with the reason for any that would not serve"),
        ("show", "print one entry and its card"),
        ("remove", "remove a model version and its files"),
        ("schema", "print the JSON Schema of a manifest entry"),
    ):
        q = sub.add_parser(cmd, help=hlp)
        if cmd in ("show", "remove"):
            q.add_argument("model", help="NAME[:VERSION] (remove without a version removes every version)")
        if cmd == "remove":
            q.add_argument("--force", action="store_true", help="also when masking networks explain it")
        if cmd == "list":
            q.add_argument("--json", action="store_true")
        q.add_argument("--store", type=Path, default=None, help=store_help)
    p.set_defaults(default_store=default_model_store())
    return p


def is_store_command(argv: Sequence[str]) -> bool:
    """Whether `xaiserve models ARGV` works on a store (else it asks a running server, as before)."""
    return bool(argv) and argv[0] in SUBCOMMANDS and "--address" not in argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    store = Path(args.store) if getattr(args, "store", None) else Path(args.default_store)
    args.store = store
    try:
        if args.cmd == "add":
            from xaiserve.handlers.nets.forms import freeze  # noqa: F401 - import torch before timing anything

            entry = add_model(args)
            methods, notes = entry.pop("_methods"), entry.pop("_notes")
            print(
                json.dumps(
                    {
                        "added": f"{entry['name']}:{entry['version']}",
                        "store": str(store),
                        "kind": entry["kind"],
                        "input": entry["input"],
                        "output_dim": entry["output_dim"],
                        "io": entry.get("io", {}),
                        "files": entry["files"],
                        "metrics": entry["metrics"],
                        "methods": methods,
                        "notes": notes,
                        "test_image": entry["added"]["test_image"],
                    },
                    indent=2,
                )
            )
        elif args.cmd == "list":
            rows = list_store(store)
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                print(f"{'model':30} {'kind':11} {'input':12} {'explains':24} status")
                for r in rows:
                    status = "ok" if r["available"] else f"UNAVAILABLE: {r['reason']}"
                    print(f"{r['model']:30} {r['kind']:11} {r['input']:12} {r['explains'] or '-':24} {status}")
        elif args.cmd == "show":
            for m in _find(store, args.model):
                print(json.dumps(m, indent=2))
                card = store / m.get("files", {}).get("card", "")
                if m.get("files", {}).get("card") and card.is_file():
                    print("\n" + card.read_text())
        elif args.cmd == "remove":
            print(json.dumps({"removed": remove_model(store, args.model, args.force), "store": str(store)}))
        elif args.cmd == "schema":
            from xaiserve.service.manifest_schema import ENTRY_SCHEMA

            print(json.dumps(ENTRY_SCHEMA, indent=2))
    except (UsageError, XaiError, ValueError, FileNotFoundError) as e:
        print(f"xaiserve models {args.cmd}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
