"""The Embedder pipeline: same vectors as plain torchvision, batch invariance, per-item errors."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from embedder import BatchError, BatchResult, Config, Embedder
from embedder.backbones import load_backbone
from embedder.catalog import get_backbone
from embedder.errors import EmbedderError, ImageDecodeError, UnknownModelError

from conftest import cosine


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def alone(embedder, photos):
    """Each photo embedded on its own (batch of one)."""
    return np.concatenate([embedder.embed([p]) for p in photos])


def test_matches_plain_torchvision(embedder, photos, torchvision_features):
    """JPEG bytes -> float32 (N, 1280) L2-normalised vectors equal to plain torchvision's (cosine >= 0.9999)."""
    got = embedder.embed(photos)
    assert got.dtype == np.float32 and got.shape == (len(photos), 1280)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert cosine(got, torchvision_features).min() >= 0.9999
    np.testing.assert_allclose(got, unit(torchvision_features), atol=2e-3)


def test_no_normalize_gives_the_raw_pooled_features(photos, torchvision_features, cache_dir):
    """normalize=False returns torchvision's raw pooled features (same scale, not unit length)."""
    with Embedder(model="mobilenet_v2", device="cpu", cache_dir=cache_dir, normalize=False) as emb:
        assert emb.info()["normalize"] is False
        got = emb.embed(photos)
    norms, ref_norms = np.linalg.norm(got, axis=1), np.linalg.norm(torchvision_features, axis=1)
    assert (np.abs(norms - 1) > 1).all()
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-3)
    assert cosine(got, torchvision_features).min() >= 0.9999
    # features reach ~4.4; the decoders' ±1-level rounding of a few pixels moves some by up to ~0.007
    np.testing.assert_allclose(got, torchvision_features, rtol=0, atol=1e-2)


def test_batch_invariance(embedder, photos, alone):
    """An item's vector does not depend on its position, its batch-mates or the batch size (within 1e-5)."""
    order = [4, 0, 5, 2, 1, 3]
    layouts = {
        "together": (embedder.embed(photos), list(range(6))),
        "reversed": (embedder.embed(photos[::-1]), list(range(6))[::-1]),
        "shuffled": (embedder.embed([photos[i] for i in order]), order),
        "with-duplicates": (embedder.embed([photos[1]] * 5 + [photos[3]]), [1] * 5 + [3]),
        "pair": (embedder.embed([photos[5], photos[2]]), [5, 2]),
    }
    for name, (vectors, idx) in layouts.items():
        assert 1 - cosine(vectors, alone[idx]).min() < 1e-5, name


def test_runtime_batch_sizes_agree(embedder, photos, alone):
    """The runtime itself gives the same vector for an image in batches of 1, 2, 3, 5, 7, 9 and 12 (on OpenVINO
    the first five run on models compiled for their shape, the last two on the dynamic-shape one)."""
    images = np.stack([embedder.prepare(p) for p in photos])
    for size in (1, 2, 3, 5, 7, 9, 12):
        batch = np.stack([images[(k * 5) % len(images)] for k in range(size)])
        out = unit(embedder.runtime.run(batch))
        idx = [(k * 5) % len(images) for k in range(size)]
        assert out.shape == (size, 1280)
        assert 1 - cosine(out, alone[idx]).min() < 1e-5, size


def test_micro_batch_setting_does_not_change_vectors(photos, alone, cache_dir):
    """micro_batch and decode_workers change only how work is split, not the result."""
    with Embedder(model="mobilenet_v2", device="cpu", cache_dir=cache_dir, micro_batch=5, decode_workers=1) as emb:
        assert emb.micro_batch == 5
        got = emb.embed(photos)
    assert 1 - cosine(got, alone).min() < 1e-5


def test_long_input_keeps_order(embedder, photos, alone):
    """More items than the decode look-ahead (64 on this 2-core CPU) come back in input order."""
    idx = [i % len(photos) for i in range(3, 3 + 150)]
    got = embedder.embed([photos[i] for i in idx])
    assert got.shape == (len(idx), 1280)
    assert 1 - cosine(got, alone[idx]).min() < 1e-5


def test_mixed_good_and_corrupt_batch(embedder, photos, alone):
    """embed_batch reports each bad item and leaves its row zero; the good rows equal those images alone."""
    truncated = photos[0][: len(photos[0]) // 3]
    items = [photos[1], b"", b"\x89PNG not really", truncated, photos[2],
             np.zeros((0, 5, 3), np.uint8), np.zeros((3, 224, 224), np.uint8), 7, photos[3]]
    result = embedder.embed_batch(items)
    assert isinstance(result, BatchResult)
    assert result.ok.tolist() == [True, False, False, False, True, False, False, False, True]
    assert result.vectors.shape == (9, 1280) and result.vectors.dtype == np.float32
    assert "empty" in result.errors[1]
    assert "not a recognised image format" in result.errors[2]
    assert "truncated" in result.errors[3]
    assert "no pixels" in result.errors[5]
    assert "not an image" in result.errors[6]
    assert "unsupported input type int" in result.errors[7]
    assert not result.vectors[~result.ok].any()
    assert 1 - cosine(result.vectors[[0, 4, 8]], alone[[1, 2, 3]]).min() < 1e-5


def test_embed_raises_batch_error_naming_the_bad_items(embedder, photos):
    """embed() refuses a batch with bad items: BatchError lists each index and why, and suggests embed_batch."""
    items = [photos[0], b"", photos[1], b"garbage"]
    with pytest.raises(BatchError) as e:
        embedder.embed(items)
    assert set(e.value.errors) == {1, 3}
    msg = str(e.value)
    assert msg.startswith("2 of 4 items could not be embedded")
    assert "item 1: empty input" in msg and "item 3: not a recognised image format" in msg
    assert "embed_batch" in msg
    assert isinstance(e.value, ValueError)


def test_batch_error_message_is_bounded(embedder):
    with pytest.raises(BatchError, match=r"^8 of 8 items .*item 4: .*\(and 3 more\)") as e:
        embedder.embed([b""] * 8)
    assert "item 5" not in str(e.value) and len(e.value.errors) == 8


def test_empty_input(embedder):
    """No items: an empty (0, 1280) float32 array, not an error."""
    for got in (embedder.embed([]), embedder.embed_batch([]).vectors,
                embedder.embed_arrays(np.zeros((0, 224, 224, 3), np.uint8))):
        assert got.shape == (0, 1280) and got.dtype == np.float32
    assert embedder.embed_batch([]).errors == []


def test_every_input_kind_gives_the_same_vector(embedder, photo_arrays, tmp_path, alone):
    """Bytes, a path (Path or str), a PIL image and an array of one photo embed identically."""
    arr = photo_arrays["chelsea"]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    (tmp_path / "cat.png").write_bytes(buf.getvalue())
    got = embedder.embed([buf.getvalue(), tmp_path / "cat.png", str(tmp_path / "cat.png"), Image.fromarray(arr),
                          arr])
    assert np.abs(got - got[0]).max() < 1e-5
    assert cosine(got[:1], alone[:1])[0] > 0.99  # the PNG of the photo vs its JPEG


def test_a_closed_embedder_says_so(photos, cache_dir):
    emb = Embedder(model="mobilenet_v2", device="cpu", cache_dir=cache_dir)
    emb.embed(photos[:1])
    emb.close()
    for call in (emb.embed, emb.embed_batch):
        with pytest.raises(EmbedderError, match="this Embedder is closed"):
            call(photos[:1])


def test_one_image_where_a_list_belongs_is_a_clear_type_error(embedder, photos, tmp_path):
    """Iterating one bytes object would embed each byte, one str path each letter."""
    for one in (photos[0], str(tmp_path / "cat.png"), tmp_path / "cat.png", None):
        for call in (embedder.embed, embedder.embed_batch):
            with pytest.raises(TypeError, match=r"pass a list of images, e.g. embed\(\[image\]\)"):
                call(one)


def test_prepare_and_embed_arrays(embedder, photos, alone):
    """prepare() gives the uint8 model input; embed_arrays() on those equals embed() on the bytes. A bad item
    raises its ImageDecodeError; in the decode pool its future holds that error object."""
    prepared = [embedder.prepare(p) for p in photos]
    assert all(a.dtype == np.uint8 and a.shape == (224, 224, 3) for a in prepared)
    assert 1 - cosine(embedder.embed_arrays(np.stack(prepared)), alone).min() < 1e-5
    with pytest.raises(ImageDecodeError, match="empty"):
        embedder.prepare(b"")
    assert isinstance(embedder.submit(b"").exception(), ImageDecodeError)
    assert embedder.submit(photos[0]).result().shape == (224, 224, 3)
    probe = embedder.probe(photos[0])
    assert probe.clean_jpeg and probe.pixels > 0
    np.testing.assert_array_equal(embedder.submit(photos[0], probe).result(), prepared[0])


def test_info_and_identity(embedder):
    info = embedder.info()
    assert info == {"name": "mobilenet_v2", "model_id": get_backbone("mobilenet_v2").model_id, "dim": 1280,
                     "device": "cpu", "runtime": embedder.runtime.name, "precision": "fp32", "input_size": 224,
                     "normalize": True, "text": False}
    assert embedder.dim == 1280 and embedder.model_id == info["model_id"]


def test_efficientnet_lite2_embeds(photos, photo_arrays, embedder, cache_dir):
    """efficientnet_lite2 gives 1280-d vectors at 260px under its own model id, equal to its own recipe in torch."""
    spec = get_backbone("efficientnet_lite2")
    with Embedder(model="efficientnet_lite2", device="cpu", cache_dir=cache_dir) as emb:
        assert emb.info()["input_size"] == 260 and emb.dim == 1280
        assert emb.model_id == spec.model_id != embedder.model_id
        assert emb.prepare(photos[0]).shape == (260, 260, 3)
        got = emb.embed(photos[:3])
    assert got.shape == (3, 1280) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert np.abs(got - embedder.embed(photos[:3])).max() > 0.1  # a different network, different vectors
    pp = spec.preprocessing
    tf = T.Compose([T.Resize(pp.resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(pp.crop),
                    T.ToTensor(), T.Normalize(pp.mean, pp.std)])
    net = load_backbone(spec)
    with torch.inference_mode():
        ref = np.stack([net(tf(Image.open(io.BytesIO(b)).convert("RGB")).unsqueeze(0))[0].numpy() for b in photos[:3]])
    assert cosine(got, ref).min() >= 0.9999


def test_constructor_errors(cache_dir):
    """An unknown model, or a config= mixed with keyword settings, is refused up front."""
    with pytest.raises(UnknownModelError, match="mobilenet_v2"):
        Embedder(model="resnet9000", device="cpu", cache_dir=cache_dir)
    with pytest.raises(ValueError, match="either config= or individual settings"):
        Embedder(model="mobilenet_v2", config=Config(cache_dir=cache_dir))


def test_config_object_is_used(cache_dir):
    """Embedder(config=...) takes every setting from it."""
    cfg = Config(model="mobilenet_v2", device="cpu", runtime="torch", micro_batch=2, cache_dir=cache_dir,
                 normalize=False)
    with Embedder(config=cfg) as emb:
        assert emb.config is cfg
        assert (emb.runtime.name, emb.micro_batch, emb.info()["normalize"]) == ("torch", 2, False)
