"""Decoding every supported input and the exact resize/crop recipe, with clear errors for bad inputs."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import resource
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms as T

from embedder.backbones import Preprocessing
from embedder.catalog import get_backbone
from embedder.errors import ImageDecodeError
from embedder.preprocess import Preprocessor, Probe, decode, probe

BIG = 10**9  # max_pixels for tests that are not about the limit


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb(item, max_pixels=BIG) -> np.ndarray:
    """What decode() makes of ``item``, as an int array (H, W, 3)."""
    img = decode(item, max_pixels=max_pixels)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def torchvision_recipe(pp: Preprocessing) -> T.Compose:
    mode = T.InterpolationMode.BICUBIC if pp.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    return T.Compose([T.Resize(pp.resize, interpolation=mode), T.CenterCrop(pp.crop)])


@pytest.fixture(scope="module")
def pre():
    return Preprocessor(get_backbone("mobilenet_v2").preprocessing, max_pixels=BIG)


@pytest.fixture(scope="module")
def cat(photo_arrays):
    return photo_arrays["chelsea"]  # 300x451 RGB


# --- the recipe ----------------------------------------------------------------------------------


def test_mobilenet_recipe_is_resize256_centercrop224(pre, photo_arrays):
    """Real photos give the same pixels as torchvision Resize(256) + CenterCrop(224), up to rare ±1 ties."""
    tf = T.Compose([T.Resize(256), T.CenterCrop(224)])
    for name, arr in photo_arrays.items():
        img = Image.fromarray(arr)
        ours, ref = pre(img).astype(int), np.asarray(tf(img)).astype(int)
        assert ours.shape == (224, 224, 3) and ours.dtype == int
        assert np.abs(ours - ref).max() <= 1, name
        assert (ours != ref).mean() < 0.001, name


@pytest.mark.parametrize("size", [(3000, 160), (150, 2600), (7, 300), (40, 33), (1, 1), (301, 257), (1000, 999)],
                         ids=["very-wide", "very-tall", "thin", "upscaled", "1x1", "odd-offsets", "near-square"])
def test_recipe_matches_torchvision_at_any_shape(pre, photo_arrays, size):
    """Very wide, very tall, tiny and odd-sized images: same as torchvision within 1/255 on almost every pixel."""
    tf = T.Compose([T.Resize(256), T.CenterCrop(224)])
    for name, arr in photo_arrays.items():
        img = Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR)
        ours, ref = pre(img).astype(int), np.asarray(tf(img)).astype(int)
        assert ours.shape == (224, 224, 3)
        assert np.abs(ours - ref).max() <= 1, name
        assert (ours != ref).mean() < 0.02, name  # upscaling makes exact .5 ties common; still rare


@pytest.mark.parametrize("size", [None, (3000, 160), (150, 2600), (40, 33)], ids=["photo", "wide", "tall", "tiny"])
def test_bicubic_recipe_matches_torchvision(photo_arrays, size):
    """EfficientNet-Lite2's recipe (bicubic Resize(292) + CenterCrop(260)) equals torchvision's.

    Bicubic overshoot can turn two ±1 rounding ties into ±2 on a handful of pixels of very wide images.
    """
    pp = get_backbone("efficientnet_lite2").preprocessing
    assert (pp.resize, pp.crop, pp.interpolation) == (292, 260, "bicubic")
    pre, tf = Preprocessor(pp, max_pixels=BIG), torchvision_recipe(pp)
    for name, arr in photo_arrays.items():
        img = Image.fromarray(arr)
        if size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        ours, ref = pre(img).astype(int), np.asarray(tf(img)).astype(int)
        assert ours.shape == (260, 260, 3)
        assert np.abs(ours - ref).max() <= 2, name
        assert (np.abs(ours - ref) > 1).sum() <= 20, name
        assert (ours != ref).mean() < 0.005, name


@contextlib.contextmanager
def _address_space_limited(extra_bytes: int):
    """This process may map at most ``extra_bytes`` more virtual memory inside the block (MemoryError beyond)."""
    vm = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith("VmSize:")).split()[1]) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _step_strip(length: int) -> np.ndarray:
    """A 1-pixel-wide strip, dark in its top half and bright in its bottom half."""
    strip = np.full((length, 1), 10, np.uint8)
    strip[length // 2:] = 240
    return strip


def test_extreme_strip_is_cheap_and_centered(pre):
    """A 1x100000 strip gives a 224x224 crop of its middle, within 1 GiB of extra address space.

    Resizing the whole strip first (as torchvision does) would allocate 256 x 25,600,000 pixels (~20 GB).
    The crop spans less than one source row around the step, so it is a smooth ramp, symmetric about it.
    """
    strip = _step_strip(100000)
    with _address_space_limited(1 << 30):
        tall = pre(strip).astype(int)
        wide = pre(np.ascontiguousarray(strip.T)).astype(int)
    assert tall.shape == wide.shape == (224, 224, 3)
    ramp = tall[:, 0, 0]
    assert (tall == ramp[:, None, None]).all()  # every column and channel alike
    assert (np.diff(ramp) >= 0).all() and ramp[0] < 40 and ramp[-1] > 210
    assert (ramp + ramp[::-1] == 250).all()  # centred exactly on the step
    assert np.array_equal(wide, tall.transpose(1, 0, 2))


def test_strip_matches_torchvision_where_torchvision_fits(pre):
    """The same step strip at 1x1000 (torchvision can still afford it) is pixel-identical to torchvision."""
    img = Image.fromarray(_step_strip(1000)).convert("RGB")
    ref = np.asarray(T.Compose([T.Resize(256), T.CenterCrop(224)])(img))
    assert np.array_equal(pre(img), ref)


def test_preprocessing_rejects_an_impossible_recipe():
    """A crop larger than the resize, or an unknown interpolation, is refused at construction."""
    with pytest.raises(ValueError, match="crop <= resize"):
        Preprocessing(resize=200, crop=224)
    with pytest.raises(ValueError, match="interpolation"):
        Preprocessing(resize=256, crop=224, interpolation="nearest")


# --- encoded formats -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, kw", [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True})])
def test_lossless_formats_decode_exactly(cat, fmt, kw):
    """PNG, BMP, TIFF and lossless WebP bytes decode to exactly the encoded RGB pixels."""
    assert np.array_equal(rgb(encode(Image.fromarray(cat), fmt, **kw)), cat)


@pytest.mark.parametrize("fmt, mode", [("JPEG", "RGB"), ("WEBP", "RGB"), ("JPEG", "CMYK")])
def test_lossy_formats_decode_to_the_picture(cat, fmt, mode):
    """JPEG, lossy WebP and CMYK JPEG decode to the picture (within compression error), right colours."""
    data = encode(Image.fromarray(cat).convert(mode), fmt, quality=95)
    assert Image.open(io.BytesIO(data)).mode == mode
    got = rgb(data)
    assert got.shape == cat.shape
    assert np.abs(got - cat).mean() < 3.0
    assert np.abs(got.mean((0, 1)) - cat.mean((0, 1))).max() < 2.0  # not inverted CMYK, not swapped channels


def test_16bit_grayscale_png_is_scaled_not_clipped(cat):
    """A 16-bit grey PNG (mode I;16) maps 0..65535 onto 0..255: grey*257 gives back grey, not white."""
    grey = np.asarray(Image.fromarray(cat).convert("L"))
    data = encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    got = rgb(data)
    assert np.array_equal(got, np.repeat(grey[..., None], 3, axis=2))
    dark = encode(Image.fromarray(np.full((16, 16), 200, np.uint16)), "PNG")  # 200/65535: nearly black
    assert (rgb(dark) == 1).all()


def test_animated_gif_uses_the_first_frame():
    """A 2-frame GIF (red, then blue) decodes to the red first frame."""
    red, blue = Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (40, 30), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    got = rgb(data)
    assert got.shape == (30, 40, 3) and (got == (255, 0, 0)).all()


def test_palette_png_with_transparency_keeps_its_colours(cat):
    """A palette PNG with a transparent index decodes to its palette colours, with no Pillow warning."""
    pal = Image.fromarray(cat).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    data = encode(pal, "PNG", transparency=bytes([0, 128] + [255] * 30))
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P" and "transparency" in opened.info
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = rgb(data)
    assert np.array_equal(got, np.asarray(pal.convert("RGB")))


def test_rgba_drops_alpha_like_torchvision(cat):
    """RGBA (PNG bytes or a PIL image) keeps its RGB channels, as PIL's convert('RGB') in torchvision does."""
    rgba = np.dstack([cat, np.linspace(0, 255, cat.shape[1], dtype=np.uint8)[None].repeat(cat.shape[0], 0)])
    img = Image.fromarray(rgba)
    assert img.mode == "RGBA"
    assert np.array_equal(rgb(encode(img, "PNG")), cat)
    assert np.array_equal(rgb(img), cat)


def test_grayscale_is_replicated_to_three_channels(cat):
    grey = np.asarray(Image.fromarray(cat).convert("L"))
    assert np.array_equal(rgb(encode(Image.fromarray(grey), "PNG")), np.repeat(grey[..., None], 3, axis=2))


def test_exif_orientation_is_applied(cat):
    """A JPEG stored sideways with EXIF orientation 6 decodes upright: its pixels turned 90 degrees clockwise."""
    img = Image.fromarray(cat)
    exif = img.getexif()
    exif[0x0112] = 6
    data = encode(img.rotate(90, expand=True), "JPEG", quality=95, exif=exif.tobytes())
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert stored.shape == (451, 300, 3)
    got = rgb(data)
    assert np.array_equal(got, np.rot90(stored, -1))
    assert np.abs(got - cat).mean() < 3.0  # upright again: the original picture


def _png_chunks(data: bytes) -> list[bytes]:
    chunks, at = [], 8
    while at < len(data):
        n = int.from_bytes(data[at:at + 4], "big")
        chunks.append(data[at:at + 12 + n])
        at += 12 + n
    return chunks


def _png_with_exif_after_pixels(img: Image.Image, orientation: int) -> bytes:
    """A PNG whose eXIf chunk (with ``orientation``) follows its pixel data, where PNG allows it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    chunks = _png_chunks(encode(img, "PNG", exif=exif.tobytes()))
    late = [c for c in chunks if c[4:8] == b"eXIf"]
    assert len(late) == 1
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    return b"\x89PNG\r\n\x1a\n" + b"".join(rest[:-1] + late + rest[-1:])


# --- the probe -----------------------------------------------------------------------------------


def test_probe_reads_format_size_orientation_and_clean_jpeg(cat, tmp_path):
    """One header read gives what the decode needs; only RGB or grey, upright JPEG bytes are clean JPEGs."""
    img = Image.fromarray(cat)  # 451x300
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "cat.jpg").write_bytes(encode(img, "JPEG"))
    cases = {
        "jpeg": (encode(img, "JPEG"), Probe("JPEG", (451, 300), 1, True)),
        "grey-jpeg": (encode(img.convert("L"), "JPEG"), Probe("JPEG", (451, 300), 1, True)),
        "jpeg-file": (tmp_path / "cat.jpg", Probe("JPEG", (451, 300), 1, True)),
        "rotated": (encode(img, "JPEG", exif=exif.tobytes()), Probe("JPEG", (451, 300), 6, False)),
        "cmyk": (encode(img.convert("CMYK"), "JPEG"), Probe("JPEG", (451, 300), 1, False)),
        "png": (encode(img, "PNG"), Probe("PNG", (451, 300), None, False)),  # EXIF could follow the pixels
        "png-exif": (encode(img, "PNG", exif=exif.tobytes()), Probe("PNG", (451, 300), 6, False)),
        "webp": (encode(img, "WEBP"), Probe("WEBP", (451, 300), 1, False)),
        "array": (cat, Probe(None, (451, 300), 1, False)),
        "pil": (img, Probe(None, (451, 300), 1, False)),
    }
    for name, (item, expected) in cases.items():
        assert probe(item, max_pixels=BIG) == expected, name
    assert expected.pixels == 451 * 300


def test_exif_after_the_pixels_is_read_once_when_decoding(cat):
    """A PNG may store EXIF after its pixels: the probe leaves the orientation unknown rather than decode the whole
    image, and the decode applies it."""
    data = _png_with_exif_after_pixels(Image.fromarray(cat), 3)
    assert probe(data, max_pixels=BIG).orientation is None
    assert np.array_equal(rgb(data), cat[::-1, ::-1])  # orientation 3: turned 180 degrees


def test_max_pixels_is_checked_by_the_probe_alone(pre, cat):
    """The probe is the one place the limit applies: a probed item's decode trusts its probe."""
    data = encode(Image.fromarray(cat), "PNG")
    strict = Preprocessor(pre.pp, max_pixels=cat.shape[0] * cat.shape[1] - 1)
    with pytest.raises(ImageDecodeError, match="above the limit of 135,299; downscale it, or raise the limit"):
        strict.probe(data)
    with pytest.raises(ImageDecodeError, match="above the limit"):
        strict.prepare(data)  # probed here, as nothing probed it before
    assert np.array_equal(strict.prepare(data, pre.probe(data)), pre(data))


def test_a_probed_decode_takes_the_orientation_from_its_probe(pre, cat):
    """An EXIF-rotated JPEG goes through Pillow and comes out upright by the orientation its probe read; the decode
    does not look at the EXIF again (a probe that says upright leaves the stored pixels as they are)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(Image.fromarray(cat).rotate(90, expand=True), "JPEG", quality=95, exif=exif.tobytes())
    found = pre.probe(rotated)
    assert found.orientation == 6 and not found.clean_jpeg
    assert np.abs(pre.prepare(rotated, found).astype(int) - pre(cat).astype(int)).mean() < 3.0
    stored = pre(np.asarray(Image.open(io.BytesIO(rotated)).convert("RGB")))
    np.testing.assert_array_equal(pre.prepare(rotated, dataclasses.replace(found, orientation=1)), stored)


def test_probe_failures_are_decode_errors(pre):
    """Anything the probe trips over, expected or not, is the item's ImageDecodeError."""
    class Weird(np.ndarray):
        @property
        def shape(self):
            raise RuntimeError("no shape today")

    with pytest.raises(ImageDecodeError, match=r"could not decode image \(RuntimeError: no shape today\)"):
        pre.probe(np.zeros((4, 4, 3), np.uint8).view(Weird))


# --- in-memory inputs ----------------------------------------------------------------------------


def test_numpy_arrays_of_every_layout(cat):
    """uint8 HxW, HxWx1, HxWx3, HxWx4, uint16 and float [0,1] arrays become the expected RGB pixels."""
    grey = np.asarray(Image.fromarray(cat).convert("L"))
    grey3 = np.repeat(grey[..., None], 3, axis=2)
    assert np.array_equal(rgb(cat), cat)
    assert np.array_equal(rgb(grey), grey3)
    assert np.array_equal(rgb(grey[..., None]), grey3)
    assert np.array_equal(rgb(np.dstack([cat, np.full(cat.shape[:2], 7, np.uint8)])), cat)
    assert np.array_equal(rgb(cat.astype(np.uint16) * 257), cat)
    deep = np.random.default_rng(0).integers(0, 65536, (50, 60, 3), dtype=np.uint16)
    assert np.array_equal(rgb(deep), np.floor(deep / 257 + 0.5))  # 16 bit scaled to 8, rounded
    assert np.array_equal(rgb(cat.astype(np.float32) / 255.0), cat)
    assert np.array_equal(rgb(cat.astype(np.float64) / 255.0), cat)
    assert np.array_equal(rgb(np.asfortranarray(cat)), cat)  # any memory layout
    assert np.array_equal(rgb(cat[:, ::-1]), cat[:, ::-1])  # negative strides


def test_pil_image_and_path_inputs(cat, tmp_path):
    """A PIL image and a pathlib.Path to a file decode like the bytes they hold."""
    data = encode(Image.fromarray(cat), "PNG")
    path = tmp_path / "cat.png"
    path.write_bytes(data)
    assert np.array_equal(rgb(Image.fromarray(cat)), cat)
    assert np.array_equal(rgb(path), cat)
    assert np.array_equal(rgb(bytearray(data)), cat)
    assert np.array_equal(rgb(memoryview(data)), cat)


def test_preprocessor_output_is_the_same_for_every_input_kind(pre, cat, tmp_path):
    """Bytes, path (str or Path), PIL image and array of one picture give identical model inputs."""
    data = encode(Image.fromarray(cat), "PNG")
    (tmp_path / "cat.png").write_bytes(data)
    outs = [pre(x) for x in (data, tmp_path / "cat.png", str(tmp_path / "cat.png"), Image.fromarray(cat), cat)]
    assert all(o.dtype == np.uint8 and o.shape == (224, 224, 3) for o in outs)
    assert all(np.array_equal(o, outs[0]) for o in outs[1:])


def test_a_jpeg_file_takes_the_same_decoder_as_its_bytes(pre, cat, tmp_path):
    data = encode(Image.fromarray(cat), "JPEG")
    (tmp_path / "cat.jpg").write_bytes(data)
    assert np.array_equal(pre(str(tmp_path / "cat.jpg")), pre(data))
    assert np.array_equal(pre(tmp_path / "cat.jpg"), pre(data))
    with pytest.raises(ImageDecodeError, match="could not read file"):
        pre(str(tmp_path / "missing.jpg"))


# --- errors --------------------------------------------------------------------------------------


def _png_header_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR (with correct CRC) for a huge image, followed by a 1x1 image's data."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def test_decompression_bomb_is_refused_from_the_header():
    """A PNG claiming 30000x30000 is refused by max_pixels before any pixel is decoded.

    The file holds one pixel of data: decoding first would fail as truncated, not over the limit.
    """
    data = _png_header_claiming(30000, 30000)
    assert Image.open(io.BytesIO(data)).size == (30000, 30000)
    with pytest.raises(ImageDecodeError, match="30000x30000 = 900,000,000 pixels, above the limit of 64,000,000") as e:
        decode(data, max_pixels=64_000_000)
    assert "EMBEDDER_MAX_PIXELS" in str(e.value)


def test_max_pixels_applies_to_every_input_kind(cat):
    """Bytes, arrays and PIL images above max_pixels are all refused; at the limit they pass."""
    limit = cat.shape[0] * cat.shape[1]
    for item in (encode(Image.fromarray(cat), "PNG"), cat, Image.fromarray(cat)):
        assert rgb(item, max_pixels=limit).shape == cat.shape
        with pytest.raises(ImageDecodeError, match="above the limit"):
            decode(item, max_pixels=limit - 1)


@pytest.mark.parametrize("item, message", [
    (b"", "empty input"),
    (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not a recognised image format"),
    (np.zeros((0, 5, 3), np.uint8), "no pixels"),
    (np.zeros((0, 0), np.uint8), "no pixels"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    (np.full((8, 8), np.inf, np.float64), "NaN or infinity"),
    (np.full((8, 8), 1.5, np.float32), r"must be in \[0, 1\]"),
    (np.full((8, 8), -0.1, np.float32), r"must be in \[0, 1\]"),
    (np.zeros((8, 8), np.int64), "unsupported array dtype int64"),
    (np.zeros((8, 8), bool), "unsupported array dtype bool"),
    (np.zeros((8, 8, 2), np.uint8), r"expected \(H, W\), \(H, W, 1\), \(H, W, 3\) or \(H, W, 4\)"),
    (np.zeros((2, 8, 8, 3), np.uint8), "not an image"),
    (np.zeros(8, np.uint8), "not an image"),
    (42, "unsupported input type int"),
    (None, "unsupported input type NoneType"),
], ids=["empty", "random-bytes", "0-rows", "0x0", "nan", "inf", "above-1", "below-0", "int64", "bool",
        "2-channels", "4-d", "1-d", "int", "none"])
def test_bad_inputs_raise_clear_errors(item, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode(item, max_pixels=BIG)


def test_channels_first_array_is_refused_not_misread():
    """(3, 224, 224) is channels-first: refused with the accepted layouts, never read as a 3x224 image."""
    with pytest.raises(ImageDecodeError, match=r"shape \(3, 224, 224\) is not an image; expected .*\(H, W, 3\)"):
        decode(np.zeros((3, 224, 224), np.uint8), max_pixels=BIG)


def test_truncated_jpeg_is_an_error(cat):
    """Half a JPEG is refused (Pillow would otherwise silently grey-fill the missing part)."""
    data = encode(Image.fromarray(cat), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode(data[: len(data) // 2], max_pixels=BIG)


def test_corrupt_header_is_an_error(cat):
    """A PNG whose IHDR is damaged (bad CRC) is refused with a message, not an arbitrary exception."""
    data = bytearray(encode(Image.fromarray(cat), "PNG"))
    data[20] ^= 0xFF
    with pytest.raises(ImageDecodeError):
        decode(bytes(data), max_pixels=BIG)


def test_unreadable_paths_are_errors(tmp_path):
    """A missing file and a directory given as a path are decode errors naming the problem."""
    with pytest.raises(ImageDecodeError, match="could not read file.*No such file"):
        decode(tmp_path / "missing.jpg", max_pixels=BIG)
    with pytest.raises(ImageDecodeError, match="could not read file.*directory"):
        decode(tmp_path, max_pixels=BIG)


def test_errors_are_value_errors():
    """ImageDecodeError is a ValueError, so generic callers can catch it."""
    with pytest.raises(ValueError):
        decode(b"", max_pixels=BIG)
