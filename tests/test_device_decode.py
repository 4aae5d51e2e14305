"""Device decode (nvJPEG + tensor resize on CUDA): the same code on CPU equals the exact Pillow recipe."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from embedder import Config, Embedder
from embedder.device_decode import DeviceDecoder

from conftest import cosine, jpeg_bytes


@pytest.fixture(scope="module")
def decoder(embedder):
    return DeviceDecoder(embedder.spec.preprocessing, "cpu", max_pixels=embedder.config.max_pixels)


@pytest.fixture(scope="module")
def device_embedder(cache_dir):
    """The default backbone with device decode forced on (CPU: torchvision's libjpeg-turbo and tensor resize)."""
    with Embedder(model="mobilenet_v2", device="cpu", cache_dir=cache_dir, device_decode="on") as emb:
        yield emb


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_crops_equal_the_pillow_recipe(decoder, embedder, photos):
    """Decode + antialiased resize + center crop as tensors: Pillow's pixels within one level, NHWC uint8."""
    crops, taken = decoder(photos)
    assert taken == [True] * len(photos)
    assert crops.shape == (len(photos), 224, 224, 3) and str(crops.dtype) == "torch.uint8"
    ref = np.stack([embedder.prepare(p) for p in photos])
    diff = np.abs(crops.numpy().astype(int) - ref.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.05


def test_only_clean_jpegs_are_taken(decoder, photo_arrays, photos):
    """PNG, CMYK, EXIF-rotated, truncated, over-limit and non-bytes inputs are left to the Pillow path."""
    cat = Image.fromarray(photo_arrays["chelsea"])
    exif = cat.getexif()
    exif[0x0112] = 6
    rotated = encode(cat, "JPEG", exif=exif.tobytes())
    small = DeviceDecoder(decoder.pp, "cpu", max_pixels=1000)
    assert not small.accepts(photos[0])
    items = [photos[0], encode(cat, "PNG"), encode(cat.convert("CMYK"), "JPEG"), rotated,
             photos[1][: len(photos[1]) // 2], photo_arrays["coffee"], b"", jpeg_bytes(photo_arrays["rocket"][:, :, 0])]
    crops, taken = decoder(items)
    assert taken == [True, False, False, False, False, False, False, True]
    assert crops.shape[0] == 2


def test_embedder_with_device_decode_matches_the_pillow_path(device_embedder, embedder, photos, photo_arrays):
    """Embedder(device_decode="on"): JPEGs through the device decoder, the rest through Pillow, in input order;
    vectors equal the Pillow path (cosine >= 0.99999); a bad item gets its own error."""
    assert device_embedder.device_decoder is not None and embedder.device_decoder is None
    png = encode(Image.fromarray(photo_arrays["china"]), "PNG")
    items = [photos[0], png, photos[1][:500], photo_arrays["flower"], *photos[2:]]
    got = device_embedder.embed_batch(items)
    assert got.ok.tolist() == [True, True, False, True, True, True, True, True]
    assert "truncated" in got.errors[2] or "corrupt" in got.errors[2]
    ref = embedder.embed([x for i, x in enumerate(items) if i != 2])
    assert cosine(got.vectors[got.ok], ref).min() >= 0.99999


def test_device_decode_setting_is_checked():
    assert Config(device_decode="off").device_decode == "off"
    with pytest.raises(ValueError, match="device_decode must be 'auto', 'on' or 'off'"):
        Config(device_decode="gpu")
