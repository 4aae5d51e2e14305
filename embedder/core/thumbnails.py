"""Small JPEG previews of kept images, for callers that show many at once (the web page's grid)."""
from __future__ import annotations

import io
import threading

from PIL import Image

from ..errors import InvalidArgumentError
from ..preprocess import decode

MAX_SIDE = 1024  # a preview; the image as added is there for anything larger
MIN_SIDE = 16
# full decodes at once: each holds the whole image (a 62-megapixel PNG of 200 KB takes ~190 MB while it is made),
# and nothing else bounds them, since thumbnails bypass the batcher's pixel budget
_DECODING = threading.BoundedSemaphore(2)


def check_side(side: int) -> int:
    if isinstance(side, bool) or not isinstance(side, int) or not MIN_SIDE <= side <= MAX_SIDE:
        raise InvalidArgumentError(f"a thumbnail's size must be a whole number of pixels from {MIN_SIDE} to "
                                   f"{MAX_SIDE}, got {side!r}; send 0 for the image as it was added")
    return side


def thumbnail(data: bytes, side: int, *, max_pixels: int) -> bytes:
    """``data`` (an encoded image) upright and scaled down to fit ``side`` x ``side`` (never up), as JPEG."""
    with _DECODING:
        # the embedder's own decode (same formats, EXIF turn, size limit); a JPEG at the smallest scale >= side
        img = decode(data, max_pixels=max_pixels, draft=side)
        img.thumbnail((side, side), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()
