"""Generate the Python stubs of proto/explain/v1 beside the .proto files.

Run `python -m service.protogen` after editing a .proto; `tests/test_proto_stubs.py` fails when the
committed stubs differ from what this produces.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (grpcio-tools) on every .proto under proto_root; return the files written."""
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(p.relative_to(proto_root).as_posix() for p in proto_root.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{proto_root}",
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
    written = generate(PROTO_ROOT)
    for p in written:
        print(p.relative_to(PROTO_ROOT.parent))
    return 0


def stale_files() -> list[str]:
    """Names of committed stubs that differ from freshly generated ones (empty when current)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for f in fresh:
            rel = f.relative_to(tmp)
            committed = PROTO_ROOT / rel
            if not committed.exists() or committed.read_bytes() != f.read_bytes():
                stale.append(rel.as_posix())
        return stale


if __name__ == "__main__":
    sys.exit(main())
