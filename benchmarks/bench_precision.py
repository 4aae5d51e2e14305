"""What opt-in reduced precision costs: OpenVINO bf16 vs fp32 embeddings, in cosine and in accuracy.

Usage::

    python benchmarks/bench_precision.py            # 3,000 train / 2,000 test Fashion-MNIST images
    python benchmarks/bench_precision.py --quick    # 600 / 400

Both precisions embed the same images (Fashion-MNIST from the Debian package, plus real JPEG photos for
the cosine), a logistic-regression head is trained on each precision's train features, and its test accuracy
is compared. fp32 is the default everywhere; bf16 is opt-in (``--precision bf16``, OpenVINO only).
Writes ``benchmarks/results/bench_precision.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parent))

from embedder.datasets import fashion_mnist as load  # noqa: E402
from images import real_jpegs, write_json  # noqa: E402

from embedder import Embedder  # noqa: E402


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_train, n_test = (600, 400) if args.quick else (3000, 2000)
    x_train, y_train = load("train")
    x_test, y_test = load("test")
    x_train, y_train, x_test, y_test = x_train[:n_train], y_train[:n_train], x_test[:n_test], y_test[:n_test]
    photos = real_jpegs(64)

    results = {}
    for precision in ("fp32", "bf16"):
        with Embedder(model="mobilenet_v2", device="cpu", runtime="openvino", precision=precision) as emb:
            start = time.perf_counter()
            feats_train = emb.embed(list(x_train), progress=True)
            took = time.perf_counter() - start
            feats_test = emb.embed(list(x_test))
            feats_photos = emb.embed(photos)
        head = LogisticRegression(max_iter=1000).fit(feats_train, y_train)
        results[precision] = {"features": (feats_train, feats_test, feats_photos),
                              "accuracy": float(head.score(feats_test, y_test)),
                              "img_s": n_train / took}

    fp32, bf16 = results["fp32"], results["bf16"]
    cos_fm = np.concatenate([_cos(a, b) for a, b in zip(fp32["features"][:2], bf16["features"][:2])])
    cos_photos = _cos(fp32["features"][2], bf16["features"][2])
    payload = {
        "runtime": "openvino", "model": "mobilenet_v2", "n_train": n_train, "n_test": n_test,
        "photos": len(photos),
        "cosine_bf16_vs_fp32": {"photos_min": float(cos_photos.min()), "photos_mean": float(cos_photos.mean()),
                                "fashion_mnist_min": float(cos_fm.min()), "fashion_mnist_mean": float(cos_fm.mean())},
        "accuracy": {"fp32": fp32["accuracy"], "bf16": bf16["accuracy"],
                     "change_points": 100 * (bf16["accuracy"] - fp32["accuracy"])},
        "pipeline_img_s_28px": {"fp32": fp32["img_s"], "bf16": bf16["img_s"]},
    }
    print(f"bf16 vs fp32 cosine: photos min {cos_photos.min():.4f} mean {cos_photos.mean():.5f}; "
          f"Fashion-MNIST min {cos_fm.min():.4f} mean {cos_fm.mean():.5f}")
    print(f"logreg test accuracy ({n_train} train / {n_test} test): fp32 {fp32['accuracy']:.4f}, "
          f"bf16 {bf16['accuracy']:.4f} ({payload['accuracy']['change_points']:+.2f} points)")
    path = write_json("bench_precision_quick" if args.quick else "bench_precision", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
