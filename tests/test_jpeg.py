"""torchvision's JPEG path (libjpeg-turbo on CPU, nvJPEG on CUDA) equals the Pillow recipe within one level."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from embedder import Config, Embedder
from embedder.config import resolve_jpeg_decoder
from embedder.jpeg import JpegDecoder
from embedder.errors import ImageDecodeError
from embedder.preprocess import Preprocessor, probe

from conftest import cosine, jpeg_bytes


@pytest.fixture(scope="module")
def decoder(embedder):
    return JpegDecoder(embedder.spec.preprocessing, "cpu")


@pytest.fixture(scope="module")
def tv_embedder(embedder):
    """The default model with jpeg_decoder="torchvision" (opt-in on CPU)."""
    with Embedder(config=Config.from_env(environ={}, device="cpu", jpeg_decoder="torchvision",
                                         cache_dir=embedder.config.cache_dir)) as tv:
        yield tv


@pytest.fixture(scope="module")
def pillow(embedder):
    return Preprocessor(embedder.spec.preprocessing, max_pixels=embedder.config.max_pixels, jpeg_decoder="pillow")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_crops_equal_the_pillow_recipe(decoder, pillow, embedder, photos):
    """Decode + antialiased resize + center crop as tensors: Pillow's pixels within one level, both for one item
    (the CPU decode workers) and a batch (the CUDA path's batched decode, NHWC on the device)."""
    ref = np.stack([pillow(p) for p in photos])
    one = np.stack([decoder.crop(p) for p in photos])
    crops, taken = decoder(photos)
    assert taken == [True] * len(photos)
    assert crops.shape == (len(photos), 224, 224, 3) and str(crops.dtype) == "torch.uint8"
    np.testing.assert_array_equal(one, crops.numpy())
    diff = np.abs(one.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.05
    assert 1 - cosine(embedder.embed_arrays(one), embedder.embed_arrays(ref)).min() < 1e-5


def test_auto_uses_it_on_cuda_and_pillow_on_cpu_and_the_flag_picks_it(embedder, tv_embedder, decoder, pillow,
                                                                      photos):
    """jpeg_decoder="auto" (the default) is Pillow on CPU (no torch in a server on ONNX/OpenVINO) and this decoder
    on CUDA; "torchvision" makes the CPU pipeline's JPEG crops the decoder's exactly."""
    assert Config().jpeg_decoder == "auto"
    assert (resolve_jpeg_decoder("auto", "cpu"), resolve_jpeg_decoder("auto", "cuda:0")) == ("pillow", "torchvision")
    assert embedder.jpeg_decoder == "pillow" and embedder.preprocessor.jpeg is None
    for p in photos[:3]:
        np.testing.assert_array_equal(embedder.prepare(p), pillow(p))
    assert tv_embedder.preprocessor.jpeg is not None
    for p in photos[:3]:
        np.testing.assert_array_equal(tv_embedder.prepare(p), decoder.crop(p))


def test_only_clean_jpegs_are_taken(decoder, photo_arrays, photos):
    """The probe sends only RGB and grey upright JPEG bytes here: PNG, CMYK, EXIF-rotated and non-bytes inputs go
    to Pillow, over-limit and empty ones are refused; a truncated JPEG the decoder cannot take goes back to Pillow."""
    cat = Image.fromarray(photo_arrays["chelsea"])
    exif = cat.getexif()
    exif[0x0112] = 6
    rotated = encode(cat, "JPEG", exif=exif.tobytes())
    grey = jpeg_bytes(photo_arrays["rocket"][:, :, 0])
    truncated = photos[1][: len(photos[1]) // 2]
    items = [photos[0], encode(cat, "PNG"), encode(cat.convert("CMYK"), "JPEG"), rotated, truncated,
             photo_arrays["coffee"], grey]
    assert [probe(x, max_pixels=10**9).clean_jpeg for x in items] == [True, False, False, False, True, False, True]
    with pytest.raises(ImageDecodeError, match="above the limit"):
        probe(photos[0], max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="empty"):
        probe(b"", max_pixels=10**9)
    jpegs = [photos[0], truncated, grey]
    crops, taken = decoder(jpegs)
    assert taken == [True, False, True]
    assert crops.shape[0] == 2
    assert [decoder.crop(x) is not None for x in jpegs] == taken


def test_every_input_still_decodes_or_fails_clearly(embedder, photos, photo_arrays, pillow):
    """Through the default pipeline: JPEGs via torchvision, the rest via Pillow, in input order; a truncated
    JPEG gets Pillow's error; every vector equals the all-Pillow path's (cosine >= 0.99999)."""
    png = encode(Image.fromarray(photo_arrays["china"]), "PNG")
    items = [photos[0], png, photos[1][:500], photo_arrays["flower"], *photos[2:]]
    got = embedder.embed_batch(items)
    assert got.ok.tolist() == [True, True, False, True, True, True, True, True]
    assert "truncated" in got.errors[2].lower()
    good = [x for i, x in enumerate(items) if i != 2]
    ref = embedder.embed_arrays(np.stack([pillow(x) for x in good]))
    assert 1 - cosine(got.vectors[got.ok], ref).min() < 1e-5


def test_the_cuda_path_batches_on_the_device_decoder(embedder, photos, photo_arrays):
    """The Embedder's device path (on CUDA: nvJPEG a micro-batch at a time), run here with the CPU decoder:
    JPEGs embedded from the batched crops, the rest through the decode workers, vectors as the default path's."""
    with Embedder(model="mobilenet_v2", device="cpu", cache_dir=embedder.config.cache_dir) as emb:
        assert emb.device_decoder is None  # on CPU the decode workers do it
        emb.device_decoder = JpegDecoder(emb.spec.preprocessing, "cpu")
        png = encode(Image.fromarray(photo_arrays["china"]), "PNG")
        items = [png, *photos[:5], b"not an image", photos[5]]
        got = emb.embed_batch(items)
    assert got.ok.tolist() == [True] * 6 + [False, True]
    assert "not a recognised image format" in got.errors[6]
    ref = embedder.embed([x for i, x in enumerate(items) if i != 6])
    assert 1 - cosine(got.vectors[got.ok], ref).min() < 1e-5


def test_pillow_can_be_chosen_and_the_setting_is_checked(photos, pillow, cache_dir):
    with Embedder(model="mobilenet_v2", device="cpu", cache_dir=cache_dir, jpeg_decoder="pillow") as emb:
        assert emb.preprocessor.jpeg is None
        np.testing.assert_array_equal(emb.prepare(photos[0]), pillow(photos[0]))
    with pytest.raises(ValueError, match="jpeg_decoder must be one of auto, torchvision, pillow"):
        Config(jpeg_decoder="nvjpeg")
    with pytest.raises(ValueError, match="jpeg_decoder must be 'torchvision' or 'pillow'"):
        Preprocessor(pillow.pp, max_pixels=10, jpeg_decoder="turbo")


def test_decode_workers_run_torch_on_one_thread_each(tv_embedder, photos):
    """The resize runs in the decode workers on one torch thread each (one OpenMP team per worker made torch's
    own CPU work elsewhere in the process ~2.4x slower); the caller's torch thread count is left as it was."""
    before = torch.get_num_threads()
    tv_embedder.embed(photos)
    assert tv_embedder._pool.submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == before


def test_with_this_decoder_a_clean_jpeg_header_is_parsed_once_in_all(tv_embedder, photos, monkeypatch):
    """The probe opens each JPEG (Pillow reads the header), torchvision decodes it from the probe's verdict: no
    second parse."""
    from embedder.batcher import Batcher

    opened: list[bytes] = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(bytes(fp.getbuffer()))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    with Batcher(tv_embedder, max_batch=4, max_delay_ms=2) as b:
        got = np.stack([f.result(timeout=60) for f in b.submit(photos)])
    assert [opened.count(p) for p in photos] == [1] * len(photos)
    assert 1 - cosine(got, tv_embedder.embed(photos)).min() < 1e-6
