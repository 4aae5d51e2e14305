"""Probe each input once, then decode it into RGB and apply a backbone's exact preprocessing recipe.

:func:`probe` reads what an input's header (or an array's shape and dtype) says, once, when the input arrives:
format, size, EXIF orientation and whether it is a clean JPEG for the fast decoder. It is the one place
``max_pixels`` is checked, before any pixel is decoded. Its :class:`Probe` travels with the input to
:meth:`Preprocessor.prepare`, which does not read the header's facts or the EXIF again.

Output is a uint8 ``(crop, crop, 3)`` array; normalisation happens inside the model graph
(:class:`embedder.backbones.FrozenBackbone`). Every failure is an :class:`ImageDecodeError` with a
message that says what was wrong, so one bad item never takes a batch down.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .backbones import Preprocessing
from .errors import ImageDecodeError
from .jpeg import JpegDecoder

log = logging.getLogger(__name__)

ImageInput = Union[bytes, bytearray, memoryview, np.ndarray, Image.Image, str, os.PathLike]

# Our own max_pixels check runs on the header before any pixel is decoded, with a message that says how to
# raise it; Pillow's global bomb guard would otherwise cap it at ~179 MP with a message we cannot control.
Image.MAX_IMAGE_PIXELS = None

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}  # Pillow's filter support radius before antialias scaling
_EXIF_ORIENTATION = 0x0112
_JPEG_MAGIC = b"\xff\xd8\xff"
# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose does it).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


@dataclass(frozen=True)
class Probe:
    """What one read of an input's header (or an array's shape) says; made by :func:`probe`."""

    format: str | None  # Pillow's format name ("JPEG", "PNG", ...); None for arrays and PIL images made in memory
    size: tuple[int, int]  # (width, height) of the source image
    orientation: int | None  # EXIF orientation, 1 = upright; None: only decoding can tell (see _orientation)
    clean_jpeg: bool  # encoded RGB or grey JPEG, upright: torchvision's decoder takes it

    @property
    def pixels(self) -> int:
        """Source pixels: what decoding materialises, the cost the batcher budgets."""
        return self.size[0] * self.size[1]


def probe(item: ImageInput, *, max_pixels: int) -> Probe:
    """Read ``item``'s format, size and orientation without decoding any pixel data.

    Raises :class:`ImageDecodeError` for what can never decode (empty, unknown format, corrupt header, not an
    image array, unsupported type) and for an image above ``max_pixels``: the one place that limit is checked.
    A path is opened for its header only; its bytes are read when it is decoded.
    """
    if isinstance(item, (str, os.PathLike)):
        try:
            f = Path(item).open("rb")
        except OSError as e:
            raise ImageDecodeError(f"could not read file: {e}") from None
        with f:
            return _probe_encoded(f, max_pixels)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _probe_encoded(io.BytesIO(item), max_pixels)
    if isinstance(item, Image.Image):
        found = Probe(item.format, item.size, _orientation(item), clean_jpeg=False)
    elif isinstance(item, np.ndarray):
        _check_array(item)
        found = Probe(None, (int(item.shape[1]), int(item.shape[0])), 1, clean_jpeg=False)
    else:
        raise ImageDecodeError(
            f"unsupported input type {type(item).__name__}; pass encoded image bytes, a numpy array, a PIL image "
            "or a file path"
        )
    _check_size(found.size, max_pixels)
    return found


def _probe_encoded(f: BinaryIO, max_pixels: int) -> Probe:
    head = f.read(8)
    if not head:
        raise ImageDecodeError("empty input (0 bytes); send the encoded image file's contents")
    f.seek(0)
    with _open(f, head) as img:  # lazy: reads the header (and a JPEG's EXIF) only
        _check_size(img.size, max_pixels)
        orientation = _orientation(img)
        clean = head[:3] == _JPEG_MAGIC and img.format == "JPEG" and img.mode in ("RGB", "L") and orientation == 1
        return Probe(img.format, img.size, orientation, clean)


def _open(f: BinaryIO, head: bytes) -> Image.Image:
    """Pillow's lazy open, its failures as :class:`ImageDecodeError`; ``head``: the first bytes, for the message."""
    try:
        return Image.open(f)
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"not a recognised image format (first bytes {head!r}); send JPEG, PNG, WebP, BMP, GIF or TIFF"
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image refused as a decompression bomb ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"corrupt image header ({e})") from None


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation, or None where reading it would decode the whole image."""
    # A PNG may keep its EXIF after the pixel data, where Pillow finds it only by decoding everything: the
    # decoder reads it then, once, from the decoded image.
    if img.format == "PNG" and "exif" not in img.info:
        return None
    try:
        return img.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"corrupt or truncated image data ({e})") from None


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageDecodeError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageDecodeError(
            f"image is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,}; "
            "downscale it, or raise the limit with --max-pixels / EMBEDDER_MAX_PIXELS"
        )


def _check_array(arr: np.ndarray) -> None:
    """Layout and dtype, from the array's metadata; its values are checked when it is converted."""
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))):
        raise ImageDecodeError(
            f"array of shape {arr.shape} is not an image; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
        )
    if arr.dtype not in (np.uint8, np.uint16) and not np.issubdtype(arr.dtype, np.floating):
        raise ImageDecodeError(f"unsupported array dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")


def decode(item: ImageInput, *, max_pixels: int, draft: int = 0) -> Image.Image:
    """Turn encoded bytes, an array or a PIL image into an RGB PIL image (probed, then decoded).

    Bytes: JPEG, PNG (8 and 16 bit), WebP, BMP, GIF (first frame), TIFF and what else Pillow reads;
    EXIF orientation is applied. Arrays: ``(H, W)``, ``(H, W, 1|3|4)`` of uint8, uint16, or floats in [0, 1].
    Paths (``str`` or ``os.PathLike``, local callers only; the server never accepts them) are read in the worker.
    ``draft``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale, as long as both sides stay >= ``draft`` (previews;
    the embedder's own path never asks, its recipe resizes from the full image).
    """
    data = _read_path(item)
    return _decode(data, probe(data, max_pixels=max_pixels), draft)


def _decode(item: ImageInput, found: Probe, draft: int = 0) -> Image.Image:
    """``item`` (a path already read) as RGB, as its probe found it: size and EXIF are not read again."""
    if isinstance(item, Image.Image):
        img = item
    elif isinstance(item, np.ndarray):
        img = _from_array(item)
    else:  # encoded bytes: the only other kind a probe admits
        img = _load(item, draft)
    try:
        orientation = found.orientation if found.orientation is not None else img.getexif().get(_EXIF_ORIENTATION, 1)
        upright = _UPRIGHT.get(orientation)
        if upright is not None:
            img = img.transpose(upright)
        return _to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"corrupt or truncated image data ({e})") from None


def _read_path(item: ImageInput) -> ImageInput:
    """A file path's bytes; any other input as it is."""
    if not isinstance(item, (str, os.PathLike)):
        return item
    try:
        return Path(item).read_bytes()
    except OSError as e:
        raise ImageDecodeError(f"could not read file: {e}") from None


def _load(data: bytes | bytearray | memoryview, draft: int = 0) -> Image.Image:
    img = _open(io.BytesIO(data), bytes(data[:8]))
    try:
        if draft and img.format == "JPEG":  # libjpeg scales while it decodes: 64x fewer pixels at 1/8
            img.draft("RGB", (draft, draft))
        img.seek(0)  # first frame of an animation
        img.load()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"corrupt or truncated image data ({e})") from None
    return img


def _from_array(arr: np.ndarray) -> Image.Image:
    """An array :func:`probe` admitted (layout, dtype, size) -> PIL image, its values checked and scaled."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.uint32) * 255 + 32767) // 65535
    elif arr.dtype != np.uint8:  # floats
        if not np.isfinite(arr).all():
            raise ImageDecodeError("float array contains NaN or infinity")
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise ImageDecodeError(
                f"float array values span [{arr.min():.3g}, {arr.max():.3g}]; float images must be in [0, 1]"
            )
        arr = np.rint(arr * 255.0)
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        # 16-bit and float grey: scale to 8 bit rather than clipping everything above 255 to white.
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids Pillow's palette-transparency warning; same RGB values
    return img.convert("RGB")


@contextlib.contextmanager
def _one_item() -> Iterator[None]:
    """Any failure on one input becomes its :class:`ImageDecodeError`: one input never takes a batch down."""
    try:
        yield
    except ImageDecodeError:
        raise
    except Exception as e:
        log.warning("unexpected error decoding an input: %r", e)
        raise ImageDecodeError(f"could not decode image ({type(e).__name__}: {e})") from e


class Preprocessor:
    """One input -> uint8 ``(crop, crop, 3)`` array, the weights' own recipe (:meth:`probe`, then :meth:`prepare`).

    Clean JPEGs go through torchvision's decoder and tensor resize (:class:`embedder.jpeg.JpegDecoder`,
    ~1.6x cheaper here) unless ``jpeg_decoder="pillow"``; everything else through Pillow. The Pillow path
    equals torchvision's ``Resize(resize)`` + ``CenterCrop(crop)`` on a PIL image, but the resize is computed
    only over the source region that survives the crop (Pillow's ``box``): the same filter taps, the same
    pixels up to rare ±1 rounding, less work, and an extreme aspect ratio cannot blow up memory. Both paths
    agree within one level per pixel.
    """

    def __init__(self, preprocessing: Preprocessing, *, max_pixels: int, jpeg_decoder: str = "pillow") -> None:
        if jpeg_decoder not in ("torchvision", "pillow"):
            raise ValueError(f"jpeg_decoder must be 'torchvision' or 'pillow' (resolve 'auto' with "
                             f"config.resolve_jpeg_decoder first); got {jpeg_decoder!r}")
        self.pp = preprocessing
        self.max_pixels = max_pixels
        self._resample = _RESAMPLE[preprocessing.interpolation]
        self.jpeg = JpegDecoder(preprocessing, "cpu") if jpeg_decoder == "torchvision" else None

    def probe(self, item: ImageInput) -> Probe:
        """:func:`probe` under this preprocessor's ``max_pixels``; any failure is an :class:`ImageDecodeError`."""
        with _one_item():
            return probe(item, max_pixels=self.max_pixels)

    def prepare(self, item: ImageInput, probe: Probe | None = None) -> np.ndarray:
        """One input -> uint8 ``(crop, crop, 3)`` array for the model; every failure an :class:`ImageDecodeError`.

        ``probe``: the input's :meth:`probe`, when it was probed on arrival; without one it is probed here.
        """
        with _one_item():
            data = _read_path(item)  # a JPEG file then takes the same decoder as its bytes
            if probe is None:
                probe = self.probe(data)
            if probe.clean_jpeg and self.jpeg is not None:
                crop = self.jpeg.crop(data)
                if crop is not None:
                    return crop
            return np.asarray(self.resize_crop(_decode(data, probe)), dtype=np.uint8)

    def __call__(self, item: ImageInput) -> np.ndarray:
        """``prepare(item)``."""
        return self.prepare(item)

    def resize_crop(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        size, crop = self.pp.resize, self.pp.crop
        # torchvision's Resize(int): the shorter side becomes `size`, the longer is truncated.
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        # torchvision's CenterCrop offsets in the resized image.
        top = int(round((new_h - crop) / 2.0))
        left = int(round((new_w - crop) / 2.0))
        sx, sy = w / new_w, h / new_h
        # Two explicit passes, horizontal then vertical, each rounding to uint8 in between exactly as
        # Pillow's full-image resize does (a single boxed resize reorders them and drifts by 1 on many pixels).
        # The horizontal pass only covers the source rows the vertical filter will read.
        reach = _SUPPORT[self.pp.interpolation] * max(sy, 1.0)
        y0, y1 = top * sy, (top + crop) * sy
        r0, r1 = max(0, int(y0 - reach) - 1), min(h, math.ceil(y1 + reach) + 1)
        rows = img.crop((0, r0, w, r1)).resize((crop, r1 - r0), self._resample,
                                               box=(left * sx, 0, (left + crop) * sx, r1 - r0))
        return rows.resize((crop, crop), self._resample, box=(0, y0 - r0, crop, y1 - r0))
