"""Clean JPEGs through torchvision: libjpeg-turbo on CPU, nvJPEG on CUDA, the resize and crop as tensor ops.

Most inputs are plain JPEGs, and for them this path costs ~1.7 core-ms per photo on this CPU where Pillow's
costs ~2.6-3.0 (no 4-channel intermediate, a vectorised uint8 antialiased resize), so the
:class:`~embedder.preprocess.Preprocessor` sends them here one at a time in its decode workers. On CUDA the
:class:`~embedder.pipeline.Embedder` sends whole micro-batches to the GPU instead (batched nvJPEG; the crops
never leave the device before the model). On CPU it is opt-in (``jpeg_decoder="torchvision"``): the default
``auto`` decodes with Pillow there, so a server on the ONNX/OpenVINO runtime never loads torch (~860 MB).

The crops equal the Pillow recipe's within one level (mean difference ~0.002 levels on the test photos,
embeddings' cosine >= 0.99999: the same tolerance as Pillow's own version drift, so the model id does not
change). On CUDA, nvJPEG and the float resize kernels round differently: that tolerance is still unmeasured
(no GPU was available); ``jpeg_decoder="pillow"`` keeps the Pillow path everywhere. torch is imported with
the first JPEG this decoder takes, not with this module.

Only clean JPEGs come here, as :func:`embedder.preprocess.probe` found them when they arrived (RGB or grey,
upright, within ``max_pixels``); this module does not read headers. Everything else (other formats, CMYK, EXIF
rotation, data the decoder rejects) is left to Pillow, which also reports the errors. torchvision 0.29
deprecates its image decoders in favour of TorchCodec; should they disappear, every JPEG goes to Pillow, with
one warning.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .backbones import Preprocessing

if TYPE_CHECKING:
    import torch  # torch and torchvision load with the first JPEG this decoder takes, not with the module

log = logging.getLogger(__name__)


def one_torch_thread() -> None:
    """Decode-pool initializer: torch ops in the calling thread (the JPEG resize) run on that thread alone.

    Without it each decode thread's first resize starts an OpenMP team of its own; with more OpenMP threads
    than cores, libgomp stops spin-waiting, and torch's own CPU work in the process ran ~2.4x slower here
    (torch eager mobilenet_v2 at batch 1: 124 -> 52 img/s). OpenMP's thread count is a per-thread setting,
    so this leaves every other thread's torch as it was.
    """
    import torch

    torch.get_num_threads()  # torch's one-time per-thread OpenMP init first, so it cannot undo the next line
    omp_set_num_threads = getattr(ctypes.CDLL(None), "omp_set_num_threads", None)  # torch's libgomp, if any
    if omp_set_num_threads is not None:
        omp_set_num_threads(1)


@functools.cache
def _torchvision() -> tuple[Any, Any, Any, Any]:
    """torchvision's decoder and resize, imported on first use (the import costs ~1.2 s)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as tvf

    return decode_jpeg, ImageReadMode.RGB, InterpolationMode, tvf


class JpegDecoder:
    """Clean JPEG bytes -> uint8 crops of the backbone's recipe, on ``device``; None for what it leaves to Pillow.

    The caller picks the items (``probe(item).clean_jpeg``); an item torchvision cannot decode (truncated data)
    comes back not taken, for Pillow to decode or to say what is wrong.

    >>> dec = JpegDecoder(spec.preprocessing, "cpu")
    >>> dec.crop(jpeg_bytes)                  # (224, 224, 3) uint8 array, or None: use Pillow
    >>> crops, taken = JpegDecoder(pp, "cuda")([jpeg_a, jpeg_b])   # taken == [True, False]: b was truncated
    """

    def __init__(self, preprocessing: Preprocessing, device: str) -> None:
        self.pp = preprocessing
        self.device = device
        self.available = True  # False once torchvision's decoder turned out to be missing

    def crop(self, data: bytes | bytearray | memoryview) -> np.ndarray | None:
        """One clean JPEG -> contiguous uint8 ``(crop, crop, 3)`` array (CPU), or None to use Pillow."""
        (img,) = self._decode([data])
        return None if img is None else self._resize_crop(img).permute(1, 2, 0).contiguous().cpu().numpy()

    def __call__(self, items: Sequence[bytes | bytearray | memoryview]) -> tuple[torch.Tensor, list[bool]]:
        """Decode and crop clean JPEGs in one batched decode on the device.

        Returns uint8 ``(n_taken, crop, crop, 3)`` on ``device`` and ``taken[i]``: whether item i is in it.
        """
        import torch

        images = self._decode(list(items))
        taken = [img is not None for img in images]
        crops = [self._resize_crop(img) for img in images if img is not None]
        c = self.pp.crop
        out = torch.stack(crops) if crops else torch.empty((0, 3, c, c), dtype=torch.uint8, device=self.device)
        return out.permute(0, 2, 3, 1), taken  # NHWC, as the backbone takes it (a view: no copy)

    def _decode(self, items: list[bytes | bytearray | memoryview]) -> list[torch.Tensor | None]:
        if not items or not self.available:
            return [None] * len(items)
        try:
            decode_jpeg, rgb, _, _ = _torchvision()
        except (ImportError, AttributeError) as e:
            log.warning("torchvision's JPEG decoder is unavailable (%s); decoding JPEGs with Pillow", e)
            self.available = False
            return [None] * len(items)
        import torch

        data = [torch.frombuffer(bytearray(x), dtype=torch.uint8) for x in items]
        if len(data) > 1:
            try:  # one call for the list: nvJPEG decodes it as a batch
                return list(decode_jpeg(data, mode=rgb, device=self.device))
            except RuntimeError as e:
                log.debug("batched JPEG decode failed (%s); decoding one by one", e)
        out: list[torch.Tensor | None] = []
        for d in data:  # isolate the bad ones: they go to Pillow, which reports them
            try:
                out.append(decode_jpeg(d, mode=rgb, device=self.device))
            except RuntimeError:
                out.append(None)
        return out

    def _resize_crop(self, img: torch.Tensor) -> torch.Tensor:
        _, _, modes, tvf = _torchvision()
        interpolation = modes.BICUBIC if self.pp.interpolation == "bicubic" else modes.BILINEAR
        resized = tvf.resize(img, [self.pp.resize], interpolation=interpolation, antialias=True)
        return tvf.center_crop(resized, [self.pp.crop])
