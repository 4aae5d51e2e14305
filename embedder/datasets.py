"""Real labelled image sets that need no download: Fashion-MNIST (Debian package) and scikit-learn's digits.

    apt-get install -y dataset-fashion-mnist     # -> /usr/share/datasets/fashion-mnist/*.gz (IDX files)

    from embedder.datasets import fashion_mnist
    x_train, y_train = fashion_mnist("train")   # uint8 (60000, 28, 28), int64 (60000,)
"""
from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (N, 28, 28)`` and class indices ``int64 (N,)`` of ``split`` ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f'split must be "train" or "test", got {split!r}')
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz", offset=16).reshape(-1, 28, 28)
    labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz", offset=8).astype(np.int64)
    return images, labels


def fashion_mnist_available() -> bool:
    return all((FASHION_MNIST_DIR / f"{p}-{k}-idx{n}-ubyte.gz").exists()
               for p in ("train", "t10k") for k, n in (("images", 3), ("labels", 1)))


@dataclass
class LabelledImages:
    """Grayscale images with class names; ``split`` cuts it in two without shuffling (the sets come shuffled)."""

    name: str
    images: np.ndarray  # uint8 (N, H, W)
    labels: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> LabelledImages:
        return LabelledImages(self.name, self.images[:n], self.labels[:n])

    def png(self, i: int) -> bytes:
        """Image ``i`` as PNG bytes: what a user would upload."""
        buf = io.BytesIO()
        Image.fromarray(self.images[i]).save(buf, "PNG")
        return buf.getvalue()


def demo_sets(train_size: int, test_size: int) -> tuple[LabelledImages, LabelledImages]:
    """Train and held-out sets for the main job: Fashion-MNIST when installed, else scikit-learn's digits."""
    if fashion_mnist_available():
        sets = []
        for split, n in (("train", train_size), ("test", test_size)):
            x, y = fashion_mnist(split)
            sets.append(LabelledImages("fashion-mnist", x[:n], [FASHION_MNIST_CLASSES[c] for c in y[:n]]))
        return sets[0], sets[1]
    from sklearn.datasets import load_digits

    d = load_digits()  # 1797 8x8 digits, 0..16; shown 4x larger so the backbone sees strokes, not pixels
    x = np.stack([np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BICUBIC))
                  for im in d.images])
    labels = [str(t) for t in d.target]
    n_test = min(test_size, len(x) // 4)
    n_train = min(train_size, len(x) - n_test)
    return (LabelledImages("digits", x[:n_train], labels[:n_train]),
            LabelledImages("digits", x[len(x) - n_test:], labels[len(x) - n_test:]))


def _read_idx(path: Path, offset: int) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; install it with: apt-get install -y dataset-fashion-mnist "
                                "(or point FASHION_MNIST_DIR at the IDX files)")
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)
