"""The `embedder` command line: `models` and `embed`, in-process and through the installed console script."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedder.backbones import WeightsFile, get_backbone, register_backbone
from embedder.cli import main
from embedder.runtimes import CPU_PREFERENCE, RUNTIMES, installed

from conftest import cosine

NAMES = ["efficientnet_lite0", "efficientnet_lite2", "mobilenet_v2"]


@pytest.fixture
def env(monkeypatch, cache_dir):
    """Exports go to the session's cache; nothing from the caller's EMBEDDER_* settings leaks in."""
    for key in list(os.environ):
        if key.startswith("EMBEDDER_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("EMBEDDER_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("EMBEDDER_DEVICE", "cpu")


@pytest.fixture
def tree(tmp_path, photo_arrays):
    """A folder of real photos in several formats and sub-folders, plus a corrupt file and a non-image."""
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    files = {
        root / "chelsea.jpg": ("chelsea", "JPEG"),
        root / "sub" / "coffee.PNG": ("coffee", "PNG"),
        root / "sub" / "deeper" / "rocket.webp": ("rocket", "WEBP"),
        root / "astronaut.bmp": ("astronaut", "BMP"),
    }
    for path, (name, fmt) in files.items():
        Image.fromarray(photo_arrays[name]).save(path, fmt)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "notes.txt").write_text("not an image; ignored by suffix")
    good = [root / "astronaut.bmp", root / "chelsea.jpg", root / "sub" / "coffee.PNG",
            root / "sub" / "deeper" / "rocket.webp"]  # sorted, recursive
    return root, good


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_every_backbone(capsys, env):
    code, out, _ = run(["models"], capsys)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in NAMES}
    assert sorted(lines) == NAMES
    assert all(line.rstrip().endswith("installed") for line in lines.values())
    assert get_backbone("mobilenet_v2").model_id in lines["mobilenet_v2"]
    assert "1280" in lines["efficientnet_lite2"] and "260" in lines["efficientnet_lite2"]
    expected = next(r for r in CPU_PREFERENCE if installed(r))
    assert f"CPU runtime: {expected}" in out


def test_models_json(capsys, env):
    code, out, _ = run(["models", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert [m["name"] for m in data["models"]] == NAMES
    for m in data["models"]:
        spec = get_backbone(m["name"])
        assert m == {"name": spec.name, "model_id": spec.model_id, "dim": 1280, "input_size": spec.preprocessing.crop,
                     "weights": "installed", "description": spec.description}
    assert data["runtimes_installed"] == [r for r in RUNTIMES if installed(r)]
    assert data["cpu_runtime"] in data["runtimes_installed"] and data["cpu_runtime"] != "torch"


def test_models_shows_how_to_install_missing_weights(capsys, env, restore_registry):
    missing = WeightsFile(sha256="0" * 64, filename="w.pth", package="no_such_weights_package_xyz",
                          install="pip install no-such-weights-package")
    register_backbone(dataclasses.replace(get_backbone("mobilenet_v2"), name="ghost", weights=missing))
    code, out, _ = run(["models", "--json"], capsys)
    rows = {m["name"]: m for m in json.loads(out)["models"]}
    assert code == 0 and rows["ghost"]["weights"] == "missing: pip install no-such-weights-package"


def test_embed_folder_recursively_skipping_bad_files(tree, tmp_path, capsys, env, embedder):
    """A folder (recursive) plus a missing path: good images are written in row order, the rest reported, exit 1."""
    root, good = tree
    out_path = tmp_path / "out" / "vectors.npy"
    code, out, err = run(["embed", root, tmp_path / "missing.jpg", "--out", out_path, "-q"], capsys)
    assert code == 1
    vectors = np.load(out_path)
    meta = json.loads(out_path.with_suffix(".json").read_text())
    assert meta["paths"] == [str(p) for p in good] and meta["count"] == len(good) == vectors.shape[0]
    assert {f["path"] for f in meta["failed"]} == {str(tmp_path / "missing.jpg"), str(root / "broken.jpg")}
    failed = {Path(f["path"]).name: f["error"] for f in meta["failed"]}
    assert failed["missing.jpg"] == "no such file or directory"
    assert "corrupt" in failed["broken.jpg"] or "truncated" in failed["broken.jpg"]
    assert (meta["model_id"], meta["runtime"], meta["dim"]) == (embedder.model_id, embedder.runtime.name, 1280)
    assert vectors.dtype == np.float32 and vectors.shape == (4, 1280)
    np.testing.assert_allclose(vectors, embedder.embed(good), atol=1e-6)
    assert f"skipped {root / 'broken.jpg'}" in err and f"skipped {tmp_path / 'missing.jpg'}" in err
    assert out.startswith("embedded 4 images (2 skipped) with mobilenet_v2:")


def test_embed_files_in_argument_order(tree, tmp_path, capsys, env, embedder):
    """Files given one by one keep their order; with nothing failing the exit code is 0."""
    _, good = tree
    files = [good[2], good[0]]
    out_path = tmp_path / "two.npy"
    code, _, err = run(["embed", *files, "--out", out_path, "-q"], capsys)
    assert code == 0 and "skipped" not in err
    meta = json.loads(out_path.with_suffix(".json").read_text())
    assert meta["paths"] == [str(f) for f in files] and meta["failed"] == []
    np.testing.assert_allclose(np.load(out_path), embedder.embed(files), atol=1e-6)


def test_embed_no_normalize(tree, tmp_path, capsys, env, embedder):
    """--no-normalize writes raw pooled features: not unit length, same direction as the normalised vectors."""
    _, good = tree
    out_path = tmp_path / "raw.npy"
    code, _, _ = run(["embed", *good, "--out", out_path, "-q", "--no-normalize"], capsys)
    raw = np.load(out_path)
    assert code == 0 and json.loads(out_path.with_suffix(".json").read_text())["normalize"] is False
    assert (np.linalg.norm(raw, axis=1) > 5).all()
    assert 1 - cosine(raw, embedder.embed(good)).min() < 1e-5


def test_embed_with_another_model_and_runtime(tree, tmp_path, capsys, env):
    """--model and --runtime reach the Embedder: efficientnet_lite2 on torch, recorded in the .json."""
    _, good = tree
    out_path = tmp_path / "lite2.npy"
    code, _, _ = run(["embed", good[0], "--out", out_path, "-q", "--model", "efficientnet_lite2",
                      "--runtime", "torch"], capsys)
    meta = json.loads(out_path.with_suffix(".json").read_text())
    assert code == 0 and np.load(out_path).shape == (1, 1280)
    assert meta["model_id"] == get_backbone("efficientnet_lite2").model_id and meta["runtime"] == "torch"
    assert meta["input_size"] == 260


def test_unknown_model_is_exit_2_with_a_clear_message(tree, tmp_path, capsys, env):
    root, _ = tree
    code, _, err = run(["embed", root, "--out", tmp_path / "x.npy", "--model", "resnet9000"], capsys)
    assert code == 2
    assert err.startswith("embedder: error: unknown model 'resnet9000'; registered models: "
                          "efficientnet_lite0, efficientnet_lite2, mobilenet_v2")
    assert not (tmp_path / "x.npy").exists()


def test_nothing_to_embed_is_exit_2(tmp_path, capsys, env):
    (tmp_path / "empty").mkdir()
    code, _, err = run(["embed", tmp_path / "empty", "--out", tmp_path / "x.npy"], capsys)
    assert code == 2 and "embedder: error: no image files found under" in err


def test_bad_config_is_exit_2(tree, tmp_path, capsys, env, monkeypatch):
    """An invalid EMBEDDER_* value or flag value is reported as a usage error, naming the setting."""
    root, _ = tree
    monkeypatch.setenv("EMBEDDER_MAX_PIXELS", "many")
    code, _, err = run(["embed", root, "--out", tmp_path / "x.npy"], capsys)
    assert code == 2 and "EMBEDDER_MAX_PIXELS='many' is not a valid int" in err
    monkeypatch.delenv("EMBEDDER_MAX_PIXELS")
    code, _, err = run(["embed", root, "--out", tmp_path / "x.npy", "--max-batch", "0"], capsys)
    assert code == 2 and "max_batch must be >= 1" in err


def test_argparse_rejects_unknown_choices(capsys):
    with pytest.raises(SystemExit) as e:
        main(["embed", "x", "--out", "y.npy", "--runtime", "tensorrt"])
    assert e.value.code == 2 and "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_console_script(tree, tmp_path, cache_dir):
    """The installed `embedder` script embeds a folder and exits 1 because one file was corrupt."""
    root, good = tree
    script = Path(sys.executable).with_name("embedder")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDDER_")}
    environ.update(EMBEDDER_CACHE_DIR=str(cache_dir), EMBEDDER_DEVICE="cpu")
    out_path = tmp_path / "script.npy"
    proc = subprocess.run([str(script), "embed", str(root), "--out", str(out_path), "-q"],
                          capture_output=True, text=True, env=environ, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("embedded 4 images (1 skipped)")
    assert "skipped" in proc.stderr and "broken.jpg" in proc.stderr
    assert np.load(out_path).shape == (len(good), 1280)
