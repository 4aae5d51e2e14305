"""JPEG decode and the resize/crop recipe as torch ops on the model's device: nvJPEG on CUDA.

On a GPU machine Pillow decode on the CPU cores becomes the limit long before the model does, so the
:class:`~embedder.pipeline.Embedder` sends plain JPEGs here when it runs on CUDA: torchvision's batched
``decode_jpeg(..., device="cuda")``, then torchvision's antialiased tensor resize and center crop on the
device, never leaving it before the model. The same code runs on CPU (libjpeg-turbo through torchvision),
which is how the tests exercise it on machines without a GPU.

On CPU its crops equal the Pillow path's within one level (mean difference ~0.002 levels, embeddings'
cosine >= 0.99999 on the test photos). On CUDA nvJPEG's IDCT and the float resize kernels round differently:
that tolerance is still unmeasured (no GPU was available; ``device_decode="off"`` keeps the exact path).
torchvision 0.29 deprecates its image decoders in favour of TorchCodec; they still work in 0.26-0.29.
Only clean JPEGs come here: anything else (other formats, CMYK, EXIF rotation, above ``max_pixels``,
data the decoder rejects) returns ``None`` and goes through the exact Pillow path, which also reports
the errors.
"""
from __future__ import annotations

import io
import logging
from typing import Any, Sequence

import torch
from PIL import Image

from .backbones import Preprocessing

log = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"
_EXIF_ORIENTATION = 0x0112


class DeviceDecoder:
    """Callable: JPEG bytes -> uint8 ``(N, crop, crop, 3)`` tensor on ``device``, or None per item it leaves to Pillow.

    >>> dec = DeviceDecoder(spec.preprocessing, "cuda", max_pixels=50_000_000)
    >>> crops, taken = dec([jpeg_a, png_b])      # taken == [True, False]: the PNG goes to the Pillow path
    """

    def __init__(self, preprocessing: Preprocessing, device: str, *, max_pixels: int) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as tvf

        self.pp = preprocessing
        self.device = device
        self.max_pixels = max_pixels
        self._decode_jpeg, self._rgb, self._tvf = decode_jpeg, ImageReadMode.RGB, tvf
        self._interpolation = {"bilinear": InterpolationMode.BILINEAR,
                               "bicubic": InterpolationMode.BICUBIC}[preprocessing.interpolation]

    def accepts(self, item: Any) -> bool:
        """Whether ``item`` is a JPEG this decoder takes: RGB or grey, upright, within the pixel limit."""
        if not isinstance(item, (bytes, bytearray, memoryview)) or bytes(item[:3]) != _JPEG_MAGIC:
            return False
        try:
            with Image.open(io.BytesIO(item)) as img:  # header only
                w, h = img.size
                return (img.format == "JPEG" and img.mode in ("RGB", "L") and 0 < w * h <= self.max_pixels
                        and img.getexif().get(_EXIF_ORIENTATION, 1) == 1)
        except Exception:  # whatever is wrong, the Pillow path says what
            return False

    def __call__(self, items: Sequence[Any]) -> tuple[torch.Tensor, list[bool]]:
        """Decode and crop the items this decoder accepts; ``taken[i]`` says whether item i is in the tensor."""
        taken = [self.accepts(x) for x in items]
        data = [torch.frombuffer(bytearray(x), dtype=torch.uint8) for x, t in zip(items, taken) if t]
        images = self._decode(data)
        crops = []
        k = 0
        for i, t in enumerate(taken):
            if not t:
                continue
            img = images[k]
            k += 1
            if img is None:
                taken[i] = False
                continue
            crops.append(self._resize_crop(img))
        crop = self.pp.crop
        out = (torch.stack(crops) if crops else torch.empty((0, 3, crop, crop), dtype=torch.uint8, device=self.device))
        return out.permute(0, 2, 3, 1), taken  # NHWC, as the backbone takes it (a view: no copy)

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if not data:
            return []
        try:  # one batched call: nvJPEG decodes the whole list at once
            return list(self._decode_jpeg(data, mode=self._rgb, device=self.device))
        except RuntimeError as e:
            log.debug("batched JPEG decode failed (%s); decoding one by one", e)
        out: list[torch.Tensor | None] = []
        for d in data:  # isolate the bad ones: they go to the Pillow path, which reports them
            try:
                out.append(self._decode_jpeg(d, mode=self._rgb, device=self.device))
            except RuntimeError:
                out.append(None)
        return out

    def _resize_crop(self, img: torch.Tensor) -> torch.Tensor:
        resized = self._tvf.resize(img, [self.pp.resize], interpolation=self._interpolation, antialias=True)
        return self._tvf.center_crop(resized, [self.pp.crop])
