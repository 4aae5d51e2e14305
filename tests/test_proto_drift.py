"""The committed gRPC stubs are exactly what the proto generates (fix: `python -m embedder._proto.generate`)."""
from __future__ import annotations

import re

import pytest

from embedder._proto import generate as gen

# Lines that record which protoc/grpcio-tools produced the file, not what the proto says.
_VERSION_STAMPS = [
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: X"),
    (re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M), "GRPC_GENERATED_VERSION = X"),
    (re.compile(r"(_runtime_version\.Domain\.PUBLIC,\n)\s*\d+,\n\s*\d+,\n\s*\d+,\n\s*'[^']*',\n"), r"\1X\n"),
]


def _normalised(text: str) -> str:
    for pattern, replacement in _VERSION_STAMPS:
        text = pattern.sub(replacement, text)
    return text


@pytest.mark.parametrize("name", gen.FILES)
def test_committed_stubs_match_the_proto(tmp_path, name):
    fresh = tmp_path / name
    gen.generate(tmp_path)
    committed = gen.OUT_DIR / name
    assert committed.exists(), f"{committed} is missing; run `python -m embedder._proto.generate` and commit it"
    assert _normalised(committed.read_text()) == _normalised(fresh.read_text()), (
        f"{committed} is stale: protos/embedder/v1/embedder.proto changed without regenerating; "
        "run `python -m embedder._proto.generate` and commit the result")


def test_generated_grpc_module_imports_package_relative():
    text = (gen.OUT_DIR / "embedder_pb2_grpc.py").read_text()
    assert "from . import embedder_pb2 as" in text and "from embedder.v1" not in text
