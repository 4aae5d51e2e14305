"""The main job (`embedder demo`, the README's first command) end to end, and the datasets it reads."""
from __future__ import annotations

import gzip
import re
import struct

import numpy as np
import pytest

from embedder import cli, datasets


def test_demo_runs_the_main_job_through_the_service_and_a_rerun_comes_from_the_cache(
        tmp_path, cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("EMBEDDER_CACHE_DIR", str(cache_dir))  # reuse the session's ONNX export
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "absent")  # -> scikit-learn's digits
    args = ["demo", "--data-dir", str(tmp_path / "data"), "--train-size", "200", "--test-size", "60", "-q"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "dataset: digits, 200 labelled training images, 60 held out" in out
    assert "added 200 new, replaced 0; all 200 embedded" in out
    accuracy = float(re.search(r"hold-out \(40 images\): accuracy ([\d.]+)%", out).group(1))
    assert accuracy > 50  # ten digit classes: chance is 10%
    assert re.search(r"predicted 60 held-out images in [\d.]+ s: [\d.]+% correct", out)
    assert "nearest stored images to test-0" in out and "service stopped cleanly" in out
    assert (tmp_path / "data" / "heads" / "digits-logreg" / "head.json").is_file()

    assert cli.main(args) == 0  # the same images again: no backbone pass
    out = capsys.readouterr().out
    assert "added 0 new, replaced 200; 200 came from the cache" in out


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files_are_read_and_preferred_by_the_demo(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 12)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path)
    x, y = datasets.fashion_mnist("test")
    assert x.shape == (12, 28, 28) and x.dtype == np.uint8 and y.tolist() == [i % 10 for i in range(12)]
    train, test = datasets.demo_sets(20, 5)
    assert train.name == "fashion-mnist" and len(train) == 20 and len(test) == 5
    assert train.labels[:3] == ["T-shirt/top", "Trouser", "Pullover"]
    assert train.png(0).startswith(b"\x89PNG")


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path)
    assert not datasets.fashion_mnist_available()
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        datasets.fashion_mnist("train")
