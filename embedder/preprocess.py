"""Decode any supported input into RGB and apply a backbone's exact preprocessing recipe.

Output is a uint8 ``(crop, crop, 3)`` array; normalisation happens inside the model graph
(:class:`embedder.backbones.FrozenBackbone`). Every failure is an :class:`ImageDecodeError` with a
message that says what was wrong, so one bad item never takes a batch down.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .backbones import Preprocessing
from .config import JPEG_DECODERS
from .errors import ImageDecodeError
from .jpeg import JpegDecoder

ImageInput = Union[bytes, bytearray, memoryview, np.ndarray, Image.Image, str, os.PathLike]

# Our own max_pixels check runs on the header before any pixel is decoded, with a message that says how to
# raise it; Pillow's global bomb guard would otherwise cap it at ~179 MP with a message we cannot control.
Image.MAX_IMAGE_PIXELS = None

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}  # Pillow's filter support radius before antialias scaling
_EXIF_ORIENTATION = 0x0112


def decode(item: ImageInput, *, max_pixels: int) -> Image.Image:
    """Turn encoded bytes, an array or a PIL image into an RGB PIL image.

    Bytes: JPEG, PNG (8 and 16 bit), WebP, BMP, GIF (first frame), TIFF and what else Pillow reads;
    EXIF orientation is applied. Arrays: ``(H, W)``, ``(H, W, 1|3|4)`` of uint8, uint16, or floats in [0, 1].
    Paths (``str`` or ``os.PathLike``, local callers only; the server never accepts them) are read in the worker.
    """
    item = _read_path(item)
    if isinstance(item, Image.Image):
        img = item
    elif isinstance(item, np.ndarray):
        img = _from_array(item)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        img = _open_bytes(bytes(item), max_pixels)
    else:
        raise ImageDecodeError(
            f"unsupported input type {type(item).__name__}; pass encoded image bytes, a numpy array, a PIL image "
            "or a file path"
        )
    _check_size(img.size, max_pixels)
    try:
        if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
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


def _open_bytes(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty input (0 bytes); send the encoded image file's contents")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"not a recognised image format (first bytes {data[:8]!r}); send JPEG, PNG, WebP, BMP, GIF or TIFF"
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image refused as a decompression bomb ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"corrupt image header ({e})") from None
    _check_size(img.size, max_pixels)  # before decoding any pixels
    try:
        img.seek(0)  # first frame of an animation
        img.load()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"corrupt or truncated image data ({e})") from None
    return img


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageDecodeError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageDecodeError(
            f"image is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,}; "
            "downscale it, or raise the limit with --max-pixels / EMBEDDER_MAX_PIXELS"
        )


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageDecodeError(
            f"array of shape {arr.shape} is not an image; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
        )
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == np.uint16:
        arr = (arr.astype(np.uint32) * 255 + 32767) // 65535
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageDecodeError("float array contains NaN or infinity")
        if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
            raise ImageDecodeError(
                f"float array values span [{arr.min():.3g}, {arr.max():.3g}]; float images must be in [0, 1]"
            )
        arr = np.rint(arr * 255.0)
    else:
        raise ImageDecodeError(f"unsupported array dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageDecodeError(f"image has no pixels ({arr.shape[1]}x{arr.shape[0]})")
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


class Preprocessor:
    """Callable: one input -> uint8 ``(crop, crop, 3)`` array, the weights' own recipe.

    Clean JPEGs go through torchvision's decoder and tensor resize (:class:`embedder.jpeg.JpegDecoder`,
    ~1.6x cheaper here) unless ``jpeg_decoder="pillow"``; everything else through Pillow. The Pillow path
    equals torchvision's ``Resize(resize)`` + ``CenterCrop(crop)`` on a PIL image, but the resize is computed
    only over the source region that survives the crop (Pillow's ``box``): the same filter taps, the same
    pixels up to rare ±1 rounding, less work, and an extreme aspect ratio cannot blow up memory. Both paths
    agree within one level per pixel.
    """

    def __init__(self, preprocessing: Preprocessing, *, max_pixels: int, jpeg_decoder: str = "torchvision") -> None:
        if jpeg_decoder not in JPEG_DECODERS:
            raise ValueError(f"jpeg_decoder must be one of {', '.join(JPEG_DECODERS)}; got {jpeg_decoder!r}")
        self.pp = preprocessing
        self.max_pixels = max_pixels
        self._resample = _RESAMPLE[preprocessing.interpolation]
        self.jpeg = JpegDecoder(preprocessing, "cpu", max_pixels=max_pixels) if jpeg_decoder == "torchvision" else None

    def __call__(self, item: ImageInput) -> np.ndarray:
        item = _read_path(item)  # a JPEG file then takes the same decoder as its bytes
        if self.jpeg is not None:
            crop = self.jpeg.crop(item)
            if crop is not None:
                return crop
        img = decode(item, max_pixels=self.max_pixels)
        out = self.resize_crop(img)
        return np.asarray(out, dtype=np.uint8)

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
