"""Feature recipes and backbone ensembles (embedder.recipes): names, model ids, and vectors checked against a
reference torch computation and against each member served alone, on real weights."""
from __future__ import annotations

import json
import subprocess
import sys
from itertools import pairwise

import numpy as np
import pytest
import requests
from conftest import cosine, http_door, running_server

STAGES_5_7 = (13, 16, 17)  # mobilenet_v2's features[i] ending MBConv stages 5, 6 and 7 (96, 160, 320 channels)


def test_names_are_canonical_and_each_recipe_has_its_own_model_id():
    from embedder import get_backbone

    plain = get_backbone("mobilenet_v2")
    staged = get_backbone("mobilenet_v2@stages=5-7,flip")
    assert get_backbone("mobilenet_v2@flip,stages=5-7") == staged  # one recipe, however its options are ordered
    assert staged.name == "mobilenet_v2@stages=5-7,flip" and staged.dim == 1280 + 96 + 160 + 320
    assert get_backbone(staged.model_id) == staged  # a recipe's model id names it, like any model's
    ensemble = get_backbone("mobilenet_v2+efficientnet_lite2@stages=7")
    assert ensemble.dim == 1280 + 1280 + 352
    assert ensemble.preprocessing == get_backbone("efficientnet_lite2").preprocessing  # the larger crop decodes
    ids = {s.model_id for s in (plain, staged, ensemble, get_backbone("mobilenet_v2@stages=5-7"),
                                get_backbone("mobilenet_v2@flip"), get_backbone("mobilenet_v2@stages=6-7"),
                                get_backbone("efficientnet_lite2+mobilenet_v2"),
                                get_backbone("mobilenet_v2+efficientnet_lite2"))}
    assert len(ids) == 8


@pytest.mark.parametrize("name, words", [
    ("mobilenet_v2@", "unknown or repeated option ''"),
    ("mobilenet_v2@stages=0-3", "need 1 <= A <= B <= 7"),
    ("mobilenet_v2@stages=7-5", "need 1 <= A <= B <= 7"),
    ("mobilenet_v2@stages=5-8", "need 1 <= A <= B <= 7"),
    ("mobilenet_v2@flip,flip", "unknown or repeated option 'flip'"),
    ("mobilenet_v2@mirror", "unknown or repeated option 'mirror'"),
    ("+mobilenet_v2", "empty member"),
    ("+".join(["mobilenet_v2"] * 21), "21 members: an ensemble has at most 4"),
    ("mobilenet_v2+efficientnet_lite2+efficientnet_lite0+mobilenet_v2@flip+efficientnet_lite2@flip",
     "5 members: an ensemble has at most 4"),
    ("mobilenet_v2+" + "a" * 400, "413 characters.*at most 400"),
    ("mobilenet_v2+mobilenet_v2", "names mobilenet_v2 twice"),
    ("mobilenet_v2@flip,stages=5-7+mobilenet_v2@stages=5-7,flip", "names mobilenet_v2@stages=5-7,flip twice"),
    ("mobilenet_v2@stages=\uff15-\uff17", "unknown or repeated option"),  # fullwidth digits
    ("mobilenet_v2@stages=\u0665", "unknown or repeated option"),  # an Arabic-Indic five
])
def test_a_bad_recipe_name_says_the_valid_forms(name, words):
    from embedder import get_backbone
    from embedder.errors import Category, InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=words) as err:
        get_backbone(name)
    assert err.value.category == Category.INVALID_ARGUMENT
    assert "stages=" in str(err.value)  # the message names what to write instead


def test_an_unknown_member_is_an_unknown_model_and_names_clash_with_nothing(restore_registry):
    from embedder.backbones import register_backbone
    from embedder.catalog import get_backbone
    from embedder.errors import UnknownModelError

    with pytest.raises(UnknownModelError, match="'resnet9'.*NAME@stages=A-B"):
        get_backbone("mobilenet_v2+resnet9")
    with pytest.raises(UnknownModelError):  # a model id whose recipe fingerprint is not this version's
        get_backbone(get_backbone("mobilenet_v2@flip").model_id[:-1] + "0")
    from dataclasses import replace

    with pytest.raises(ValueError, match="reserved for recipes"):
        register_backbone(replace(get_backbone("mobilenet_v2"), name="mine@flip"))


def test_stage_table_matches_the_networks():
    """STAGES is what the networks are: each stage ends where the block output channels change."""
    from embedder.backbones import load_backbone, split_layers
    from embedder.catalog import get_backbone
    from embedder.recipes import STAGES

    for arch, stages in STAGES.items():
        _, blocks, _ = split_layers(load_backbone(get_backbone(arch)), arch)
        channels = [getattr(b, "out_channels", None) or b._block_args.output_filters for b in blocks]
        ends = [(i + 1, c) for i, c in enumerate(channels) if i + 1 == len(channels) or c != channels[i + 1]]
        assert tuple(ends) == stages, arch


def _reference(crops: np.ndarray, taps: tuple[int, ...], flip: bool) -> np.ndarray:
    """mobilenet_v2 in plain torch with forward hooks: the pooled taps and final vector, each L2-normalised,
    concatenated, mirror-averaged; L2-normalised as the Embedder returns it."""
    import torch
    import torch.nn.functional as F

    from embedder.backbones import IMAGENET_MEAN, IMAGENET_STD, load_backbone
    from embedder.catalog import get_backbone

    net = load_backbone(get_backbone("mobilenet_v2"))
    pooled = {}
    for i in taps:
        net.features[i].register_forward_hook(lambda _m, _in, out, i=i: pooled.__setitem__(i, out.mean((2, 3))))
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def vector(images: torch.Tensor) -> torch.Tensor:
        final = net(images)
        return torch.cat([F.normalize(pooled[i], dim=1) for i in taps] + [F.normalize(final, dim=1)], 1)

    with torch.no_grad():
        v = (vector(x) + vector(x.flip(3))) / 2 if flip else vector(x)
    return F.normalize(v, dim=1).numpy()


def test_recipe_vectors_equal_a_reference_torch_computation(photos, cache_dir):
    """mobilenet_v2@stages=5-7,flip exported to ONNX on the default CPU runtime equals hooks on the torchvision
    network; without flip it differs (mirroring matters), and its final part is the plain model's vector."""
    from embedder import Embedder

    with Embedder(model="mobilenet_v2@stages=5-7,flip", device="cpu", cache_dir=cache_dir) as emb:
        crops = np.stack([emb.prepare(p) for p in photos])
        got = emb.embed(photos)
    assert got.shape == (len(photos), 1856)
    assert cosine(got, _reference(crops, STAGES_5_7, flip=True)).min() >= 0.9999
    unflipped = _reference(crops, STAGES_5_7, flip=False)
    assert cosine(got, unflipped).min() < 0.9999
    with Embedder(model="mobilenet_v2@stages=5-7", device="cpu", cache_dir=cache_dir) as emb:
        staged = emb.embed(photos)
    assert cosine(staged, unflipped).min() >= 0.9999
    with Embedder(model="mobilenet_v2", device="cpu", cache_dir=cache_dir) as emb:
        plain = emb.embed(photos)
    assert cosine(staged[:, -1280:], plain).min() >= 0.9999


def _slices(vectors: np.ndarray, dims: list[int]) -> list[np.ndarray]:
    return [vectors[:, a:b] for a, b in pairwise(np.cumsum([0, *dims]))]


def test_ensemble_slices_equal_each_member_alone(photos, cache_dir):
    """One decode feeds both members. With the lead's input a member's slice is its own vector; a member whose
    input the graph resizes, renormalises or decodes with another filter stays close to its own vector."""
    from embedder import Embedder

    def embed(model: str) -> np.ndarray:
        with Embedder(model=model, device="cpu", cache_dir=cache_dir) as emb:
            return emb.embed(photos)

    alone = {m: embed(m) for m in ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite2")}
    # same crop (224): mobilenet_v2, first, decodes (bilinear); efficientnet_lite0 gets it renormalised to [-1, 1]
    mb, lite0 = _slices(embed("mobilenet_v2+efficientnet_lite0"), [1280, 1280])
    assert cosine(mb, alone["mobilenet_v2"]).min() >= 0.9999
    assert cosine(lite0, alone["efficientnet_lite0"]).min() >= 0.98  # bilinear, not its own bicubic, decode
    # efficientnet_lite2's 260 crop decodes; mobilenet_v2 gets it resized to 224 inside the graph
    mb, _stage7, lite2_final = _slices(embed("mobilenet_v2+efficientnet_lite2@stages=7"), [1280, 352, 1280])
    assert cosine(lite2_final, alone["efficientnet_lite2"]).min() >= 0.9999
    assert cosine(mb, alone["mobilenet_v2"]).min() >= 0.9
    assert np.allclose(np.linalg.norm(mb, axis=1), 0.5 ** 0.5, atol=1e-4)  # each member weighs the same


def test_a_recipe_collection_refuses_the_plain_models_vectors(photos, tmp_path, embedder, cache_dir):
    """A collection made with a recipe model binds to its model id: adding with the plain backbone is refused."""
    from embedder.config import Config
    from embedder.core import AddItem, Item, Service
    from embedder.errors import ModelMismatchError

    config = Config.from_env(environ={}, data_dir=tmp_path / "data", cache_dir=cache_dir)
    with Service.open(config, embedder=embedder) as service:
        service.add("shoes", [AddItem(Item(id="a", image=photos[0]))], model="mobilenet_v2@stages=6-7")
        assert service.store.collection("shoes").model_id.startswith("mobilenet_v2@stages=6-7:")
        plain = embedder.embed(photos[1:2])
        with pytest.raises(ModelMismatchError, match="holds vectors of model mobilenet_v2@stages=6-7:"):
            service.store.add("shoes", ["b"], plain, model_id=embedder.model_id)


def test_models_command_says_how_to_name_recipes():
    out = subprocess.run([sys.executable, "-m", "embedder.cli", "models", "--json"], capture_output=True, text=True,
                         check=True).stdout
    recipes = json.loads(out)["recipes"]
    assert "NAME@stages=A-B" in recipes["forms"]
    example = next(r for r in recipes["examples"] if r["name"] == "mobilenet_v2+efficientnet_lite2")
    assert example["dim"] == 2560 and example["input_size"] == 260


def test_onnx_cards_cannot_be_members(tmp_path, restore_registry):
    import torch
    from torch import nn

    from embedder import get_backbone
    from embedder.cards import register_cards
    from embedder.errors import InvalidArgumentError

    path = tmp_path / "tiny.onnx"
    torch.onnx.export(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval(),
                      (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["out"], dynamic_axes={"input": {0: "n"}, "out": {0: "n"}})
    card = tmp_path / "tiny.json"
    card.write_text(json.dumps({"name": "tiny-onnx", "format": "onnx", "path": str(path)}))
    register_cards([card])
    with pytest.raises(InvalidArgumentError, match="'tiny-onnx' cannot be part of a recipe or ensemble"):
        get_backbone("mobilenet_v2+tiny-onnx")


def test_names_beyond_the_limits_are_refused_at_every_door_before_a_graph_is_built(embedder, cache_dir):
    """Over-long and repeated-member names were 500s (the ONNX file name was too long) after seconds of graph
    building; every door now answers 400 / INVALID_ARGUMENT at once, naming the limit."""
    import time

    import grpc

    from embedder._proto import embedder_pb2 as pb
    from embedder._proto import embedder_pb2_grpc as pb_grpc

    names = {"+".join(["mobilenet_v2"] * 21): "at most 4",  # 272 characters
             "+".join(["mobilenet_v2"] * 15): "at most 4",  # 194: built the whole graph, then failed
             "mobilenet_v2+mobilenet_v2": "twice"}
    with running_server(embedder, cache_dir=cache_dir) as server, http_door(server) as http, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.EmbedderStub(channel)
        for name, words in names.items():
            started = time.monotonic()
            answer = requests.post(f"{http.url}/v1/embeddings", json={"model": name, "input": "aGk="}, timeout=60)
            assert answer.status_code == 400 and words in answer.text, answer.text
            answer = requests.put(f"{http.url}/v1/collections/c", json={"model": name}, timeout=60)
            assert answer.status_code == 400 and words in answer.text, answer.text
            for call, request in ((stub.Embed, pb.EmbedRequest(model=name, items=[pb.Item(image=b"x")])),
                                  (stub.CreateCollection, pb.CreateCollectionRequest(collection="c", model=name))):
                with pytest.raises(grpc.RpcError) as err:
                    call(request, timeout=60)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
            assert time.monotonic() - started < 5  # refused by the parser, not after building the ensemble


def test_serve_refuses_an_ensemble_beyond_the_limit_with_exit_code_2(tmp_path, cache_dir):
    """`embedder serve --model` with a 21-member ensemble died on a raw OSError (file name too long)."""
    import os

    name = "+".join(["mobilenet_v2"] * 21)
    env = {**os.environ, "EMBEDDER_CACHE_DIR": str(cache_dir), "EMBEDDER_DATA_DIR": str(tmp_path / "data"),
           "EMBEDDER_RUNTIME_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "embedder.cli", "serve", "--model", name, "--port", "0"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and "21 members: an ensemble has at most 4" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
