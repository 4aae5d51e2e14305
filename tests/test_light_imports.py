"""Import boundaries: the client and the heads load without the ML stack, the package loads nothing eagerly.

Each check runs in a fresh interpreter, since this test process has long imported everything.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

ML_STACK = ("torch", "torchvision", "faiss", "sklearn", "scipy", "onnxruntime", "openvino", "PIL")


def loaded_after(code: str) -> set[str]:
    """The top-level packages of :data:`ML_STACK` in ``sys.modules`` after a fresh interpreter runs ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.splitlines()[-1])) & set(ML_STACK)


@pytest.mark.parametrize("module", ["embedder", "embedder.client", "embedder.results", "embedder.inputs",
                                    "embedder.errors", "embedder.messages", "embedder.config"])
def test_the_light_core_and_the_client_load_no_ml_stack(module):
    assert loaded_after(f"import {module}") == set()


def test_the_client_module_constructs_and_converts_without_the_ml_stack():
    """Building a client and an item (bytes, numpy) stays light too: Pillow is not imported to rule it out."""
    code = ("import numpy as np\nfrom embedder.client import EmbedderClient, to_item\n"
            "EmbedderClient('127.0.0.1:1').close()\nto_item(b'jpeg'); to_item(np.zeros((2, 2, 3), np.uint8))")
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
