"""A Node.js client (tests/interop/node: @grpc/grpc-js and @grpc/proto-loader, the .proto alone, no generated
code) calls Embed, Add, Search, Train and Predict on a real server and sees what the Python client sees."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import running_server

from embedder.client import EmbedderClient

NODE_DIR = Path(__file__).parent / "interop" / "node"
NODE, NPM = shutil.which("node"), shutil.which("npm")
PER_LABEL = 10

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not on PATH; the Node.js interop test needs Node >= 18 "
                                                     "and npm (CI has them)")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """The pinned packages from package-lock.json (``npm ci``), unless that install is already there."""
    installed = NODE_DIR / "node_modules" / ".package-lock.json"  # npm writes it at the end of an install
    if not installed.exists() or installed.stat().st_mtime < (NODE_DIR / "package-lock.json").stat().st_mtime:
        assert NPM is not None, "node is installed but npm is not; install npm to run tests/interop/node"
        # --prefer-offline: the npm cache is enough when the registry is out of reach; no install scripts needed
        done = subprocess.run([NPM, "ci", "--ignore-scripts", "--prefer-offline", "--no-audit", "--no-fund"],
                              cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{done.stdout}\n{done.stderr}"
    return NODE_DIR / "node_modules"


@pytest.fixture(scope="module")
def images(digit_images, tmp_path_factory) -> tuple[Path, list[bytes], list[str], list[str]]:
    """``PER_LABEL`` digits of each class as IMAGES_DIR/<label>/<n>.jpg; their bytes, ids and labels in the
    order the script reads them (sorted)."""
    folder = tmp_path_factory.mktemp("node-images")
    picked: dict[str, list[bytes]] = {}
    for data, label in zip(*digit_images):
        picked.setdefault(label, [])
        if len(picked[label]) < PER_LABEL:
            picked[label].append(data)
    out: list[tuple[str, bytes, str]] = []
    for label, datas in picked.items():
        (folder / label).mkdir()
        for n, data in enumerate(datas):
            (folder / label / f"{n:02d}.jpg").write_bytes(data)
            out.append((f"{label}/{n:02d}.jpg", data, label))
    out.sort()
    return folder, [d for _, d, _ in out], [i for i, _, _ in out], [y for _, _, y in out]


def test_node_calls_embed_add_search_train_predict_from_the_proto(node_modules, images, embedder):
    folder, data, ids, labels = images
    with running_server(embedder) as server:
        target = f"127.0.0.1:{server.port}"
        done = subprocess.run([NODE, "client.js", target, str(folder)], cwd=NODE_DIR, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        got = json.loads(done.stdout)
        with EmbedderClient(target) as client:
            python = client.embed(data)
            predicted = client.predict(got["train"]["head_id"], [data[ids.index(p["id"])] for p in got["predict"]])

    embed = got["embed"]
    assert embed["model_id"] == embedder.model_id and embed["dim"] == embedder.dim
    assert [r["id"] for r in embed["results"]] == ids and not any(r["error"] for r in embed["results"])
    vectors = np.array([r["vector"] for r in embed["results"]], np.float32)
    np.testing.assert_array_equal(vectors, python)  # the same float32s, bit for bit
    np.testing.assert_allclose(vectors, embedder.embed(data), atol=1e-6)

    assert got["add"] == {"added": len(ids), "replaced": 0, "errors": [None] * len(ids)}
    query = got["search"]
    assert query["query"] == ids[0] and query["hits"][0]["id"] == ids[0]
    assert query["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4) and query["hits"][0]["label"] == labels[0]

    train = got["train"]
    assert train["classes"] == sorted(set(labels)) and train["metrics"]["accuracy"] >= 0.8
    assert [p["id"] for p in got["predict"]] == [f"{y}/00.jpg" for y in train["classes"]]
    assert [p["label"] for p in got["predict"]] == train["classes"] and not any(p["error"] for p in got["predict"])
    assert [p["probability"] for p in got["predict"]] == pytest.approx([p.probabilities[0] for p in predicted])
    assert [p["label"] for p in got["predict"]] == [p.label for p in predicted]
