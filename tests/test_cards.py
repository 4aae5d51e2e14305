"""Model cards: your own ONNX / TorchScript / torchvision / timm files, made and saved by the tests, served like a
built-in backbone and checked against the reference library's own outputs."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import cosine

SIZE = 32


def _tiny_cnn(seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU()).eval()


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    """A tiny CNN exported to ONNX with a dynamic batch axis; it outputs its (N, 16, 16, 16) feature map."""
    import torch

    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    torch.onnx.export(_tiny_cnn(), (torch.zeros(2, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["fmap"], dynamic_axes={"input": {0: "n"}, "fmap": {0: "n"}})
    return path


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory):
    import torch
    from torch import nn

    path = tmp_path_factory.mktemp("ts") / "tiny.pt"
    model = nn.Sequential(_tiny_cnn(1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    torch.jit.trace(model, torch.zeros(1, 3, SIZE, SIZE)).save(str(path))
    return path


def _card(tmp_path, **fields) -> str:
    path = tmp_path / f"{fields['name']}.json"
    path.write_text(json.dumps({k: str(v) if k == "path" else v for k, v in fields.items()}))
    return str(path)


def _normalised(crops: np.ndarray, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> np.ndarray:
    """uint8 (N, H, W, 3) crops as the reference feeds them: float NCHW, normalised."""
    x = (crops.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_onnx_card_equals_onnxruntime_on_the_file(onnx_file, photos, tmp_path, cache_dir, restore_registry, runtime):
    """An ONNX card embeds as ONNX Runtime runs the user's own file (normalised input, mean-pooled map)."""
    import onnxruntime as ort

    from embedder import Embedder

    card = _card(tmp_path, name="tiny-onnx", format="onnx", path=onnx_file, pool="spatial_mean")
    with Embedder(model="tiny-onnx", device="cpu", runtime=runtime, cache_dir=cache_dir,
                  model_cards=card) as emb:
        assert emb.dim == 16 and emb.spec.preprocessing.crop == SIZE  # read from the file's static shape
        got = emb.embed(photos)
        crops = np.stack([emb.prepare(p) for p in photos])
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    fmap = session.run(None, {"input": _normalised(crops)})[0]
    want = fmap.mean(axis=(2, 3))
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert cosine(got, want).min() >= 0.9999


def test_torchscript_card_equals_the_module(torchscript_file, photos, tmp_path, cache_dir, restore_registry):
    import torch

    from embedder import Embedder

    card = _card(tmp_path, name="tiny-ts", format="torchscript", path=torchscript_file, input_size=SIZE,
                 mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    module = torch.jit.load(str(torchscript_file))
    for runtime in ("torch", "onnxruntime"):
        with Embedder(model="tiny-ts", device="cpu", runtime=runtime, cache_dir=cache_dir,
                      model_cards=card) as emb:
            got = emb.embed(photos)
            crops = np.stack([emb.prepare(p) for p in photos])
        with torch.inference_mode():
            want = module(torch.from_numpy(_normalised(crops, (0.5,) * 3, (0.25,) * 3))).numpy()
        assert cosine(got, want).min() >= 0.9999, runtime


def test_torchvision_and_timm_cards(tmp_path, photo_arrays, cache_dir, restore_registry):
    """A torchvision state dict loses its classifier; a timm state dict is built with pretrained=False and no
    classifier; both embed as the library's own module on the same crops."""
    import timm
    import torch
    import torchvision

    from embedder import Embedder
    from embedder.backbones import _strip_head

    torch.manual_seed(0)
    tv = torchvision.models.get_model("resnet18", weights=None, num_classes=10).eval()
    torch.save(tv.state_dict(), tmp_path / "r18.pt")
    tm = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    torch.save(tm.state_dict(), tmp_path / "r10t.pt")
    cards = (_card(tmp_path, name="tv", format="torchvision", arch="resnet18", path=tmp_path / "r18.pt",
                   input_size=64),
             _card(tmp_path, name="tm", format="timm", arch="resnet10t", path=tmp_path / "r10t.pt", input_size=64))
    tm.reset_classifier(0)
    images = [np.ascontiguousarray(a[:256, :256]) for a in list(photo_arrays.values())[:3]]
    for name, reference in (("tv", _strip_head(tv)), ("tm", tm)):
        with Embedder(model=name, device="cpu", runtime="torch", cache_dir=cache_dir,
                      model_cards=":".join(cards)) as emb:
            got = emb.embed(images)
            crops = np.stack([emb.prepare(a) for a in images])
        with torch.inference_mode():
            want = reference(torch.from_numpy(_normalised(crops))).numpy()
        assert got.shape[1] == want.shape[1] == 512
        assert cosine(got, want).min() >= 0.9999, name


def test_card_model_id_covers_files_recipe_and_output(onnx_file, tmp_path, restore_registry):
    """The id changes with the file, the preprocessing and the pooling; the pinned sha256 is the file's."""
    from embedder.cards import ModelCard, register_card

    sha = hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    base = dict(name="a", format="onnx", path=onnx_file, pool="spatial_mean")
    spec = register_card(ModelCard(**base, sha256=sha))
    assert spec.weights.sha256 == sha and spec.model_id.startswith(f"a:{sha[:12]}:pp")
    other_pool = register_card(ModelCard(**{**base, "name": "b", "pool": "first_token", "dim": 16 * 16}))
    other_mean = register_card(ModelCard(**{**base, "name": "c", "mean": (0.5, 0.5, 0.5)}))
    suffixes = {s.model_id.split(":", 1)[1] for s in (spec, other_pool, other_mean)}
    assert len(suffixes) == 3
    assert register_card(ModelCard(**base, sha256=sha)) is spec  # the same card again: a no-op


@pytest.mark.parametrize("change, error, words", [
    ({"path": "missing.onnx"}, "WeightsNotFoundError", ["does not exist", "fix `path`"]),
    ({"sha256": "0" * 64}, "WeightsHashError", ["pins", "update `sha256`"]),
    ({"format": "caffe"}, "ModelCardError", ["unknown format", "onnx, torchscript"]),
    ({"format": "timm"}, "ModelCardError", ["needs `arch`"]),
    ({"pool": "max"}, "ModelCardError", ["pool must be one of"]),
    ({"input_size": 64}, "ModelCardError", ["set input_size = 32"]),
    ({"output": "nope"}, "ModelCardError", ["no output 'nope'", "fmap"]),
    ({"pool": "none"}, "ModelCardError", ["outputs 4-d tensors", "set the card's `pool`"]),
    ({"colour": "red"}, "ModelCardError", ["unknown key(s) colour"]),
    ({"name": "../evil"}, "ModelCardError", ["not usable"]),
    ({"name": "mobilenet_v2"}, "ModelCardError", ["already registered", "another `name`"]),
])
def test_card_refusals_name_the_fix(onnx_file, tmp_path, cache_dir, restore_registry, change, error, words):
    import embedder.errors as errors
    from embedder import Embedder

    fields = {"name": "bad", "format": "onnx", "path": onnx_file, "pool": "spatial_mean", **change}
    card = _card(tmp_path, **fields)
    with pytest.raises(getattr(errors, error)) as e:
        with Embedder(model="bad", device="cpu", runtime="onnxruntime", cache_dir=cache_dir, model_cards=card):
            pass
    assert all(w in str(e.value) for w in words), str(e.value)


def test_onnx_card_on_torch_runtime_and_text_on_image_model(onnx_file, tmp_path, cache_dir, restore_registry):
    from embedder import Embedder
    from embedder.errors import NotSupportedByModelError

    card = _card(tmp_path, name="tiny-onnx", format="onnx", path=onnx_file, pool="spatial_mean")
    with pytest.raises(NotSupportedByModelError, match="onnxruntime or openvino"):
        Embedder(model="tiny-onnx", device="cpu", runtime="torch", cache_dir=cache_dir, model_cards=card)
    with Embedder(model="tiny-onnx", device="cpu", runtime="onnxruntime", cache_dir=cache_dir,
                  model_cards=card) as emb:
        with pytest.raises(NotSupportedByModelError, match="no text tower"):
            emb.embed_texts(["a cat"])


def test_toml_card_served_by_a_real_server_with_cache_collections_and_heads(onnx_file, tmp_path, photos, cache_dir,
                                                                             restore_registry):
    """`embedder serve --model-card` as the server sees it: the card model is the default model, its vectors
    are cached, a collection binds to it and a head trains and predicts on it."""
    from embedder.client import EmbedderClient

    from embedder.config import Config
    from embedder.server import EmbedderServer

    card = onnx_file.parent / "tiny.toml"  # the file named relative to the card
    card.write_text('name = "tiny-onnx"\nformat = "onnx"\npath = "tiny.onnx"\npool = "spatial_mean"\n')
    config = Config.from_env(environ={"EMBEDDER_MODEL_CARDS": str(card)}, port=0, model="tiny-onnx", device="cpu",
                             runtime="onnxruntime", cache_dir=cache_dir, data_dir=tmp_path / "data")
    server = EmbedderServer(config)
    server.start()
    try:
        server.load()
        with EmbedderClient(f"127.0.0.1:{server.port}") as client:
            _use_card_model(client, photos)
    finally:
        server.stop(grace=1)


def _use_card_model(client, photos) -> None:
    first = list(client.embed_iter(photos))
    again = list(client.embed_iter(photos))
    assert first[0].model_id.startswith("tiny-onnx:") and first[0].vector.shape == (16,)
    assert all(r.cached for r in again)
    assert np.allclose(np.stack([r.vector for r in first]), np.stack([r.vector for r in again]))
    labels = ["a", "a", "a", "b", "b", "b"]
    client.add("mine", photos, ids=[f"p{i}" for i in range(len(photos))], labels=labels)
    assert client.search(photos[4], collection="mine", k=1)[0].id == "p4"
    head = client.train("mine", test_size=0.5)
    assert head["model_id"] == first[0].model_id
    predicted = [p.labels[0] for p in client.predict(head["head_id"], ids=[f"p{i}" for i in range(6)],
                                                       collection="mine")]
    assert set(predicted) <= {"a", "b"} and len(predicted) == 6

def test_models_command_lists_cards(onnx_file, tmp_path):
    card = _card(tmp_path, name="tiny-onnx", format="onnx", path=onnx_file, pool="spatial_mean")
    out = subprocess.run([sys.executable, "-m", "embedder.cli", "models", "--json", "--model-card", card],
                         capture_output=True, text=True, check=True).stdout
    row = next(m for m in json.loads(out)["models"] if m["name"] == "tiny-onnx")
    assert row["dim"] == 16 and row["input_size"] == SIZE and row["weights"] == "installed"


def test_pool_loads_a_card_model_on_first_use_beside_the_default(onnx_file, tmp_path, photos, embedder, cache_dir,
                                                                 restore_registry):
    """A server on the default backbone loads a card's model when a call names it; each keeps its own cache."""
    from embedder.config import Config
    from embedder.core import Item, Service

    card = _card(tmp_path, name="tiny-onnx", format="onnx", path=onnx_file, pool="spatial_mean")
    config = Config.from_env(environ={}, data_dir=tmp_path / "data", cache_dir=cache_dir, runtime="onnxruntime",
                             model_cards=card)
    with Service.open(config, embedder=embedder) as service:
        mine = service.embed([Item(image=photos[0])], model="tiny-onnx")
        default = service.embed([Item(image=photos[0])])
        again = service.embed([Item(image=photos[0])], model="tiny-onnx").outcomes[0]
        assert mine.model.name == "tiny-onnx" and mine.outcomes[0].vector.shape == (16,)
        assert default.model.name == "mobilenet_v2" and default.outcomes[0].vector.shape == (1280,)
        assert again.cached and np.array_equal(again.vector, mine.outcomes[0].vector)
        assert [m["name"] for m in service.list_models()] == ["mobilenet_v2", "tiny-onnx"]


def test_an_onnx_card_never_loads_torch(onnx_file, tmp_path, photos):
    """The wrapped graph is built with onnx alone: a process serving an ONNX card imports no torch, even on its
    first start (nothing cached)."""
    card = _card(tmp_path, name="tiny-onnx", format="onnx", path=onnx_file, pool="spatial_mean")
    (tmp_path / "photo.jpg").write_bytes(photos[0])
    code = ("import sys; from embedder import Embedder\n"
            f"with Embedder(model='tiny-onnx', device='cpu', runtime='onnxruntime', cache_dir={str(tmp_path)!r},"
            f" model_cards={card!r}) as emb:\n"
            f"    assert emb.embed([open({str(tmp_path / 'photo.jpg')!r}, 'rb').read()]).shape == (1, 16)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
