"""Import boundaries: the client and the heads load without the ML stack, the package loads nothing eagerly.

Each check runs in a fresh interpreter, since this test process has long imported everything.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ML_STACK = ("torch", "torchvision", "faiss", "sklearn", "scipy", "onnxruntime", "openvino", "PIL")


def loaded_after(code: str) -> set[str]:
    """The top-level packages of :data:`ML_STACK` in ``sys.modules`` after a fresh interpreter runs ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.splitlines()[-1])) & set(ML_STACK)


@pytest.mark.parametrize("module", ["embedder", "embedder.client", "embedder.client.aio", "embedder.results",
                                    "embedder.inputs", "embedder.errors", "embedder.messages", "embedder.config"])
def test_the_light_core_and_the_client_load_no_ml_stack(module):
    assert loaded_after(f"import {module}") == set()


def test_the_client_module_constructs_and_converts_without_the_ml_stack():
    """Building a client and an item (bytes, numpy) stays light too: Pillow is not imported to rule it out."""
    code = ("import numpy as np\nfrom embedder.client import EmbedderClient, to_item\n"
            "EmbedderClient('127.0.0.1:1').close()\nto_item(b'jpeg'); to_item(np.zeros((2, 2, 3), np.uint8))")
    assert loaded_after(code) == set()


def test_the_async_client_constructs_without_the_ml_stack():
    code = ("import asyncio\nfrom embedder.client import AsyncEmbedderClient\n"
            "async def main():\n    await AsyncEmbedderClient('127.0.0.1:1').close()\nasyncio.run(main())")
    assert loaded_after(code) == set()


def test_classifier_loads_no_torch_until_a_torch_head_trains():
    assert "torch" not in loaded_after("import classifier")
    train = ("import numpy as np, classifier\n"
             "X = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)\n"
             "classifier.make_head('logreg', device='cpu').fit(X, [0, 1] * 10)")
    assert "torch" in loaded_after(train)


def test_the_public_api_is_unchanged_and_loads_on_first_use():
    import embedder

    assert set(embedder.__all__) == {
        "BackboneSpec", "BatchError", "BatchResult", "Config", "Embedder", "EmbedderError", "ImageDecodeError",
        "Preprocessing", "WeightsNotFoundError", "get_backbone", "list_backbones", "register_local"}
    from embedder.pipeline import Embedder

    assert embedder.Embedder is Embedder
    assert loaded_after("from embedder import Config, BatchResult, EmbedderError") == set()
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        embedder.nothing  # noqa: B018


def _answers(client) -> bool:
    from embedder.client import ServiceError

    try:
        return bool(client.list_models())
    except ServiceError:
        return False


def test_a_serving_server_on_the_default_cpu_runtime_has_not_loaded_torch(tmp_path, cache_dir, embedder, photos):
    """`embedder serve` on CPU (ONNX/OpenVINO on a cached export, JPEGs through Pillow) embeds, stores and searches
    without torch in the process: ~860 MB it would hold for nothing (RSS in benchmarks/results/service.json).
    (The ``embedder`` fixture has exported the model into ``cache_dir``: exporting is torch's job.)"""
    from embedder.client import EmbedderClient
    from test_hardening import start_server

    proc, address = start_server(tmp_path / "data", cache_dir)
    try:
        with EmbedderClient(address, timeout=120) as client:
            deadline = time.monotonic() + 120
            while not _answers(client) and time.monotonic() < deadline:
                time.sleep(0.5)  # the model loads after "listening on"
            client.add("c", photos[:3], ["a", "b", "c"])
            assert client.search(photos[0], collection="c", k=1)[0].id == "a"
        maps = (Path("/proc") / str(proc.pid) / "maps").read_text()
        assert "libtorch" not in maps and "/torch/" not in maps
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
