"""Text-image models from a Hugging Face folder: a small randomly initialised CLIPModel (transformers) with its
processor and tokenizer saved by the test, served through a model card and checked against the library's own
``get_image_features`` / ``get_text_features``; text-to-image and image-to-text search; zero-shot heads."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import cosine, http_door

SIZE = 32
TEXTS = ["a photo of a cat", "a photo of a dog", "a rocket", "coffee", "an astronaut", "a red flower"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A 2-layer CLIP (32-px images, 16-d space) with a byte-level BPE tokenizer, saved with save_pretrained."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = tmp_path_factory.mktemp("clip")
    chars = list(bytes_to_unicode().values())
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    vocab = chars + [c + "</w>" for c in chars] + ["ca", "cat</w>", "do", "dog</w>", "<|startoftext|>",
                                                    "<|endoftext|>"]
    CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges).save_pretrained(path)
    n = len(vocab)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=n, max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1,
                         pad_token_id=n - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SIZE, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(clip_dir):
    """The library's own model, tokenizer and processor, loaded from the folder."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    return (CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval(),
            AutoTokenizer.from_pretrained(clip_dir, local_files_only=True),
            CLIPImageProcessor.from_pretrained(clip_dir, local_files_only=True))


@pytest.fixture(scope="module")
def card(clip_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("card") / "clip.json"
    path.write_text(json.dumps({"name": "tiny-clip", "format": "transformers", "path": str(clip_dir)}))
    return str(path)


def _unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pixels(crops: np.ndarray, processor):
    """Our uint8 crops, normalised as the folder's processor says: the reference model's input."""
    import torch

    x = (crops.astype(np.float32) / 255.0 - np.asarray(processor.image_mean, np.float32)) / np.asarray(
        processor.image_std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _features(out):
    """transformers 5 returns an output object from get_*_features, 4.x a tensor."""
    return out if hasattr(out, "dim") else out.pooler_output


def _reference_images(reference, crops) -> np.ndarray:
    import torch

    model, _, processor = reference
    with torch.inference_mode():
        return _unit(_features(model.get_image_features(pixel_values=_pixels(crops, processor))).numpy())


def _reference_texts(reference, texts) -> np.ndarray:
    import torch

    model, tokenizer, _ = reference
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return _unit(_features(model.get_text_features(input_ids=batch["input_ids"],
                                                       attention_mask=batch["attention_mask"])).numpy())


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_clip_card_image_and_text_vectors_equal_the_library(card, reference, photos, cache_dir, restore_registry,
                                                            runtime):
    from embedder import Embedder

    with Embedder(model="tiny-clip", device="cpu", runtime=runtime, cache_dir=cache_dir, model_cards=card) as emb:
        pp = emb.spec.preprocessing
        assert (pp.resize, pp.crop, pp.interpolation) == (SIZE, SIZE, "bicubic")  # read from the folder
        assert emb.info()["text"] and emb.dim == 16
        images = emb.embed(photos)
        crops = np.stack([emb.prepare(p) for p in photos])
        texts = emb.embed_texts(TEXTS)
    assert cosine(images, _reference_images(reference, crops)).min() >= 0.9999
    assert cosine(texts, _reference_texts(reference, TEXTS)).min() >= 0.9999


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A 2-layer SigLIP (32-px images, 32-d space) with a unigram tokenizer that, like SigLIP's own, returns input
    ids only (no attention mask: SigLIP reads texts padded to a fixed length), saved with save_pretrained."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel

    path = tmp_path_factory.mktemp("siglip")
    words = sorted({w for t in TEXTS for w in t.split()})
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
             + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz\u2581"])
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=16, model_input_names=["input_ids"]).save_pretrained(path)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = SiglipConfig(text_config=dict(layers, vocab_size=len(vocab), max_position_embeddings=16, pad_token_id=0,
                                           eos_token_id=1),
                          vision_config=dict(layers, image_size=SIZE, patch_size=8))
    torch.manual_seed(0)
    SiglipModel(config).eval().save_pretrained(path)
    SiglipImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(path)
    return path


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_siglip_card_vectors_equal_the_library(siglip_dir, photos, cache_dir, restore_registry, tmp_path, runtime):
    """A SigLIP folder: images through the card (resize to 32 x 32, mean/std 0.5) and texts padded to the fixed
    length, as SigLIP was trained, equal SiglipModel's own features; text-to-image ranking follows."""
    import torch
    from transformers import AutoTokenizer, SiglipImageProcessor, SiglipModel

    from embedder import Embedder

    card = tmp_path / "siglip.json"
    card.write_text(json.dumps({"name": "tiny-siglip", "format": "transformers", "path": str(siglip_dir)}))
    model = SiglipModel.from_pretrained(siglip_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(siglip_dir, local_files_only=True)
    processor = SiglipImageProcessor.from_pretrained(siglip_dir, local_files_only=True)
    with Embedder(model="tiny-siglip", device="cpu", runtime=runtime, cache_dir=cache_dir, model_cards=str(card)) as emb:
        assert emb.info()["text"] and emb.dim == 32
        images = emb.embed(photos)
        crops = np.stack([emb.prepare(p) for p in photos])
        texts = emb.embed_texts(TEXTS)
    ids = tokenizer(TEXTS, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        want_images = _unit(_features(model.get_image_features(pixel_values=_pixels(crops, processor))).numpy())
        want_texts = _unit(_features(model.get_text_features(input_ids=ids)).numpy())
    assert cosine(images, want_images).min() >= 0.9999
    assert cosine(texts, want_texts).min() >= 0.9999
    for i in range(3):
        assert list(np.argsort(-(images @ texts[i]), kind="stable")) == list(
            np.argsort(-(want_images @ want_texts[i]), kind="stable"))


def test_our_preprocessing_matches_the_folders_processor(card, reference, photo_arrays, cache_dir, restore_registry):
    """The recipe read from preprocessor_config.json (shorter side, center crop, bicubic, CLIP mean/std) gives
    the vectors the library's processor does, within resampling differences."""
    import torch
    from PIL import Image

    from embedder import Embedder

    model, _, processor = reference
    images = [Image.fromarray(a) for a in photo_arrays.values()]
    with torch.inference_mode():
        want = _unit(_features(model.get_image_features(
            pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])).numpy())
    with Embedder(model="tiny-clip", device="cpu", runtime="torch", cache_dir=cache_dir, model_cards=card) as emb:
        got = emb.embed([np.asarray(i) for i in images])
    assert cosine(got, want).min() >= 0.99


def test_text_to_image_and_image_to_text_search_on_a_real_server(card, reference, photos, tmp_path, cache_dir,
                                                                 restore_registry):
    """Through gRPC: text queries rank the photo collection as the reference similarity does, an image query
    ranks a collection of texts likewise, and a repeated text is a cache hit."""
    from embedder.client import EmbedderClient, Text
    from embedder.config import Config
    from embedder.server import EmbedderServer

    config = Config.from_env(environ={}, port=0, model="tiny-clip", device="cpu", runtime="onnxruntime",
                             cache_dir=cache_dir, data_dir=tmp_path / "data", model_cards=card)
    server = EmbedderServer(config)
    server.start()
    try:
        server.load()
        with EmbedderClient(f"127.0.0.1:{server.port}") as client:
            assert client.list_models()[0]["text"] is True
            ids = [f"p{i}" for i in range(len(photos))]
            client.add("photos", photos, ids=ids)
            client.add("captions", [Text(t) for t in TEXTS], ids=TEXTS)
            image_vectors = np.stack([s.vector for s in client.get("photos", ids)])
            text_vectors = _reference_texts(reference, TEXTS)
            for i, text in enumerate(TEXTS[:3]):
                hits = client.search(Text(text), collection="photos", k=len(ids))
                want = [ids[j] for j in np.argsort(-(image_vectors @ text_vectors[i]), kind="stable")]
                assert [h.id for h in hits] == want
            hits = client.search(photos[0], collection="captions", k=len(TEXTS))
            want = [TEXTS[j] for j in np.argsort(-(text_vectors @ image_vectors[0]), kind="stable")]
            assert [h.id for h in hits] == want
            again = list(client.embed_iter([Text(TEXTS[0])]))
            assert again[0].cached and cosine(again[0].vector[None], text_vectors[:1])[0] >= 0.9999
            by_text = [h.id for h in client.search(Text(TEXTS[1]), collection="photos", k=3)]
        _http_and_cli_take_text(server, config, by_text, text_vectors, card, tmp_path)
    finally:
        server.stop(grace=1)


def _http_and_cli_take_text(server, config, by_text: list[str], text_vectors, card, tmp_path) -> None:
    """The HTTP door and the CLI search by text and train a zero-shot head, as the gRPC client does; the CLI
    embeds text on the server and here."""
    import subprocess
    import sys

    import requests

    with http_door(server, config) as http:
        found = requests.post(f"{http.url}/v1/search", json={"collection": "photos", "item": {"text": TEXTS[1]},
                                                             "k": 3}, timeout=30)
        assert found.status_code == 200 and [h["id"] for h in found.json()["hits"]] == by_text
        trained = requests.post(f"{http.url}/v1/collections/photos/train", timeout=60, json={
            "head": "zero_shot", "class_prompts": {"cat": ["a photo of a {label}"], "dog": ["a {label}"]}})
        assert trained.status_code == 200 and trained.json()["head"]["kind"] == "zero_shot"
        refused = requests.post(f"{http.url}/v1/embed", json={"items": [{"text": "  "}]}, timeout=30)
        assert "text is empty" in refused.json()["results"][0]["error"]["message"]
        _openai_takes_text(http.url, text_vectors)
    cli = [sys.executable, "-m", "embedder.cli"]
    server_flag = ["--server", f"127.0.0.1:{server.port}"]
    out = subprocess.run([*cli, "search", "--text", TEXTS[1], "--collection", "photos", "-k", "3", "--json",
                          *server_flag], capture_output=True, text=True, check=True).stdout
    assert [h["id"] for h in json.loads(out)] == by_text
    out = subprocess.run([*cli, "train", "--collection", "photos", "--head", "zero_shot", "--prompt",
                          "cat=a photo of a {label}", "--prompt", "dog=a photo of a {label}", "--json", *server_flag],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["classes"] == ["cat", "dog"]
    vectors = tmp_path / "texts.npy"
    subprocess.run([*cli, "embed", "--text", TEXTS[0], "--text", TEXTS[1], "--out", str(vectors), *server_flag],
                   capture_output=True, text=True, check=True)
    assert cosine(np.load(vectors), text_vectors[:2]).min() >= 0.9999
    assert json.loads(vectors.with_suffix(".json").read_text())["texts"] == TEXTS[:2]
    local = tmp_path / "local.npy"  # here, the card by flag
    subprocess.run([*cli, "embed", "--text", TEXTS[2], "--out", str(local), "--model-card", card, "--model",
                    "tiny-clip", "--device", "cpu", "--runtime", "torch", "--cache-dir", str(config.cache_dir)],
                   capture_output=True, text=True, check=True)
    assert cosine(np.load(local), text_vectors[2:3]).min() >= 0.9999


def _openai_takes_text(url: str, text_vectors) -> None:
    """OpenAI's client embeds texts with a text-image model: plain strings are texts, data: URIs images, and
    `modality` (extra_body) says what every input is."""
    import base64

    import openai
    import requests

    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    got = oai.embeddings.create(input=TEXTS[:2], model="tiny-clip", encoding_format="float")
    assert cosine(np.array([d.embedding for d in got.data]), text_vectors[:2]).min() >= 0.9999
    photo = requests.get(f"{url}/v1/collections/photos/image", params={"id": "p0"}, timeout=30).content
    uri = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
    mixed = oai.embeddings.create(input=[uri, TEXTS[0]], model="tiny-clip", encoding_format="float").data
    stored = requests.post(f"{url}/v1/collections/photos/get", json={"ids": ["p0"], "encoding_format": "float"},
                           timeout=30).json()["items"][0]["vector"]
    assert cosine(np.array([mixed[0].embedding]), np.array([stored]))[0] >= 0.9999
    assert cosine(np.array([mixed[1].embedding]), text_vectors[:1])[0] >= 0.9999
    forced = oai.embeddings.create(input=["a photo"], model="tiny-clip", encoding_format="float",
                                   extra_body={"modality": "text"}).data[0].embedding
    assert len(forced) == text_vectors.shape[1]
    with pytest.raises(openai.BadRequestError) as e:  # told it is an image: a text is not base64
        oai.embeddings.create(input=[TEXTS[0]], model="tiny-clip", extra_body={"modality": "image"})
    assert "input[0]: image is not valid base64" in e.value.message


def test_zero_shot_head_predicts_the_reference_argmax(card, reference, photos, tmp_path, cache_dir,
                                                      restore_registry):
    """A zero-shot head from one prompt per class predicts, for each photo, the argmax of CLIPModel's own
    logits_per_image over those prompts; with two prompts per class it averages them (prompt ensembling)."""
    import torch

    from embedder.config import Config
    from embedder.core import AddItem, Item, Service

    labels = ["cat", "dog", "rocket", "coffee"]
    config = Config.from_env(environ={}, model="tiny-clip", device="cpu", runtime="onnxruntime", cache_dir=cache_dir,
                             data_dir=tmp_path / "data", model_cards=card)
    with Service.open(config) as service:
        trained = service.train("", head="zero_shot", class_prompts={c: ["a photo of a {label}"] for c in labels})
        head_id = trained.info.head_id
        assert trained.info.kind == "zero_shot" and trained.info.classes == sorted(labels)
        rows = service.predict([head_id], items=[Item(image=p) for p in photos], top_k=1).rows
        got = [r.tops[head_id][0][0] for r in rows]
        crops = np.stack([service.default.embedder.prepare(p) for p in photos])
        # few-shot: the same prompts, then the labelled photos of a collection
        given = [labels[i % len(labels)] for i in range(len(photos))]
        service.add("pets", [AddItem(Item(f"p{i}", image=p), label=given[i]) for i, p in enumerate(photos)])
        few = service.train("pets", head="few_shot", class_prompts={c: ["a photo of a {label}"] for c in labels},
                            params={"prior_weight": 0.0})
        assert few.info.kind == "few_shot" and few.samples == len(photos) and "prior" not in few.info.params
        alone = [i for i, c in enumerate(given) if given.count(c) == 1]  # its class vector is its own vector
        rows = service.predict([few.info.head_id], ids=[f"p{i}" for i in alone], collection="pets").rows
        assert [r.tops[few.info.head_id][0][0] for r in rows] == [given[i] for i in alone]
    model, tokenizer, processor = reference
    ordered = sorted(labels)
    batch = tokenizer([f"a photo of a {c}" for c in ordered], padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=_pixels(crops, processor)).logits_per_image.numpy()
    assert got == [ordered[j] for j in logits.argmax(axis=1)]


def test_text_and_zero_shot_refused_on_an_image_only_model(embedder, photos, tmp_path):
    """Text to an image-only model and a zero-shot head on one: each a clear error naming the fix."""
    from embedder.config import Config
    from embedder.core import Item, Service
    from embedder.errors import NotSupportedByModelError

    config = Config.from_env(environ={}, data_dir=tmp_path / "data")
    with Service.open(config, embedder=embedder) as service:
        outcome = service.embed([Item("t", text="a cat")]).outcomes[0]
        assert isinstance(outcome.error, NotSupportedByModelError) and "no text tower" in str(outcome.error)
        with pytest.raises(NotSupportedByModelError, match="needs a text-image model.*transformers model card"):
            service.train("", head="zero_shot", class_prompts={"cat": ["a cat"], "dog": ["a dog"]})


def test_a_vision_encoder_folder_gives_its_pooled_output(tmp_path, photos, cache_dir, restore_registry):
    """A plain transformers vision encoder (ViT): its pooled output is the embedding; it has no text tower."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from embedder import Embedder
    from embedder.errors import NotSupportedByModelError

    folder = tmp_path / "vit"
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=SIZE, patch_size=8)).eval()
    model.save_pretrained(folder)
    processor = ViTImageProcessor(size={"height": SIZE, "width": SIZE})
    processor.save_pretrained(folder)
    card = tmp_path / "vit.json"
    card.write_text(json.dumps({"name": "tiny-vit", "format": "transformers", "path": "vit"}))
    with Embedder(model="tiny-vit", device="cpu", runtime="onnxruntime", cache_dir=cache_dir,
                  model_cards=str(card)) as emb:
        assert emb.dim == 32 and not emb.info()["text"]
        got = emb.embed(photos)
        crops = np.stack([emb.prepare(p) for p in photos])
        with pytest.raises(NotSupportedByModelError, match="no text tower"):
            emb.embed_texts(["a cat"])
    with torch.inference_mode():
        want = model(pixel_values=_pixels(crops, processor)).pooler_output.numpy()
    assert cosine(got, want).min() >= 0.9999
