"""Generate the Python stubs of xaiserve/proto/explain/v1 beside the .proto files.

Run `python -m xaiserve.service.protogen` after editing a .proto; `tests/test_proto_stubs.py` fails when the
committed stubs differ from what this produces.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

# Source files of the package itself (not data): the .proto files live beside their stubs.
PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
# protoc runs from the directory above the package, so that the generated grpc stub imports
# `xaiserve.proto.explain.v1` (the protobuf package, the wire name, stays `explain.v1`).
IMPORT_ROOT = PROTO_ROOT.parent.parent


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (grpcio-tools) on every .proto under proto_root; return the files written."""
    from grpc_tools import protoc
    import grpc_tools

    root = proto_root.parent.parent
    protos = sorted(p.relative_to(root).as_posix() for p in proto_root.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    return sorted(p for p in out_dir.rglob("*_pb2*.py*"))


def main() -> int:
    written = generate(IMPORT_ROOT)
    for p in written:
        print(p.relative_to(IMPORT_ROOT))
    return 0


def stale_files() -> list[str]:
    """Names of committed stubs that differ from freshly generated ones (empty when current)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for f in fresh:
            rel = f.relative_to(tmp)
            committed = IMPORT_ROOT / rel
            if not committed.exists() or committed.read_bytes() != f.read_bytes():
                stale.append(rel.as_posix())
        return stale


if __name__ == "__main__":
    sys.exit(main())
