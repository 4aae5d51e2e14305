"""Shared fixtures: one loaded model per test session, small real photos."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photo_arrays() -> dict[str, np.ndarray]:
    """Real RGB photos from scikit-image and scikit-learn."""
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    return {"chelsea": sd.chelsea(), "coffee": sd.coffee(), "astronaut": sd.astronaut(),
            "rocket": sd.rocket(), "china": china, "flower": flower}


@pytest.fixture(scope="session")
def photos(photo_arrays) -> list[bytes]:
    """The photos as JPEG bytes, in a fixed order."""
    return [jpeg_bytes(a) for a in photo_arrays.values()]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("embedder-cache")


@pytest.fixture(scope="session")
def embedder(cache_dir):
    """The default backbone on CPU with the default runtime, shared by every test."""
    from embedder import Embedder

    with Embedder(model="mobilenet_v2", device="cpu", cache_dir=cache_dir) as emb:
        yield emb
