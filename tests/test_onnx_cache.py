"""The ONNX export cache: short file names whatever the model id, and a bound on its size (LRU)."""
from __future__ import annotations

import time

import numpy as np
import requests
import torch
from conftest import http_door, jpeg_bytes, running_server
from torch import nn

from embedder import Embedder, get_backbone
from embedder.backbones import IMAGENET_224, BackboneSpec, WeightsFile, register_backbone, sha256_file
from embedder.onnx_cache import export_path

IMAGE = np.full((32, 32, 3), 128, np.uint8)


def tiny(name: str, tmp_path, seed: int = 0) -> BackboneSpec:
    """A registered 4-d torch backbone named ``name`` (an export of ~2 KB)."""
    torch.manual_seed(seed)
    weights = tmp_path / f"tiny-{seed}.pth"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).state_dict(), weights)

    def build(path):
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        net.load_state_dict(torch.load(path, weights_only=True))
        return net

    return register_backbone(BackboneSpec(name=name, dim=4, preprocessing=IMAGENET_224, build=build,
                                          features_only=True,
                                          weights=WeightsFile(sha256=sha256_file(weights), path=weights)))


def test_a_long_model_id_gets_a_short_cache_file_and_ids_sharing_a_start_never_share_a_file(tmp_path,
                                                                                              restore_registry):
    """A 230-character name made a 280-character file name: OSError 36 (File name too long) on export."""
    long_a, long_b = "a" * 229 + "1", "a" * 229 + "2"
    specs = [tiny(long_a, tmp_path, 0), tiny(long_b, tmp_path, 1)]
    vectors = []
    for spec in specs:
        with Embedder(model=spec.name, device="cpu", runtime="onnxruntime", cache_dir=tmp_path / "cache") as emb:
            vectors.append(emb.embed([IMAGE]))
    files = sorted((tmp_path / "cache" / "onnx").glob("*.onnx"))
    assert len(files) == 2 and all(len(f.name) < 100 and f.name.startswith("a" * 40 + "-") for f in files)
    assert not np.allclose(vectors[0], vectors[1])  # each id its own export
    assert {export_path(tmp_path / "cache", s.model_id, ".opset17.v1.onnx") for s in specs} == set(files)


def test_the_cache_keeps_under_its_bound_evicting_the_least_recently_used(tmp_path, restore_registry):
    """Every new export used to stay forever; now the least recently loaded ones go once the cache is over
    onnx_cache_bytes, and a model whose file went keeps running (OpenVINO read its file again per batch size)."""
    cache = tmp_path / "cache"
    a, b, c = (tiny(name, tmp_path, seed) for seed, name in enumerate("abc"))

    def load(spec, runtime="onnxruntime"):
        return Embedder(model=spec.name, device="cpu", runtime=runtime, cache_dir=cache, onnx_cache_bytes=bound)

    def cached():
        return {p.name.split("_")[0] for p in (cache / "onnx").glob("*.onnx")}

    bound = 10**9
    with load(a), load(b):
        pass
    one = sum(p.stat().st_size for p in (cache / "onnx").iterdir()) / 2
    bound = int(2.5 * one)  # room for two exports, not three
    time.sleep(0.05)
    running = load(a, "openvino")  # a is loaded again: now b is the least recently used
    try:
        time.sleep(0.05)
        with load(c):
            pass
        assert cached() == {"a", "c"}
        time.sleep(0.05)
        with load(b):  # exported again; a (loaded before c) goes
            pass
        assert cached() == {"b", "c"}
        for n in (1, 2, 3, 9):  # a's file is gone; its runtime still compiles the shapes it has not seen
            assert running.embed([IMAGE] * n).shape == (n, 4)
    finally:
        running.close()


def test_recipes_named_at_a_server_stay_within_the_bound(embedder, tmp_path):
    """Callers naming new recipes over HTTP grew the ONNX cache without end (9 MB per recipe here)."""
    import base64

    cache = tmp_path / "cache"
    bound = 14 * 1024**2  # one mobilenet_v2 recipe export (~9 MB), not two
    image = base64.b64encode(jpeg_bytes(np.full((64, 64, 3), 128, np.uint8))).decode()
    with running_server(embedder, cache_dir=cache, onnx_cache_bytes=bound, max_models=2) as server, \
            http_door(server) as http:
        for name in ("mobilenet_v2@flip", "mobilenet_v2@stages=7", "mobilenet_v2@stages=6-7"):
            answer = requests.post(f"{http.url}/v1/embeddings", json={"model": name, "input": [image]}, timeout=300)
            assert answer.status_code == 200, answer.text
            assert sum(f.stat().st_size for f in (cache / "onnx").iterdir()) <= bound
    last = get_backbone("mobilenet_v2@stages=6-7").model_id
    assert [f.name for f in (cache / "onnx").glob("*.onnx")] == [export_path(cache, last, ".opset17.v1.onnx").name]
