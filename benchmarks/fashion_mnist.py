"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (IDX files, no download at run time).

    apt-get install -y dataset-fashion-mnist     # -> /usr/share/datasets/fashion-mnist/*.gz

    from fashion_mnist import load
    x_train, y_train = load("train")             # uint8 (60000, 28, 28), int64 (60000,)
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DATA_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of ``split`` ("train" or "test")."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(DATA_DIR / f"{prefix}-images-idx3-ubyte.gz", offset=16).reshape(-1, 28, 28)
    labels = _read_idx(DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz", offset=8).astype(np.int64)
    return images, labels


def available() -> bool:
    return (DATA_DIR / "t10k-labels-idx1-ubyte.gz").exists()


def _read_idx(path: Path, offset: int) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; install it with: apt-get install -y dataset-fashion-mnist")
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)
