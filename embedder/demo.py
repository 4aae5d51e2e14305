"""The main job on the embedded default: embed real sample photos and show what the vectors know.

Uses the photos bundled with scikit-image and scikit-learn (no download), so it runs offline.
"""
from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from .config import Config
from .pipeline import Embedder


def sample_photos() -> dict[str, bytes]:
    """Real photos as JPEG bytes, plus two crops of each so near-duplicates exist to be found."""
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    base = {"chelsea": sd.chelsea(), "coffee": sd.coffee(), "astronaut": sd.astronaut(), "rocket": sd.rocket(),
            "china": china, "flower": flower}
    photos = {}
    for name, arr in base.items():
        h, w = arr.shape[:2]
        for tag, view in (("", arr), ("-crop", arr[h // 8: -h // 8, w // 8: -w // 8])):
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(view)).save(buf, "JPEG", quality=90)
            photos[name + tag] = buf.getvalue()
    return photos


def run(config: Config | None = None) -> None:
    photos = sample_photos()
    names = list(photos)
    with Embedder(config=config or Config.from_env()) as emb:
        info = emb.info()
        print(f"model {info['model_id']} ({info['dim']}-d) on {info['device']} via {info['runtime']}")
        start = time.perf_counter()
        vectors = emb.embed(list(photos.values()))
        took = time.perf_counter() - start
    print(f"embedded {len(names)} photos in {took:.2f} s\n")
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -1.0)
    print(f"{'photo':<16} nearest neighbour      cosine")
    for i, name in enumerate(names):
        j = int(sims[i].argmax())
        print(f"{name:<16} {names[j]:<22} {sims[i, j]:.3f}")
