"""Shared benchmark helpers: a deterministic set of real JPEG photos, and JSON results with machine info.

Every benchmark should time the same kind of input a user sends: real photos of varied size,
encoded as JPEG. They come from the colour photos bundled with scikit-image and scikit-learn
(no download), cropped, rescaled and re-encoded so the set has varied sizes and file weights::

    from images import real_jpegs, write_json   # run scripts as `python benchmarks/<script>.py`

    jpegs = real_jpegs(256, seed=0)             # same bytes for the same (n, seed), on any machine
    write_json("bench_x", {"img_s": 123.4})     # -> benchmarks/results/bench_x.json, with "machine"
"""
from __future__ import annotations

import datetime
import io
import json
import os
import platform
import re
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LONG_SIDE = (300, 1200)  # px, uniform
QUALITY = (85, 95)  # JPEG quality, uniform, inclusive
MIN_CROP = 0.45  # each side of a crop keeps at least this fraction of the source


@lru_cache(maxsize=1)
def source_photos() -> tuple[np.ndarray, ...]:
    """The bundled colour photos (uint8 RGB) available offline, in a fixed order."""
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    names = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
    photos = [getattr(sd, name)() for name in names]
    left, right, _disparity = sd.stereo_motorcycle()
    photos += [left, right, *load_sample_images().images]
    return tuple(np.ascontiguousarray(p[..., :3]) for p in photos)


def real_jpegs(n: int = 256, seed: int = 0) -> list[bytes]:
    """``n`` JPEG photos as bytes: random crops of the bundled photos, rescaled and re-encoded.

    Each image is a random crop (45-100% of each side, so aspect ratios vary) of one of eleven real
    photos (cycled through, so every source appears), resized with PIL bicubic so its long side is
    300-1200 px, randomly mirrored, and saved at JPEG quality 85-95. For seed 0 and n=256: 10-300 KB,
    median 86 KB, mean 96 KB (half of them 50-135 KB). The output is a pure function of ``(n, seed)``,
    and ``real_jpegs(m, seed)`` is a prefix of ``real_jpegs(n, seed)`` for ``m <= n``.
    """
    rng = np.random.default_rng(seed)
    sources = source_photos()
    order = rng.permutation(len(sources))
    return [_make_jpeg(sources[order[i % len(sources)]], rng) for i in range(n)]


def _make_jpeg(photo: np.ndarray, rng: np.random.Generator) -> bytes:
    h, w = photo.shape[:2]
    ch, cw = (int(side * rng.uniform(MIN_CROP, 1.0)) for side in (h, w))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img = Image.fromarray(photo[top:top + ch, left:left + cw])
    scale = int(rng.integers(LONG_SIDE[0], LONG_SIDE[1] + 1)) / max(ch, cw)
    img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(QUALITY[0], QUALITY[1] + 1)))
    return buf.getvalue()


def machine_info() -> dict[str, Any]:
    """Where a result was measured: CPU, GPU (if any), library versions, time."""
    info: dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "gpu": gpu_name(),
    }
    for dist in ("torch", "torchvision", "onnxruntime", "openvino", "numpy", "pillow"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def slug(text: str) -> str:
    """A file-name-safe lower-case form, e.g. 'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3'."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` plus ``"machine"`` (see :func:`machine_info`) to ``benchmarks/results/<name>.json``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2) + "\n")
    return path
