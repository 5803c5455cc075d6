"""`xaiserve export torchserve NAME [--out DIR]`: a TorchServe model archive (.mar) of a store's model.

The archive is written by torch-model-archiver (`pip install 'xaiserve[torchserve]'`) and holds:
handler.py (a TorchServe BaseHandler over service.torchserve_handler.XaiserveHandler), a small
store with the manifest entries of the model and of the model it explains and their files (ONNX
graph, state dict, card), and xaiserve_archive.json naming the model. TorchServe's Python must be
able to import xaiserve (the same version: `pip install xaiserve` there, or a virtualenv made with
--system-site-packages beside it), which is what makes its answers xaiserve's.

    xaiserve export torchserve scenes-nemu --out /srv/torchserve/model-store
    torchserve --start --model-store /srv/torchserve/model-store --models scenes-nemu=scenes-nemu.mar
    curl -T cat.png http://127.0.0.1:8080/predictions/scenes-nemu
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from xaiserve.service.torchserve_handler import ARCHIVE_CONFIG

HANDLER = '''"""TorchServe handler of the xaiserve model {model} (written by `xaiserve export torchserve`).

TorchServe calls initialize(context) once per worker and handle(data, context) per batch; the
steps (preprocess, inference, postprocess) are xaiserve.service.torchserve_handler's.
"""
from ts.torch_handler.base_handler import BaseHandler

try:
    from xaiserve.service.torchserve_handler import XaiserveHandler
except ImportError as e:  # TorchServe's Python has no xaiserve
    raise ImportError("this archive runs xaiserve's handler: install xaiserve {version} in TorchServe's Python "
                      "environment (pip install xaiserve), then register the archive again") from e


class ModelHandler(XaiserveHandler, BaseHandler):
    def __init__(self):
        BaseHandler.__init__(self)
        XaiserveHandler.__init__(self)
'''
# the manifest files an archive carries (the rest, training logs and curves, stay in the store)
FILES = ("onnx", "state_dict", "torchscript", "exported_program", "card")


def build_archive(store: Path, name: str, out: Path, *, threads: int = 1) -> Path:
    """Write OUT/<model name>.mar for model `name` (name or name:version) of `store`; returns its path."""
    from xaiserve import __version__
    from xaiserve.errors import InvalidArgument
    from xaiserve.service.registry import Registry, RegistryConfig

    try:
        from model_archiver.model_archiver_config import ModelArchiverConfig
        from model_archiver.model_packaging import generate_model_archive
    except ImportError:
        raise SystemExit(
            "xaiserve export torchserve: torch-model-archiver is not installed; "
            "pip install 'xaiserve[torchserve]' (or torch-model-archiver)"
        ) from None
    registry = Registry(RegistryConfig(store=store, warmup=False))
    entry = registry.resolve(name)
    if entry.kind == "denoiser":
        raise InvalidArgument(
            f"{entry.id} is a denoiser; the TorchServe handler serves image models (nem_u, nemt, "
            "encoder, classifier): serve denoisers with xaiserve (explain.v1 Denoise or OIP v2)"
        )
    frozen = registry.frozen_for(entry)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xaiserve-mar-") as tmp:
        stage = Path(tmp) / "store"
        stage.mkdir()
        entries = []
        for e in [entry] if frozen.id == entry.id else [entry, frozen]:
            raw = dict(e.raw)
            raw["files"] = {k: v for k, v in e.files.items() if k in FILES and (store / v).exists()}
            for rel in raw["files"].values():
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(store / rel, stage / rel)
            entries.append(raw)
        (stage / "manifest.json").write_text(json.dumps({"models": entries}, indent=1))
        (stage / ARCHIVE_CONFIG).write_text(
            json.dumps({"model": entry.id, "intra_op_threads": threads, "xaiserve": __version__})
        )
        handler = Path(tmp) / "handler.py"
        handler.write_text(HANDLER.format(model=entry.id, version=__version__))
        generate_model_archive(
            ModelArchiverConfig(
                model_name=entry.name,
                handler=str(handler),
                version=entry.version,
                extra_files=str(stage),
                export_path=str(out),
                archive_format="default",
                force=True,
            )
        )
    return out / f"{entry.name}.mar"


def export_main(target: str, argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="xaiserve export torchserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("name", help="the model: name or name:version")
    p.add_argument("--out", default=".", help="folder the .mar is written to (TorchServe's model store)")
    p.add_argument("--model-store", default="model_store", help="the xaiserve store the model comes from")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per TorchServe worker")
    a = p.parse_args(argv)
    from xaiserve.errors import XaiError

    try:
        mar = build_archive(
            Path(a.model_store).expanduser().resolve(), a.name, Path(a.out).expanduser(), threads=a.threads
        )
    except XaiError as e:
        print(f"xaiserve export torchserve: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"model": a.name, "mar": str(mar)}))
    return 0
