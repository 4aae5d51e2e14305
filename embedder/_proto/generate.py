"""Regenerate the committed gRPC stubs from ``protos/embedder/v1/embedder.proto``.

Run from the repository root after editing the proto (needs ``grpcio-tools``, in the ``test`` extra)::

    python -m embedder._proto.generate

protoc writes ``embedder/v1/embedder_pb2*.py`` whose gRPC module imports ``from embedder.v1 import
embedder_pb2``; that absolute path would collide with this package, so the files are flattened into
``embedder/_proto/`` and the import is made package-relative. ``tests/test_proto_drift.py`` runs
:func:`generate` into a temporary folder and fails when the committed stubs differ.
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
PROTO = "embedder/v1/embedder.proto"
OUT_DIR = Path(__file__).resolve().parent
FILES = ("embedder_pb2.py", "embedder_pb2.pyi", "embedder_pb2_grpc.py")


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Run protoc on the proto and write the fixed-up stubs into ``out_dir``; returns the paths written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}",
                          f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", str(PROTO_ROOT / PROTO)])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc} on {PROTO_ROOT / PROTO}")
        generated = Path(tmp) / Path(PROTO).parent
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in FILES:
            text = (generated / name).read_text()
            if name.endswith("_grpc.py"):
                text = re.sub(r"^from embedder\.v1 import embedder_pb2 as", "from . import embedder_pb2 as",
                              text, flags=re.MULTILINE)
            (out_dir / name).write_text(text)
            written.append(out_dir / name)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(path)
