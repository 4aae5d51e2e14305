"""The client installed alone: a fresh venv with only the base distribution calls a real ``embedder serve``.

The venv gets ``pip install <this repository>`` (no extras), so grpcio, protobuf and numpy come from the
package index and nothing else; the server runs from the test environment. Real photos and digits go over the
wire as files and as a numpy array; embed, add, search, train and predict are checked on what comes back.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import jpeg_bytes
from test_hardening import start_server
from test_light_imports import ML_STACK

pytestmark = pytest.mark.network

REPO = Path(__file__).resolve().parents[1]

# Runs in the client venv: argv = server address, folder with manifest.json and the images, ML_STACK as JSON.
CLIENT_SCRIPT = r"""
import contextlib, importlib.util, io, json, sys
from pathlib import Path

import numpy as np
from embedder.client import EmbedderClient, ServiceError

address, folder, heavy = sys.argv[1], Path(sys.argv[2]), set(json.loads(sys.argv[3]))
manifest = json.loads((folder / "manifest.json").read_text())
train, held_out = manifest["train"], manifest["held_out"]
from embedder.runtimes import installed

out = {"torch_importable": importlib.util.find_spec("torch") is not None, "torch_installed": installed("torch")}
with EmbedderClient(address, timeout=120, retries=30) as client:  # retries: the server may still be warming up
    vectors = client.embed([str(folder / name) for name in manifest["photos"]] + [np.load(folder / "photo.npy")])
    out["embed"] = {"shape": vectors.shape, "norms": np.linalg.norm(vectors, axis=1).tolist(),
                    "file_vs_array": float(vectors[0] @ vectors[-1])}
    added = client.add("digits", [str(folder / f) for f, _ in train], [f for f, _ in train],
                       labels=[y for _, y in train])
    out["add"] = {"added": added.added, "failed": added.failed}
    out["search"] = [[h.id, h.score] for h in client.search(str(folder / train[0][0]), collection="digits", k=3)]
    head = client.train("digits", "logreg", head_id="digits")
    out["train"] = {"head_id": head["head_id"], "classes": head["classes"], "samples": head["samples"]}
    out["predict"] = [[p.label, p.error] for p in client.predict("digits", [str(folder / f) for f, _ in held_out])]
    try:
        client.predict("no-such-head", [str(folder / held_out[0][0])])
    except ServiceError as e:
        out["error"] = [e.code.name, e.category.name]
err = io.StringIO()
with contextlib.redirect_stderr(err):  # a command of the server extra: says what to install, no traceback
    from embedder.cli import main
    out["backup"] = [main(["backup", str(folder / "backup")]), err.getvalue()]
out["loaded"] = sorted(heavy & {m.split(".")[0] for m in sys.modules})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def client_python(tmp_path_factory) -> Path:
    """The python of a fresh venv (no system site packages) holding only the base distribution of this repo."""
    root = tmp_path_factory.mktemp("client-install")
    # Built from a copy of the sources: building in the working tree would leave build/ and egg-info there.
    source = root / "source"
    for name in ("embedder", "classifier"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    python = root / "venv" / "bin" / "python"
    pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(source)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PIP_NO_INPUT": "1"})
    assert pip.returncode == 0, pip.stderr
    return python


@pytest.fixture(scope="module")
def server_address(tmp_path_factory, cache_dir):
    proc, address = start_server(tmp_path_factory.mktemp("client-install-data"), cache_dir)
    yield address
    proc.terminate()
    proc.wait(timeout=60)


def test_the_base_install_has_no_ml_stack_and_serves_a_caller(client_python, server_address, photo_arrays,
                                                              digit_images, tmp_path):
    photos = list(photo_arrays.values())[:3]
    for i, arr in enumerate(photos):
        (tmp_path / f"photo{i}.jpg").write_bytes(jpeg_bytes(arr))
    np.save(tmp_path / "photo.npy", np.ascontiguousarray(photos[0]))  # the first photo again, as pixels
    images, labels = digit_images
    names = [f"d{i}.jpg" for i in range(len(images))]
    for name, data in zip(names, images):
        (tmp_path / name).write_bytes(data)
    train = [(n, y) for i, (n, y) in enumerate(zip(names, labels)) if i % 30 < 10]  # 10 of each digit
    held_out = [(n, y) for i, (n, y) in enumerate(zip(names, labels)) if i % 30 >= 25]  # 5 of each
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"photos": [f"photo{i}.jpg" for i in range(len(photos))], "train": train, "held_out": held_out}))

    run = subprocess.run([str(client_python), "-c", CLIENT_SCRIPT, server_address, str(tmp_path),
                          json.dumps(ML_STACK)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)

    assert not out["torch_importable"] and not out["torch_installed"] and out["loaded"] == []
    assert out["embed"]["shape"] == [len(photos) + 1, 1280]
    assert np.allclose(out["embed"]["norms"], 1.0, atol=1e-4)
    assert out["embed"]["file_vs_array"] > 0.95  # one photo, decoded by the server vs sent as pixels
    assert out["add"] == {"added": len(train), "failed": {}}
    (top_id, top_score), *rest = out["search"]
    assert top_id == train[0][0] and top_score > 0.999 and all(score < top_score for _, score in rest)
    assert out["train"] == {"head_id": "digits", "classes": ["0", "1", "7"], "samples": len(train)}
    assert all(error is None for _, error in out["predict"])
    correct = sum(label == y for (label, _), (_, y) in zip(out["predict"], held_out))
    assert correct >= 0.8 * len(held_out)  # three well-separated digits; chance is 1/3
    assert out["error"] == ["NOT_FOUND", "NOT_FOUND"]
    code, err = out["backup"]
    assert code == 2 and err.startswith("embedder: error: this command needs the server extra: pip install "
                                        "'embedder[server]'") and "Traceback" not in err
